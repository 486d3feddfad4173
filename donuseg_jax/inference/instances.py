"""Instance label maps from a foreground probability map and scored boxes (host, NumPy/SciPy).

Two methods (config.eval.instance_method):
- `boxes`, the authors' assembly ([code], DESIGN.md section 4): fill the holes of the foreground;
  visit the boxes by descending score; inside each box take the largest 4-connected component of the
  foreground not yet claimed, give it the next id and remove it from the foreground. Foreground that
  no box claims is dropped. Then a 3x3 closing per instance, in id (score) order, which may only add
  background pixels: it smooths each outline but never merges, overwrites or renumbers instances.
  With `grow` > 0 (config.eval.grow_px, beyond the authors' code), before the closing, foreground
  that no box claimed is flooded from the claimed instances, through the foreground only and at
  most `grow` pixels (Euclidean) from them: a box smaller than its nucleus no longer clips the
  nucleus's mask, while a foreground blob that touches no instance stays dropped.
  With `unclaimed` > 0 (config.eval.unclaimed_min_px, beyond the authors' code), after the growth,
  each 4-connected component of foreground still unclaimed and of at least `unclaimed` pixels
  becomes an instance of its own, with score 0 (no detection): a nucleus the segmentation head
  finds but no box above the score threshold covers is kept instead of dropped.
- `watershed`: one marker per box centre that lies on the (hole-filled) foreground, the best-scored
  box winning a shared pixel; the foreground is flooded from the markers over minus the distance
  transform (or minus the probability). Foreground components with no marker are dropped.

- `cells` (beyond the authors' code): the `watershed` partition of the foreground bounds the
  `boxes` assembly. Each box whose centre lies on the foreground owns the watershed cell of its
  centre; visiting boxes by descending score, an instance is the largest 4-connected component of
  the unclaimed foreground inside both its box and its cell, so a well-scored box can no longer
  take the part of a touching neighbour that its rectangle overlaps. A box with no cell (centre
  off the foreground, or a shared pixel lost to a better box) claims as in `boxes`. Then the same
  growth, leftover blobs and closing as `boxes`.

All return (instances (H, W) int32 with ids 1..K in descending score order, scores (K,) float32).
Box pixels: pixel (i, j) (centre x=j, y=i) lies in box (x0, y0, x1, y1) if x0 <= j <= x1, y0 <= i <= y1.
"""

import math

import numpy as np
from scipy import ndimage
from skimage import segmentation

FOREGROUND_THRESHOLD = 0.5  # a pixel is nucleus where the sigmoid probability is above this
_CROSS = ndimage.generate_binary_structure(2, 1)  # 4-connectivity


def foreground_mask(prob_or_mask: np.ndarray, *, threshold: float = FOREGROUND_THRESHOLD) -> np.ndarray:
  """(H, W) bool: a boolean mask as given, else probability > threshold; holes filled."""
  prob_or_mask = np.asarray(prob_or_mask)
  if prob_or_mask.ndim != 2:
    raise ValueError(f'expected an (H, W) map, got shape {prob_or_mask.shape}')
  mask = prob_or_mask if prob_or_mask.dtype == bool else prob_or_mask > threshold
  return fill_holes(mask)


def fill_holes(mask: np.ndarray) -> np.ndarray:
  """ndimage.binary_fill_holes(mask), in one labelling pass instead of a dilation to convergence:
  a hole is a 4-connected background component that does not touch the image border."""
  background, count = ndimage.label(~mask, structure=_CROSS)
  if count == 0:
    return mask.copy()
  outside = np.zeros(count + 1, bool)
  for edge in (background[0], background[-1], background[:, 0], background[:, -1]):
    outside[edge] = True
  outside[0] = True  # label 0: the mask itself
  return ~outside[background] | mask


def box_pixel_slices(box: np.ndarray, shape: tuple) -> tuple[slice, slice] | None:
  """Row and column slices of the pixels whose centres lie in the box, clipped; None if empty."""
  x0, y0, x1, y1 = (float(v) for v in box)
  c0, c1 = max(math.ceil(x0), 0), min(math.floor(x1), shape[1] - 1)
  r0, r1 = max(math.ceil(y0), 0), min(math.floor(y1), shape[0] - 1)
  if c1 < c0 or r1 < r0:
    return None
  return slice(r0, r1 + 1), slice(c0, c1 + 1)


