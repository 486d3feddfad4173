"""Dynamic CAM Selection (paper Eq. 3-5): binarise each block's CAM, score it against M, pick the best.

Per image, each encoder block's CAM is binarised with threshold theta (Eq. 3), its similarity rate
alpha with the initial label M is measured over M's non-ignored pixels (Eq. 4), and the block with
the largest alpha becomes the pseudo label P; L_dcs is alpha_P times the BCE over P's non-ignored
pixels (Eq. 5). P and alpha are targets: both are under stop_gradient.
"""

import jax
import jax.numpy as jnp

from donuseg_jax.data import batch as batch_lib
from donuseg_jax.losses import segmentation


def binarize_cam(*, cam: jax.Array, theta: float) -> jax.Array:
  """Eq. 3: 1 where cam > theta, 0 where cam <= 1 - theta, -1 (ignored) between. Same shape, int8."""
  cam = jax.lax.stop_gradient(cam)
  return jnp.where(cam > theta, 1, jnp.where(cam <= 1. - theta, 0, -1)).astype(jnp.int8)


ALPHA_FORMS = ('paper', 'balanced')


def similarity_rate(*, cam_label: jax.Array, label: jax.Array, form: str = 'paper') -> jax.Array:
  """Eq. 4: agreement of a binarised CAM C with M over M's non-ignored pixels.

  Args:
    cam_label: (B, H, W) or (B, K, H, W) int8 binarised CAMs (1 / 0 / -1).
    label: (B, H, W) int8 initial label M (1 / 0 / -1).
    form: 'paper' = agreeing pixels / valid pixels of M (Eq. 4 as written). M's background
      (every pixel beyond d = 20 of a point) outnumbers its foreground about 10:1, so this form
      barely separates a good map from an empty one (on TNBC alpha(all zeros) 0.971 > alpha(truth
      + 5% false positives) 0.946) and selection rewards sparse maps. 'balanced' = the mean of the
      agreement on M = 1 and on M = 0 (classes that M lacks in an image are left out of the mean):
      an all-background map scores 0.5, the true mask about 1.

  Returns:
    (B,) or (B, K) float32 alpha in [0, 1]; an ignored C pixel counts as disagreement, and an image
    whose M has no valid pixel gets 0.
  """
  if form not in ALPHA_FORMS:
    raise ValueError(f'alpha form must be one of {ALPHA_FORMS}, got {form!r}')
  cam_label, label = jnp.asarray(cam_label), jnp.asarray(label)
  if cam_label.ndim == label.ndim + 1:
    label = label[:, None]  # (B, 1, H, W): broadcast over blocks
  agree_fg = jnp.sum((label == 1) & (cam_label == 1), axis=(-2, -1)).astype(jnp.float32)
  agree_bg = jnp.sum((label == 0) & (cam_label == 0), axis=(-2, -1)).astype(jnp.float32)
  count_fg = jnp.sum(label == 1, axis=(-2, -1))
  count_bg = jnp.sum(label == 0, axis=(-2, -1))
  if form == 'paper':
    alpha = segmentation.safe_mean(total=agree_fg + agree_bg, count=count_fg + count_bg)
  else:
    rate_fg = segmentation.safe_mean(total=agree_fg, count=count_fg)
    rate_bg = segmentation.safe_mean(total=agree_bg, count=count_bg)
    classes = (count_fg > 0).astype(jnp.float32) + (count_bg > 0).astype(jnp.float32)
    alpha = jnp.where(classes > 0, (rate_fg + rate_bg) / jnp.maximum(classes, 1.0), 0.0)
  return jax.lax.stop_gradient(alpha)


