"""CAM-guided contrastive learning (paper Eq. 6-7) in O(pixels), with masks instead of sampling.

Anchors a+ / a- are the per-image means of Z over M = 1 / M = 0; positives and negatives are the
pixels with P = 1 / P = 0. Eq. 7 for one anchor q reads

  L_con(q, U, V) = (1/|U|) sum_u [log(e^{s_u} + sum_v e^{s_v}) - s_u] = (1/|U|) sum_u softplus(lse_V - s_u)

with s = cos(q, .) / tau and lse_V = log sum_v e^{s_v}. Since q is one vector, lse_V is one masked
log-sum-exp per anchor and image: no |U| x |V| matrix and no random subsampling.

Gradients flow through the anchors (they are feature means, like SimCLR's two views, both sides of
the similarity learn); `stop_anchor_gradient=True` treats them as fixed targets instead. alpha_P
and P are under stop_gradient. Pixels in none of the anchor sets (M valid) and none of U, V (P
valid) get exactly zero gradient.
"""

import jax
import jax.numpy as jnp

from donuseg_jax.losses import segmentation

KEYS = ('features', 'minus_anchor')
_NORM_EPS = 1e-8  # smallest norm used in the cosine, as torch.nn.functional.cosine_similarity


def _normalize(x: jax.Array) -> jax.Array:
  """x / max(|x|, eps) along the last axis; finite value and gradient for x = 0."""
  squared = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(squared, _NORM_EPS ** 2))


def _masked_logsumexp(values: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """log sum over the True pixels of exp(values), per image: (B, H, W) -> ((B,), nonempty (B,)).

  Empty sets return 0 with nonempty False; masked-out pixels never see an inf, so their gradient is
  exactly 0 (no where-NaN trap).
  """
  axes = (1, 2)
  peak = jnp.max(jnp.where(mask, values, -jnp.inf), axis=axes, keepdims=True)  # (B, 1, 1)
  peak = jax.lax.stop_gradient(jnp.where(jnp.isfinite(peak), peak, 0.))
  exps = jnp.exp(jnp.where(mask, values - peak, -jnp.inf))  # (B, H, W), 0 outside the mask
  total = jnp.sum(exps, axis=axes)  # (B,), >= 1 when nonempty (the peak pixel adds e^0)
  nonempty = jnp.any(mask, axis=axes)
  return jnp.log(jnp.where(nonempty, total, 1.)) + peak[:, 0, 0], nonempty


def _anchor(features: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean of features (B, H, W, D) over mask (B, H, W) -> (B, D); 0 for an empty mask."""
  weights = mask.astype(features.dtype)[..., None]  # (B, H, W, 1)
  total = jnp.sum(features * weights, axis=(1, 2))  # (B, D)
  return segmentation.safe_mean(total=total, count=jnp.sum(weights, axis=(1, 2)))


def contrastive_term(*, anchor: jax.Array, features: jax.Array, positive: jax.Array,
                     negative: jax.Array, tau: float = 1.0, keys: str = 'features') -> jax.Array:
  """Eq. 7, L_con(q, U, V) per image.

  Args:
    anchor: (B, D) anchor q.
    features: (B, H, W, D) feature map Z.
    positive: (B, H, W) bool, the set U.
    negative: (B, H, W) bool, the set V.
    tau: temperature.
    keys: 'features' (paper: phi(q, u)) or 'minus_anchor' ([code]: phi(q, u - q), for u and v alike).

  Returns:
    (B,) losses; 0 where U is empty (and exactly 0 where V is empty, since then each term is
    log e^{s_u} - s_u).
  """
  if keys not in KEYS:
    raise ValueError(f'unknown keys {keys!r}; expected one of {KEYS}')
  q = anchor[:, None, None, :]  # (B, 1, 1, D)
  key_features = features - q if keys == 'minus_anchor' else features
  scores = jnp.sum(_normalize(q) * _normalize(key_features), axis=-1) / tau  # (B, H, W)
  lse_negative, has_negative = _masked_logsumexp(scores, negative)  # (B,), (B,)
  # softplus(lse_V - s_u) = log(e^{s_u} + sum_v e^{s_v}) - s_u; an empty V contributes nothing.
  per_pixel = jnp.where(has_negative[:, None, None],
                        jax.nn.softplus(lse_negative[:, None, None] - scores), 0.)  # (B, H, W)
  total = jnp.sum(jnp.where(positive, per_pixel, 0.), axis=(1, 2))  # (B,)
  return segmentation.safe_mean(total=total, count=jnp.sum(positive, axis=(1, 2)))


def contrastive_loss(*, features: jax.Array, label: jax.Array, pseudo: jax.Array, alpha: jax.Array,
                     tau: float = 1.0, keys: str = 'features',
                     stop_anchor_gradient: bool = False) -> jax.Array:
  """Eq. 6: alpha_P (L_con(a+, S+, S-) + L_con(a-, S-, S+)) per image, then the batch mean.

  Args:
    features: (B, H, W, D) projection Z.
    label: (B, H, W) int8 initial label M (anchors).
    pseudo: (B, H, W) int8 pseudo label P (positive / negative sets).
    alpha: (B,) similarity rate of each image's P.
    tau: temperature (Eq. 7).
    keys: 'features' (paper) | 'minus_anchor' ([code]).
    stop_anchor_gradient: treat the anchors as constants (default: gradients flow through them).

  Returns:
    Scalar loss. An image whose anchor set (M = 1 or M = 0) is empty loses that anchor's term only.
  """
  features = jnp.asarray(features)
  alpha = jax.lax.stop_gradient(jnp.asarray(alpha, features.dtype))
  pseudo = jax.lax.stop_gradient(jnp.asarray(pseudo))
  foreground_m, background_m = label == 1, label == 0
  foreground_p, background_p = pseudo == 1, pseudo == 0
  per_image = jnp.zeros(features.shape[:1], features.dtype)
  for anchor_mask, positive, negative in ((foreground_m, foreground_p, background_p),
                                          (background_m, background_p, foreground_p)):
    anchor = _anchor(features, anchor_mask)  # (B, D)
    if stop_anchor_gradient:
      anchor = jax.lax.stop_gradient(anchor)
    term = contrastive_term(anchor=anchor, features=features, positive=positive, negative=negative,
                            tau=tau, keys=keys)  # (B,)
    per_image += jnp.where(jnp.any(anchor_mask, axis=(1, 2)), term, 0.)
  return jnp.mean(alpha * per_image)