def instances_from_boxes(prob_or_mask: np.ndarray, boxes: np.ndarray, scores: np.ndarray, *,
                         threshold: float = FOREGROUND_THRESHOLD, closing: bool = True,
                         grow: float = 0.0, unclaimed: int = 0, cells: bool = False):
  """The `boxes` assembly (module docstring), or with `cells` the `cells` one.
  boxes (K, 4) x0, y0, x1, y1; scores (K,)."""
  remaining = foreground_mask(prob_or_mask, threshold=threshold)  # (H, W) bool, not yet claimed
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  scores = np.asarray(scores, np.float32).reshape(-1)
  instances = np.zeros(remaining.shape, np.int32)
  partition, cell_of_box = None, np.zeros(len(scores), np.int32)  # cell 0: none
  if cells:
    partition, cell_of_box = watershed_cells(remaining, boxes, scores)
  kept_scores = []
  for k in np.argsort(-scores, kind='stable'):
    slices = box_pixel_slices(boxes[k], remaining.shape)
    if slices is None:
      continue
    crop = remaining[slices]
    allowed = crop if cell_of_box[k] == 0 else crop & (partition[slices] == cell_of_box[k])
    components, count = ndimage.label(allowed, structure=_CROSS)
    if count == 0:
      continue
    sizes = np.bincount(components.ravel(), minlength=count + 1)[1:]
    part = components == (np.argmax(sizes) + 1)  # ties: the first component in raster order
    kept_scores.append(scores[k])
    instances[slices][part] = len(kept_scores)
    crop[part] = False  # a view: removes the claimed pixels from `remaining`
  if grow > 0:
    grow_into(instances, remaining, distance=grow)
  if unclaimed > 0:
    kept_scores.extend(claim_leftovers(instances, remaining & (instances == 0), min_size=unclaimed))
  if closing:
    close_instances(instances)
  return instances, np.asarray(kept_scores, np.float32)


def watershed_cells(mask: np.ndarray, boxes: np.ndarray, scores: np.ndarray):
  """The `watershed` partition of `mask` from the box centres: ((H, W) int32 cell ids, 0 off the
  mask; (K,) int32 the cell of each box, 0 where its centre is off the mask or taken by a box
  of a better score)."""
  markers = np.zeros(mask.shape, np.int32)
  cell_of_box = np.zeros(len(scores), np.int32)
  for k in np.argsort(-scores, kind='stable'):
    row, col = box_centre_pixel(boxes[k], mask.shape)
    if mask[row, col] and markers[row, col] == 0:
      cell_of_box[k] = markers[row, col] = k + 1
  if not cell_of_box.any():
    return np.zeros(mask.shape, np.int32), cell_of_box
  height = -ndimage.distance_transform_edt(mask)
  return segmentation.watershed(height, markers, mask=mask).astype(np.int32), cell_of_box


def box_centre_pixel(box: np.ndarray, shape: tuple) -> tuple[int, int]:
  """(row, column) of the pixel nearest the box centre, clipped to the image."""
  col = int(np.clip(np.rint((box[0] + box[2]) / 2), 0, shape[1] - 1))
  row = int(np.clip(np.rint((box[1] + box[3]) / 2), 0, shape[0] - 1))
  return row, col


def grow_into(instances: np.ndarray, free: np.ndarray, *, distance: float) -> None:
  """In place: gives the `free` pixels within `distance` of an instance, reached through free
  pixels only, to the instance whose flood (over the distance to the nearest instance) gets there
  first. Free pixels farther away, or cut off from every instance, stay background."""
  if not free.any() or not instances.any():
    return
  away = ndimage.distance_transform_edt(instances == 0)  # (H, W) to the nearest instance pixel
  reach = (free & (away <= distance)) | (instances > 0)
  grown = segmentation.watershed(away, instances, mask=reach)
  instances[free & reach] = grown[free & reach]


def claim_leftovers(instances: np.ndarray, free: np.ndarray, *, min_size: int) -> list[float]:
  """In place: each 4-connected component of `free` with at least `min_size` pixels becomes a new
  instance (ids after the existing ones, in raster order of the components). Returns their
  scores: 0.0 each, for no detection scored them."""
  components, count = ndimage.label(free, structure=_CROSS)
  if count == 0:
    return []
  sizes = np.bincount(components.ravel(), minlength=count + 1)
  sizes[0] = 0
  big = np.flatnonzero(sizes >= min_size)
  new_ids = np.zeros(count + 1, np.int32)
  new_ids[big] = instances.max() + 1 + np.arange(big.size, dtype=np.int32)
  taken = new_ids[components] > 0
  instances[taken] = new_ids[components][taken]
  return [0.0] * big.size


