"""The training objective (paper Eq. 2) and the pseudo-label diagnostics logged next to it.

L = L_det + L_seg + L_loc + w1 * L_dcs + w2 * L_ccl, every term switchable (`config.loss.use_*`, the
paper's Table 2), the CAM block fixable (`config.loss.fixed_cam_block`, Table 3), and L_dcs / L_ccl
held at weight 0 for `config.loss.cam_warmup_epochs` (a traced comparison: no retrace per epoch), or
by a gate the caller computes (training also honours `config.loss.cam_warmup_fraction`).
"""

import jax
import jax.numpy as jnp
import ml_collections

from donuseg_jax.losses import contrastive
from donuseg_jax.losses import dcs
from donuseg_jax.losses import detection
from donuseg_jax.losses import localization
from donuseg_jax.losses import segmentation

NUM_CAM_BLOCKS = 4  # C2..C5


def foreground_quality(*, foreground: jax.Array, truth: jax.Array, has_gt: jax.Array) -> dict:
  """Precision, recall and IoU of a foreground map against the true masks, pooled over the images
  that have ground truth. foreground, truth (B, H, W) bool; has_gt (B,) bool. Scalars; 0 where
  undefined (no predicted or no true foreground)."""
  keep = has_gt[:, None, None]
  foreground, truth = foreground & keep, truth & keep
  hit = jnp.sum(foreground & truth).astype(jnp.float32)
  predicted, actual = jnp.sum(foreground), jnp.sum(truth)
  return {'precision': segmentation.safe_mean(total=hit, count=predicted),
          'recall': segmentation.safe_mean(total=hit, count=actual),
          'iou': segmentation.safe_mean(total=hit, count=jnp.sum(foreground | truth))}


def pseudo_label_diagnostics(*, label_m: jax.Array, pseudo: jax.Array | None, alpha: jax.Array | None,
                             index: jax.Array | None, instances: jax.Array,
                             seg_logits: jax.Array) -> dict:
  """Logged, never in the loss: whether the pseudo labels grow into whole nuclei.

  alpha and choice frequency per block; foreground fraction of P and of the prediction (logit > 0);
  precision / recall / IoU of the foreground of M, P and the prediction against the true masks
  (`quality/`, only from images that carry them: training reads the masks for nothing else).
  """
  aux = {}
  truth = instances > 0  # (B, H, W)
  # Batches without ground truth carry all-zero instances: quality then reads 0.
  has_gt = jnp.any(truth, axis=(1, 2))  # (B,)
  aux['quality/has_gt'] = jnp.mean(has_gt.astype(jnp.float32))
  aux['quality/true_fraction'] = jnp.mean(truth.astype(jnp.float32))
  maps = {'m': label_m == 1, 'pred': seg_logits > 0}
  if pseudo is not None:
    for k in range(alpha.shape[1]):
      aux[f'dcs/alpha_block{k + 1}'] = jnp.mean(alpha[:, k])
      aux[f'dcs/chosen_block{k + 1}'] = jnp.mean((index == k).astype(jnp.float32))
    aux['dcs/pseudo_fraction'] = jnp.mean((pseudo != -1).astype(jnp.float32))
    aux['dcs/alpha_p'] = jnp.mean(jnp.take_along_axis(alpha, index[:, None], axis=1))
    maps['p'] = pseudo == 1
  for name, foreground in maps.items():
    aux[f'quality/{name}_fg_fraction'] = jnp.mean(foreground.astype(jnp.float32))
    for metric, value in foreground_quality(foreground=foreground, truth=truth, has_gt=has_gt).items():
      aux[f'quality/{name}_{metric}'] = value
  return aux


