"""FCOS outputs to scored boxes, and the greedy NMS that merges the boxes of all windows (host, NumPy).

Decoding follows DESIGN.md section 4 ([code]): keep locations whose class probability is above the
threshold, score = sqrt(class probability * sigmoid(centerness)), box = location -/+ ltrb, where the
location of cell (i, j) at stride s is (x, y) = (j*s + s//2, i*s + s//2). Boxes are continuous
(x0, y0, x1, y1) with pixel (i, j)'s centre at (x=j, y=i), as in the training batch.
"""

from typing import NamedTuple, Sequence

import numpy as np
from scipy import special


class Detections(NamedTuple):
  """Scored boxes of one window or image; all three arrays share their first axis."""
  boxes: np.ndarray  # (K, 4) float32 x0, y0, x1, y1
  scores: np.ndarray  # (K,) float32 in [0, 1]
  locations: np.ndarray  # (K, 2) float32 (x, y) of the FCOS location that produced each box


def empty_detections() -> Detections:
  return Detections(np.zeros((0, 4), np.float32), np.zeros((0,), np.float32),
                    np.zeros((0, 2), np.float32))


def decode_detections(detection: Sequence[dict], *, window: int, score_threshold: float,
                      max_detections: int) -> list[Detections]:
  """Per-window detections from the head's outputs for a batch of (window x window) inputs.

  `detection` is the model's tuple over pyramid levels of {'logits': (B,h,w), 'ltrb': (B,h,w,4),
  'centerness': (B,h,w)}. A level's stride is read from its shape (window // h), so any subset of
  levels decodes. Each window keeps at most `max_detections` boxes, the best-scored ones.
  """
  per_level = []
  batch = None
  for level in detection:
    logits = np.asarray(level['logits'], np.float32)  # (B, h, w)
    batch, h, w = logits.shape
    stride = window // h
    if stride * h != window or stride * w != window:
      raise ValueError(f'detection level of shape {(h, w)} does not tile a {window} window')
    prob = special.expit(logits)
    b, i, j = np.nonzero(prob > score_threshold)
    if b.size == 0:
      continue
    centerness = special.expit(np.asarray(level['centerness'], np.float32)[b, i, j])
    ltrb = np.asarray(level['ltrb'], np.float32)[b, i, j]  # (k, 4)
    x = (j * stride + stride // 2).astype(np.float32)
    y = (i * stride + stride // 2).astype(np.float32)
    boxes = np.stack([x - ltrb[:, 0], y - ltrb[:, 1], x + ltrb[:, 2], y + ltrb[:, 3]], axis=1)
    scores = np.sqrt(prob[b, i, j] * centerness)
    finite = np.isfinite(boxes).all(axis=1)  # an overflowing exp() in an untrained head
    per_level.append((b[finite], boxes[finite], scores[finite], np.stack([x, y], axis=1)[finite]))
  if batch is None:
    raise ValueError('no detection levels given')
  if not per_level:
    return [empty_detections() for _ in range(batch)]
  b, boxes, scores, locations = (np.concatenate(parts) for parts in zip(*per_level))
  # One sort for the whole batch: by window, then by descending score (stable: ties keep level order).
  order = np.lexsort((-scores, b))
  b, boxes, scores, locations = b[order], boxes[order], scores[order], locations[order]
  starts = np.searchsorted(b, np.arange(batch + 1))
  out = []
  for k in range(batch):
    sl = slice(starts[k], min(starts[k + 1], starts[k] + max_detections))
    out.append(Detections(boxes[sl].astype(np.float32), scores[sl].astype(np.float32),
                          locations[sl].astype(np.float32)))
  return out


def concatenate(parts: Sequence[Detections]) -> Detections:
  parts = [p for p in parts if len(p.scores)]
  if not parts:
    return empty_detections()
  return Detections(*(np.concatenate(arrays) for arrays in zip(*parts)))


def box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
  """IoU of one box (4,) with each of boxes (K, 4); continuous areas (x1 - x0) * (y1 - y0)."""
  return pair_iou(np.broadcast_to(box, boxes.shape), boxes)


def pair_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Row-wise IoU of boxes a (P, 4) and b (P, 4); 0 where the union is empty."""
  ix = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
  iy = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
  inter = ix * iy
  union = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]) + (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) - inter
  return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def overlapping_pairs(boxes: np.ndarray, *, chunk_pairs: int = 1 << 22):
  """Yields (i, j) index arrays of box pairs whose x-extents overlap (each unordered pair once).

  Sweep along x: after sorting by x0, box i can only overlap the boxes that start before its x1,
  a contiguous run found by searchsorted. Chunked so that memory stays bounded for dense inputs.
  """
  count = len(boxes)
  order = np.argsort(boxes[:, 0], kind='stable')
  starts = boxes[order, 0]
  ends = np.searchsorted(starts, boxes[order, 2], side='left')  # (K,) first box starting at/after x1
  runs = np.maximum(ends - np.arange(1, count + 1), 0)  # (K,) partners after each box
  total = np.cumsum(runs)
  first = 0
  while first < count:
    budget = (total[first - 1] if first else 0) + chunk_pairs
    last = max(int(np.searchsorted(total, budget, side='right')), first + 1)
    rows = np.arange(first, last)
    lengths = runs[first:last]
    i = np.repeat(rows, lengths)
    offsets = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    yield order[i], order[i + 1 + offsets]
    first = last


def nms(boxes: np.ndarray, scores: np.ndarray, *, iou_threshold: float) -> np.ndarray:
  """Greedy NMS: indices of the kept boxes, best score first; a box is dropped if its IoU with a
  better kept box is > threshold (the classic definition, torchvision's tie order).

  The overlapping pairs are found once by a sweep along x (`overlapping_pairs`), so the greedy pass
  is a loop over boxes with precomputed neighbour lists rather than K vectorised IoU rows: linear
  in K for nuclei-sized boxes instead of quadratic.
  """
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  scores = np.asarray(scores, np.float64).reshape(-1)
  count = len(scores)
  order = np.argsort(-scores, kind='stable')
  rank = np.empty(count, np.int64)
  rank[order] = np.arange(count)
  better, worse = [], []
  for i, j in overlapping_pairs(boxes):
    hit = pair_iou(boxes[i], boxes[j]) > iou_threshold
    i, j = i[hit], j[hit]
    swap = rank[i] > rank[j]
    better.append(np.where(swap, j, i))
    worse.append(np.where(swap, i, j))
  better = np.concatenate(better) if better else np.zeros(0, np.int64)
  worse = np.concatenate(worse) if worse else np.zeros(0, np.int64)
  # CSR neighbour lists: for each box, the worse boxes it suppresses if kept.
  by_better = np.argsort(better, kind='stable')
  worse = worse[by_better]
  bounds = np.searchsorted(better[by_better], np.arange(count + 1))
  suppressed = np.zeros(count, bool)
  keep = []
  for box in order:
    if suppressed[box]:
      continue
    keep.append(box)
    if bounds[box + 1] > bounds[box]:
      suppressed[worse[bounds[box]:bounds[box + 1]]] = True
  return np.asarray(keep, np.int64)


def select(detections: Detections, index: np.ndarray) -> Detections:
  return Detections(*(a[index] for a in detections))
