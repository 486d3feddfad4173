"""Masked binary cross-entropy on label maps with ignored pixels: L_seg (paper Eq. 1), reused by Eq. 5.

Label maps are int8 (1 nucleus, 0 background, -1 ignored). Every image is averaged over its own
valid pixels, then images are averaged; an image without a valid pixel contributes 0, never NaN.
"""

import jax
import jax.numpy as jnp

BALANCES = ('pooled', 'balanced')


def safe_mean(*, total: jax.Array, count: jax.Array) -> jax.Array:
  """total / count, with 0 where count == 0 (count is a non-negative pixel count, not differentiated)."""
  count = jnp.asarray(count, total.dtype)
  return total / jnp.maximum(count, 1.)


def bce_with_logits(*, logits: jax.Array, target: jax.Array) -> jax.Array:
  """Element-wise -[t log sigmoid(x) + (1 - t) log(1 - sigmoid(x))], stable for any finite logit."""
  # log(1 - sigmoid(x)) = log_sigmoid(-x): no log(0) for large |x|, finite gradients everywhere.
  return -(target * jax.nn.log_sigmoid(logits) + (1. - target) * jax.nn.log_sigmoid(-logits))


def per_image_bce(*, logits: jax.Array, label: jax.Array, balance: str = 'pooled') -> jax.Array:
  """BCE of each image over the non-ignored pixels of `label`.

  Args:
    logits: (B, H, W) float segmentation logits.
    label: (B, H, W) int8, 1 / 0 / -1 (ignored).
    balance: 'pooled' (paper Eq. 1: one mean over all valid pixels) or 'balanced' ([code]: mean over
      foreground plus mean over background; an empty class adds 0).

  Returns:
    (B,) per-image losses.
  """
  if balance not in BALANCES:
    raise ValueError(f'unknown balance {balance!r}; expected one of {BALANCES}')
  logits, label = jnp.asarray(logits), jnp.asarray(label)
  foreground = (label == 1).astype(logits.dtype)  # (B, H, W)
  background = (label == 0).astype(logits.dtype)  # (B, H, W)
  # Ignored pixels get a finite loss that is multiplied by 0, so their gradient is exactly 0.
  pixel_loss = bce_with_logits(logits=logits, target=foreground)  # (B, H, W)
  axes = tuple(range(1, logits.ndim))
  fg_total = jnp.sum(pixel_loss * foreground, axis=axes)  # (B,)
  bg_total = jnp.sum(pixel_loss * background, axis=axes)  # (B,)
  fg_count = jnp.sum(foreground, axis=axes)  # (B,)
  bg_count = jnp.sum(background, axis=axes)  # (B,)
  if balance == 'pooled':
    return safe_mean(total=fg_total + bg_total, count=fg_count + bg_count)
  return safe_mean(total=fg_total, count=fg_count) + safe_mean(total=bg_total, count=bg_count)


def segmentation_loss(*, logits: jax.Array, label: jax.Array, balance: str = 'pooled') -> jax.Array:
  """L_seg (Eq. 1): per-image masked BCE over Omega_M, then the batch mean. Scalar."""
  return jnp.mean(per_image_bce(logits=logits, label=label, balance=balance))