def close_instances(instances: np.ndarray) -> None:
  """In place: 3x3 binary closing of each instance, in id order, adding background pixels only.

  Equivalent to closing each instance's own mask in turn and giving it the still-background pixels
  of its closing, but vectorised: a background pixel p lies in closing(A) iff every 3x3 square
  that contains p meets A, so p goes to the lowest id k among its 3x3 neighbours for which each of
  the nine squares around p holds a pixel of k (a 5x5 neighbourhood test). Only pixels in the
  closing of the whole foreground can qualify (closing is increasing). Outside the image counts
  as background.
  """
  padded = np.pad(instances, 2)  # (H + 4, W + 4)
  foreground = padded > 0
  closed = _square_erosion(_square_dilation(foreground))  # binary_closing, 3x3 square
  rows, cols = np.nonzero(closed & ~foreground)
  if rows.size == 0:
    return
  dy, dx = np.mgrid[-2:3, -2:3]
  top = np.iinfo(np.int32).max
  for start in range(0, rows.size, 1 << 16):  # bounded memory for dense maps
    r, c = rows[start:start + (1 << 16)], cols[start:start + (1 << 16)]
    patch = padded[r[:, None, None] + dy, c[:, None, None] + dx]  # (P, 5, 5)
    choices = patch[:, 1:4, 1:4].reshape(len(r), 9)  # (P, 9) ids of the 3x3 neighbours
    low = np.where(choices > 0, choices, top).min(axis=1)
    single = low == choices.max(axis=1)  # one id around p (most outline pixels): test only it
    best = np.full(len(r), top, np.int64)
    for group, ids in ((single, low[single, None]), (~single, choices[~single])):
      if not group.any():
        continue
      same = patch[group][:, :, :, None] == ids[:, None, None, :]  # (p, 5, 5, k)
      inside = ids > 0
      for oy in range(3):
        for ox in range(3):  # the square centred at p + (oy - 1, ox - 1) must meet the instance
          inside &= same[:, oy:oy + 3, ox:ox + 3].any(axis=(1, 2))
      best[group] = np.where(inside, ids, top).min(axis=1)
    won = best < top
    instances[r[won] - 2, c[won] - 2] = best[won]


def _square_dilation(mask: np.ndarray) -> np.ndarray:
  """3x3 binary dilation as separable shifted ORs (outside = background)."""
  out = mask.copy()
  out[1:] |= mask[:-1]
  out[:-1] |= mask[1:]
  rows = out.copy()
  out[:, 1:] |= rows[:, :-1]
  out[:, :-1] |= rows[:, 1:]
  return out


def _square_erosion(mask: np.ndarray) -> np.ndarray:
  """3x3 binary erosion as separable shifted ANDs (outside = background, as scipy's default)."""
  out = mask.copy()
  out[1:] &= mask[:-1]
  out[:-1] &= mask[1:]
  out[[0, -1]] = False
  rows = out.copy()
  out[:, 1:] &= rows[:, :-1]
  out[:, :-1] &= rows[:, 1:]
  out[:, [0, -1]] = False
  return out


def instances_from_watershed(prob_or_mask: np.ndarray, boxes: np.ndarray, scores: np.ndarray, *,
                             threshold: float = FOREGROUND_THRESHOLD, surface: str = 'distance'):
  """The `watershed` method (module docstring). surface: 'distance' | 'probability'."""
  prob_or_mask = np.asarray(prob_or_mask)
  mask = foreground_mask(prob_or_mask, threshold=threshold)
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  scores = np.asarray(scores, np.float32).reshape(-1)
  markers = np.zeros(mask.shape, np.int32)
  kept_scores = []
  for k in np.argsort(-scores, kind='stable'):
    row, col = box_centre_pixel(boxes[k], mask.shape)
    if mask[row, col] and markers[row, col] == 0:
      kept_scores.append(scores[k])
      markers[row, col] = len(kept_scores)
  if not kept_scores:
    return np.zeros(mask.shape, np.int32), np.zeros((0,), np.float32)
  if surface == 'distance':
    height = -ndimage.distance_transform_edt(mask)
  elif surface == 'probability':
    if prob_or_mask.dtype == bool:
      raise ValueError("surface='probability' needs a probability map, not a mask")
    height = -prob_or_mask.astype(np.float64)
  else:
    raise ValueError(f'unknown watershed surface {surface!r}: distance | probability')
  instances = segmentation.watershed(height, markers, mask=mask).astype(np.int32)
  return instances, np.asarray(kept_scores, np.float32)


def assemble_instances(probability: np.ndarray, boxes: np.ndarray, scores: np.ndarray, *,
                       method: str, grow: float = 0.0, unclaimed: int = 0):
  """Dispatches on config.eval.instance_method: 'boxes' or 'cells' (with config.eval.grow_px and
  config.eval.unclaimed_min_px) | 'watershed'."""
  if method in ('boxes', 'cells'):
    return instances_from_boxes(probability, boxes, scores, grow=grow, unclaimed=unclaimed,
                                cells=method == 'cells')
  if method == 'watershed':
    return instances_from_watershed(probability, boxes, scores)
  raise ValueError(f'unknown eval.instance_method {method!r}: boxes | cells | watershed')