def dynamic_cam_selection(*, cams: jax.Array, label: jax.Array, theta: float,
                          fixed_block: int = 0, alpha_form: str = 'paper'
                          ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Picks, per image, the binarised CAM most similar to M.

  A constant CAM (normalised to all zeros: a block whose ReLU-ed map is flat carries no location)
  is never a label: its alpha reads 0 and it is never selected. An image whose CAMs are all constant
  gets an all-ignored P (and alpha_P 0), so L_dcs and L_ccl take nothing from it.

  Args:
    cams: (B, K, H, W) float CAMs in [0, 1] (K = 4 encoder blocks).
    label: (B, H, W) int8 initial label M.
    theta: binarisation threshold (Eq. 3).
    fixed_block: 0 = dynamic (largest alpha, ties to the lowest index); k in 1..K always takes block k
      (the paper's Table 3 ablation). alpha is returned for every block either way.
    alpha_form: 'paper' | 'balanced', see `similarity_rate`.

  Returns:
    pseudo (B, H, W) int8 label P, alpha (B, K) float32, index (B,) int32 (0-based chosen block).
  """
  num_blocks = cams.shape[1]
  if not 0 <= fixed_block <= num_blocks:
    raise ValueError(f'fixed_block {fixed_block} outside 0..{num_blocks}')
  informative = jnp.max(jax.lax.stop_gradient(cams), axis=(-2, -1)) > 0  # (B, K)
  binary = binarize_cam(cam=cams, theta=theta)  # (B, K, H, W)
  binary = jnp.where(informative[..., None, None], binary, batch_lib.IGNORE).astype(jnp.int8)
  alpha = similarity_rate(cam_label=binary, label=label, form=alpha_form)  # (B, K)
  alpha = jnp.where(informative, alpha, 0.0)
  if fixed_block:
    index = jnp.full(cams.shape[:1], fixed_block - 1, jnp.int32)
  else:
    # First maximum among informative blocks: lowest index wins ties.
    index = jnp.argmax(jnp.where(informative, alpha, -1.0), axis=1).astype(jnp.int32)
  pseudo = jnp.take_along_axis(binary, index[:, None, None, None], axis=1)[:, 0]  # (B, H, W)
  return pseudo, alpha, index


PSEUDO_BACKGROUNDS = ('cam', 'm')


def restrict_background(*, pseudo: jax.Array, label: jax.Array, form: str = 'cam') -> jax.Array:
  """Where P's background counts: every P = 0 pixel ('cam', the paper) or only where M is 0 too ('m').

  From scratch the chosen CAM is foreground on well under 1% of pixels (theta 0.8 keeps only the
  peaks), so P = 0 covers most nucleus pixels, those M calls foreground included: L_dcs and the
  negative set of L_ccl then teach that nuclei are background, against L_seg (issue 9: the
  prediction's recall on training crops fell from 0.67 without DCS/CCL to 0.55 with them). 'm' keeps
  what P adds (its foreground, anywhere) and its background where M agrees; a P = 0 pixel that M
  calls foreground or ignores becomes ignored.

  Args:
    pseudo: (B, H, W) int8 pseudo label P (1 / 0 / -1).
    label: (B, H, W) int8 initial label M.
    form: 'cam' | 'm'.

  Returns:
    (B, H, W) int8 pseudo label used by L_dcs and L_ccl.
  """
  if form not in PSEUDO_BACKGROUNDS:
    raise ValueError(f'pseudo background must be one of {PSEUDO_BACKGROUNDS}, got {form!r}')
  if form == 'cam':
    return pseudo
  return jnp.where((pseudo == 0) & (label != 0), batch_lib.IGNORE, pseudo).astype(jnp.int8)


def dcs_loss(*, logits: jax.Array, pseudo: jax.Array, alpha: jax.Array,
             balance: str = 'pooled') -> jax.Array:
  """Eq. 5: per image alpha_P * BCE(Y, P) over P's non-ignored pixels, then the batch mean.

  Args:
    logits: (B, H, W) segmentation logits.
    pseudo: (B, H, W) int8 pseudo label P.
    alpha: (B,) similarity rate of each image's P (stop_gradient applied here).
    balance: BCE form, as in `segmentation.per_image_bce` (the paper's Eq. 5 is 'pooled').

  Returns:
    Scalar loss.
  """
  logits = jnp.asarray(logits)
  alpha = jax.lax.stop_gradient(jnp.asarray(alpha, logits.dtype))
  per_image = segmentation.per_image_bce(logits=logits, label=pseudo, balance=balance)  # (B,)
  return jnp.mean(alpha * per_image)
