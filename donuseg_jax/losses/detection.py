"""L_det: FCOS target assignment on P2..P6 from padded pseudo boxes, and the FCOS losses.

Facts from `shared/DESIGN.md` section 1 ([code] = the authors' FCOS fork): the location of cell (i, j)
at stride s is (x, y) = (j*s + s//2, i*s + s//2); a location is positive for a box when it lies
strictly inside it (min(l, t, r, b) > 0, no centre sampling) and max(l, t, r, b) falls in the level's
size range (both ends inclusive, as FCOS); ties go to the smallest box (then the lowest index).
Losses: sigmoid focal / #positives, -log IoU weighted by the centerness target / their sum, and
centerness BCE / #positives; positives are counted over the whole batch and all levels, as FCOS does.
"""

import math

import jax
import jax.numpy as jnp

from donuseg_jax.losses import segmentation

STRIDES = (4, 8, 16, 32, 64)  # P2..P6
SIZE_RANGES = ((0., 16.), (16., 32.), (32., 64.), (64., 128.), (128., math.inf))


def level_shape(*, image_size: tuple[int, int], stride: int) -> tuple[int, int]:
  """Feature map size at `stride` for SAME-padded stride-2 convs: ceil(H / s), ceil(W / s)."""
  return -(-image_size[0] // stride), -(-image_size[1] // stride)


def _level_targets(*, boxes, box_valid, shape, stride, size_range):
  """Targets of one level: labels (B, h, w) bool, ltrb (B, h, w, 4), centerness (B, h, w)."""
  height, width = shape
  xs = (jnp.arange(width) * stride + stride // 2).astype(boxes.dtype)  # (w,)
  ys = (jnp.arange(height) * stride + stride // 2).astype(boxes.dtype)  # (h,)
  x0, y0, x1, y1 = (boxes[..., k] for k in range(4))  # each (B, N)
  # Distances separate into an x part and a y part, so only the final (B, h, w, N) candidate test is
  # pairwise; XLA fuses it into the reduction over boxes.
  left = xs[None, :, None] - x0[:, None, :]  # (B, w, N)
  right = x1[:, None, :] - xs[None, :, None]  # (B, w, N)
  top = ys[None, :, None] - y0[:, None, :]  # (B, h, N)
  bottom = y1[:, None, :] - ys[None, :, None]  # (B, h, N)
  inside_x = jnp.minimum(left, right) > 0  # (B, w, N)
  inside_y = jnp.minimum(top, bottom) > 0  # (B, h, N)
  max_side = jnp.maximum(jnp.maximum(top, bottom)[:, :, None, :],
                         jnp.maximum(left, right)[:, None, :, :])  # (B, h, w, N)
  low, high = size_range
  candidate = (inside_y[:, :, None, :] & inside_x[:, None, :, :] & box_valid[:, None, None, :]
               & (max_side >= low) & (max_side <= high))  # (B, h, w, N)
  area = (x1 - x0) * (y1 - y0)  # (B, N)
  # argmin returns the first minimum: equal areas go to the lowest box index.
  index = jnp.argmin(jnp.where(candidate, area[:, None, None, :], jnp.inf), axis=-1)  # (B, h, w)
  labels = jnp.any(candidate, axis=-1)  # (B, h, w)
  chosen = jax.vmap(lambda b, i: b[i])(boxes, index)  # (B, h, w, 4)
  grid_x = xs[None, None, :]  # (1, 1, w)
  grid_y = ys[None, :, None]  # (1, h, 1)
  ltrb = jnp.stack([grid_x - chosen[..., 0], grid_y - chosen[..., 1],
                    chosen[..., 2] - grid_x, chosen[..., 3] - grid_y], axis=-1)  # (B, h, w, 4)
  ltrb = jnp.where(labels[..., None], ltrb, 0.)
  # Safe denominators at negatives (their ltrb is 0); positives have all four distances > 0.
  lr_max = jnp.where(labels, jnp.maximum(ltrb[..., 0], ltrb[..., 2]), 1.)
  tb_max = jnp.where(labels, jnp.maximum(ltrb[..., 1], ltrb[..., 3]), 1.)
  ratio = (jnp.minimum(ltrb[..., 0], ltrb[..., 2]) / lr_max
           * jnp.minimum(ltrb[..., 1], ltrb[..., 3]) / tb_max)
  centerness = jnp.where(labels, jnp.sqrt(jnp.maximum(ratio, 0.)), 0.)  # (B, h, w)
  return {'labels': labels, 'ltrb': ltrb, 'centerness': centerness}


def detection_targets(*, boxes: jax.Array, box_valid: jax.Array, image_size,
                      strides=STRIDES, size_ranges=SIZE_RANGES) -> tuple[dict, ...]:
  """FCOS targets for every level.

  Args:
    boxes: (B, N, 4) float (x0, y0, x1, y1) in input pixels, padded to N.
    box_valid: (B, N) bool, which rows are real boxes.
    image_size: int or (H, W) of the input images (static).
    strides: level strides (P2..P6).
    size_ranges: per level (low, high) of max(l, t, r, b), both inclusive.

  Returns:
    A tuple over levels of dicts {'labels': (B, h, w) bool, 'ltrb': (B, h, w, 4) float pixels (0 at
    negatives), 'centerness': (B, h, w) float in [0, 1] (0 at negatives)}, under stop_gradient.
  """
  if len(strides) != len(size_ranges):
    raise ValueError(f'{len(strides)} strides but {len(size_ranges)} size ranges')
  if isinstance(image_size, int):
    image_size = (image_size, image_size)
  boxes = jax.lax.stop_gradient(jnp.asarray(boxes, jnp.float32))
  box_valid = jnp.asarray(box_valid, bool)
  return tuple(
      _level_targets(boxes=boxes, box_valid=box_valid,
                     shape=level_shape(image_size=image_size, stride=stride), stride=stride,
                     size_range=size_range)
      for stride, size_range in zip(strides, size_ranges))


def sigmoid_focal_loss(*, logits: jax.Array, labels: jax.Array, alpha: float = 0.25,
                       gamma: float = 2.) -> jax.Array:
  """Element-wise focal loss -alpha_t (1 - p_t)^gamma log p_t, from logits (stable)."""
  target = labels.astype(logits.dtype)
  ce = segmentation.bce_with_logits(logits=logits, target=target)
  # 1 - p_t = sigmoid(-x) for positives and sigmoid(x) for negatives: no cancellation near p = 1.
  one_minus_pt = jax.nn.sigmoid(jnp.where(labels, -logits, logits))
  alpha_t = jnp.where(labels, alpha, 1. - alpha)
  return alpha_t * one_minus_pt ** gamma * ce


def iou_loss(*, prediction: jax.Array, target: jax.Array) -> jax.Array:
  """Element-wise -log IoU of ltrb boxes sharing a location, (B, ..., 4) -> (B, ...).

  FCOS's +1 smoothing ((I + 1) / (U + 1), in pixels) keeps it finite for degenerate boxes.
  """
  pl, pt, pr, pb = (prediction[..., k] for k in range(4))
  tl, tt, tr, tb = (target[..., k] for k in range(4))
  pred_area = (pl + pr) * (pt + pb)
  target_area = (tl + tr) * (tt + tb)
  intersection = (jnp.minimum(pl, tl) + jnp.minimum(pr, tr)) * (jnp.minimum(pt, tt) + jnp.minimum(pb, tb))
  union = pred_area + target_area - intersection
  return jnp.log(union + 1.) - jnp.log(intersection + 1.)


def detection_loss(*, outputs_detection, targets, alpha: float = 0.25, gamma: float = 2.) -> dict:
  """FCOS losses over all levels and the whole batch.

  Args:
    outputs_detection: tuple over levels of {'logits': (B, h, w), 'ltrb': (B, h, w, 4) pixels > 0,
      'centerness': (B, h, w) logit} (the model's `outputs['detection']`).
    targets: `detection_targets(...)` for the same levels.
    alpha, gamma: focal loss parameters.

  Returns:
    {'focal', 'iou', 'centerness'} scalars; each is 0 (with zero gradient) when no location is positive.
  """
  if len(outputs_detection) != len(targets):
    raise ValueError(f'{len(outputs_detection)} output levels but {len(targets)} target levels')
  focal_total = iou_total = centerness_total = 0.
  positives = centerness_weight = 0.
  for output, target in zip(outputs_detection, targets):
    labels = target['labels']  # (B, h, w) bool
    if output['logits'].shape != labels.shape:
      raise ValueError(f'detection output {output["logits"].shape} != target {labels.shape}')
    weight = target['centerness']  # (B, h, w), 0 at negatives
    focal_total += jnp.sum(sigmoid_focal_loss(logits=output['logits'], labels=labels,
                                              alpha=alpha, gamma=gamma))
    # Negatives get a finite loss times weight 0: zero gradient, no NaN.
    iou_total += jnp.sum(weight * iou_loss(prediction=output['ltrb'], target=target['ltrb']))
    centerness_bce = segmentation.bce_with_logits(logits=output['centerness'], target=weight)
    centerness_total += jnp.sum(jnp.where(labels, centerness_bce, 0.))
    positives += jnp.sum(labels)
    centerness_weight += jnp.sum(weight)
  positives = jnp.maximum(positives, 1.)
  # Positive centerness targets are > 0, so a zero sum means no positives.
  centerness_weight = jnp.where(centerness_weight > 0, centerness_weight, 1.)
  return {'focal': focal_total / positives,
          'iou': iou_total / centerness_weight,
          'centerness': centerness_total / positives}
