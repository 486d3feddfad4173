"""L_loc: the localization head's target (M's foreground coverage per C5 cell) and its MSE loss.

The paper trains "fully supervised point localization" with an MSE loss without giving the target;
our reading (`shared/DESIGN.md` section 1): the fraction of each stride x stride cell covered by the
foreground of the initial label M (the r-disks around the points).
"""

import jax
import jax.numpy as jnp


def localization_target(*, label_m: jax.Array, stride: int = 32) -> jax.Array:
  """Fraction of each stride x stride cell whose pixels have label_m == 1.

  Args:
    label_m: (B, H, W) int8 initial label M (1 / 0 / -1); H and W divisible by `stride`.
    stride: cell side in pixels (C5: 32).

  Returns:
    (B, H / stride, W / stride) float32 in [0, 1].
  """
  batch, height, width = label_m.shape
  if height % stride or width % stride:
    raise ValueError(f'label_m {label_m.shape} is not divisible by stride {stride}')
  foreground = (label_m == 1).astype(jnp.float32)  # (B, H, W)
  cells = foreground.reshape(batch, height // stride, stride, width // stride, stride)
  return jnp.mean(cells, axis=(2, 4))  # (B, H/s, W/s)


def localization_loss(*, prediction: jax.Array, target: jax.Array) -> jax.Array:
  """Mean squared error: per image over its cells, then the batch mean (every cell is valid). Scalar."""
  target = jax.lax.stop_gradient(target.astype(prediction.dtype))
  per_image = jnp.mean(jnp.square(prediction - target), axis=tuple(range(1, prediction.ndim)))
  return jnp.mean(per_image)