def total_loss(outputs: dict, batch: dict, *, config: ml_collections.ConfigDict,
               cam_weight=1.) -> tuple[jax.Array, dict]:
  """Eq. 2 on one batch.

  Args:
    outputs: the model's outputs (see CONTRACTS: 'segmentation' (B, H, W), 'localization'
      (B, H/32, W/32), 'detection' (levels P2..P6), 'projection' (B, H, W, D), 'cams' (B, 4, H, W)).
      'cams' may be absent when both L_dcs and L_ccl are off (the 'dcs/' and 'quality/p_' entries
      are then absent from aux).
    batch: the training batch (`donuseg_jax.data.batch`).
    config: the full config (uses config.loss).
    cam_weight: a factor (may be traced) on w1 * L_dcs + w2 * L_ccl: 0 during the CAM warm-up
      (train.train_step), 1 otherwise. The terms are computed and logged either way.

  Returns:
    (loss, aux): scalar loss and a flat dict of scalars ('loss', 'loss/<term>', 'dcs/...',
    'quality/...'). A term that is switched off reads 0.
  """
  cfg = config.loss
  # Losses are summed over up to ~10^5 pixels: always in float32, whatever the compute dtype.
  outputs = {k: jax.tree.map(lambda x: x.astype(jnp.float32), v) if k != 'features' else v
             for k, v in outputs.items()}
  label_m = batch['label_m']  # (B, H, W) int8
  zero = jnp.zeros((), jnp.float32)
  aux = {}

  seg_logits = outputs['segmentation']  # (B, H, W)
  height, width = seg_logits.shape[1:]
  aux['loss/seg'] = (segmentation.segmentation_loss(logits=seg_logits, label=label_m,
                                                    balance=cfg.seg_balance)
                     if cfg.use_seg else zero)

  if cfg.use_loc:
    prediction = outputs['localization']  # (B, H/32, W/32)
    target = localization.localization_target(label_m=label_m, stride=height // prediction.shape[1])
    aux['loss/loc'] = localization.localization_loss(prediction=prediction, target=target)
  else:
    aux['loss/loc'] = zero

  if cfg.use_det:
    targets = detection.detection_targets(boxes=batch['boxes'], box_valid=batch['box_valid'],
                                          image_size=(height, width))
    det = detection.detection_loss(outputs_detection=outputs['detection'], targets=targets,
                                   alpha=cfg.focal_alpha, gamma=cfg.focal_gamma)
    aux['loss/det_focal'], aux['loss/det_iou'] = det['focal'], det['iou']
    aux['loss/det_centerness'] = det['centerness']
    aux['loss/det'] = det['focal'] + det['iou'] + det['centerness']
  else:
    for name in ('loss/det', 'loss/det_focal', 'loss/det_iou', 'loss/det_centerness'):
      aux[name] = zero

  aux['loss/dcs'] = aux['loss/ccl'] = zero
  if 'cams' in outputs:
    pseudo, alpha, index = dcs.dynamic_cam_selection(cams=outputs['cams'], label=label_m,
                                                     theta=cfg.theta, fixed_block=cfg.fixed_cam_block,
                                                     alpha_form=cfg.alpha)
    alpha_p = jnp.take_along_axis(alpha, index[:, None], axis=1)[:, 0]  # (B,)
    # Selection and the diagnostics read P as chosen; the losses read it with its background
    # restricted as configured.
    target = dcs.restrict_background(pseudo=pseudo, label=label_m, form=cfg.pseudo_background)
    if cfg.use_dcs:
      aux['loss/dcs'] = dcs.dcs_loss(logits=seg_logits, pseudo=target, alpha=alpha_p)
    if cfg.use_ccl:
      aux['loss/ccl'] = contrastive.contrastive_loss(
          features=outputs['projection'], label=label_m, pseudo=target, alpha=alpha_p, tau=cfg.tau,
          keys=cfg.contrastive_keys)
  elif cfg.use_dcs or cfg.use_ccl:
    raise KeyError("outputs lack 'cams' (forward(..., with_cams=True)) but L_dcs or L_ccl is on")
  else:
    pseudo = alpha = index = None
  aux.update(pseudo_label_diagnostics(label_m=label_m, pseudo=pseudo, alpha=alpha, index=index,
                                      instances=batch['instances'], seg_logits=seg_logits))

  aux['loss'] = (aux['loss/det'] + aux['loss/seg'] + aux['loss/loc']
                 + cam_weight * (cfg.w_dcs * aux['loss/dcs'] + cfg.w_ccl * aux['loss/ccl']))
  return aux['loss'], aux
