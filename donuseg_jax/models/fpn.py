"""Feature pyramid ([code], DESIGN.md section 1): lateral 1x1 + nearest top-down + 3x3 output conv.

P_l comes from C_l for l in min_level..5 (P1 only when the segmentation head fuses at stride 2);
P6 = 3x3 stride-2 conv on P5. Every P_l has `channels` channels and stride 2**l.
"""

from flax import nnx
import jax
import jax.numpy as jnp


def upsample_nearest(x: jax.Array, factor: int) -> jax.Array:
  """(B, h, w, C) -> (B, h*factor, w*factor, C) by repetition (exact for the power-of-2 strides)."""
  if factor == 1:
    return x
  return jnp.repeat(jnp.repeat(x, factor, axis=1), factor, axis=2)


def _conv(in_ch: int, out_ch: int, size: int, stride: int = 1, *, dtype, rngs: nnx.Rngs) -> nnx.Conv:
  pad = size // 2
  return nnx.Conv(
      in_ch, out_ch, (size, size), strides=stride, padding=((pad, pad), (pad, pad)), dtype=dtype,
      # maskrcnn-benchmark's FPN init: kaiming_uniform(a=1), i.e. uniform with variance 1/fan_in.
      kernel_init=nnx.initializers.variance_scaling(1.0, 'fan_in', 'uniform'), rngs=rngs)


class FPN(nnx.Module):
  """C_min..C5 -> {'p<min>': ..., 'p6': ...}."""

  def __init__(self, in_channels: dict[str, int], channels: int, *, min_level: int = 1, dtype=jnp.float32,
               rngs: nnx.Rngs):
    if min_level not in (1, 2):
      raise ValueError(f'FPN min_level must be 1 or 2, got {min_level}')
    self.min_level = min_level
    self.levels = tuple(range(min_level, 6))
    self.lateral = nnx.List([_conv(in_channels[f'c{l}'], channels, 1, dtype=dtype, rngs=rngs)
                             for l in self.levels])
    self.output = nnx.List([_conv(channels, channels, 3, dtype=dtype, rngs=rngs) for _ in self.levels])
    self.p6 = _conv(channels, channels, 3, 2, dtype=dtype, rngs=rngs)

  def __call__(self, features: dict[str, jax.Array]) -> dict[str, jax.Array]:
    pyramid = {}
    top = None
    # Top-down: from C5 to C_min, each lateral plus the upsampled coarser merged map.
    for i in reversed(range(len(self.levels))):
      level = self.levels[i]
      merged = self.lateral[i](features[f'c{level}'])
      if top is not None:
        merged = merged + upsample_nearest(top, 2)
      top = merged
      pyramid[f'p{level}'] = self.output[i](merged)
    pyramid['p6'] = self.p6(pyramid['p5'])
    return {f'p{l}': pyramid[f'p{l}'] for l in (*self.levels, 6)}
