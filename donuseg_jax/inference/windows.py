"""Sliding-window prediction over whole images of any size: tiling, batching, blending, detections.

Layout along each axis: the image is reflect-padded by a margin of (window - stride) // 2 before it
and by enough after it that windows at `stride` cover it; an image smaller than a window is padded
up to one window. The margin keeps every real pixel away from the outer window edges, where the
network sees little context.

Two ways to choose the windows (config.eval.windows, `window_settings`):
- 'fixed': config.eval.window / stride with 'hann' blending, the original setting (window 256,
  stride 128: every pixel is computed about 4 times).
- 'throughput' (the default, also for run configs saved before the field existed): square windows
  with a margin of config.eval.margin on each side (stride = window - 2 * margin), whose side (a
  multiple of 64, the coarsest detection stride, up to config.eval.max_window) is the one that
  covers the image with the fewest network pixels: a 512 x 512 tile gets one 576 window, a
  1000 x 1000 image four of 576, a slide windows of 1024 (each pixel computed about 1.14 times: 3.5x
  fewer network pixels than 256 / 128, which computes each about 4 times). 'ramp' blending.

Blending (`blend_weights`): each window's probabilities are weighted by a separable profile and the
stitched map is the weighted sum divided by the summed weights, so a network whose output does not
depend on the window position is reproduced exactly.
- 'hann': sin^2 (periodic Hann), a partition of unity at stride = window / 2, with a small floor so
  that every pixel has a positive weight for any stride.
- 'ramp': with overlap o = window - stride, the outer o/4 of each window edge gets weight 0 (cropped:
  the network saw too little context there), the next o/2 rises linearly to 1 and the rest is 1.
  Neighbouring ramps sum to 1 (a partition of unity at any stride), so there are no seams.
- 'crop': weight 1 on the window's own core (the stride x stride centre), 0 elsewhere: hard tiles
  whose cropped margins gave context only.

Detections: a window keeps only the FCOS locations in its own core (the stride x stride square
around its centre; border windows also own the padding beyond it), so each image location is decoded
by exactly one window, the one that sees it with the most context. The global NMS afterwards
merges the boxes of one nucleus found at neighbouring locations owned by different windows.
"""

import math
import time
from typing import Callable, NamedTuple

import numpy as np
from scipy import special

from donuseg_jax.inference import detections as detections_lib

WEIGHT_FLOOR = 1e-3  # smallest blending weight (relative to 1 at the window centre)


class AxisLayout(NamedTuple):
  """Windows along one axis, in padded coordinates (padded = image + before)."""
  before: int  # reflect padding before the image
  after: int  # reflect padding after the image
  starts: np.ndarray  # (n,) int window starts
  window: int  # window side

  @property
  def padded(self) -> int:
    return int(self.starts[-1]) + self.window


def axis_layout(length: int, *, window: int, stride: int) -> AxisLayout:
  """Window starts covering `length` pixels plus the margins, at `stride`."""
  if length < 1:
    raise ValueError(f'cannot tile an axis of length {length}')
  if not 0 < stride <= window:
    raise ValueError(f'need 0 < stride <= window, got stride {stride}, window {window}')
  before = (window - stride) // 2
  needed = max(window, length + 2 * before)
  count = math.ceil((needed - window) / stride) + 1
  padded = window + (count - 1) * stride
  starts = np.arange(count, dtype=np.int64) * stride
  return AxisLayout(before=before, after=padded - before - length, starts=starts, window=window)


def core_owner(position: np.ndarray, layout: AxisLayout, *, stride: int) -> np.ndarray:
  """Index of the window whose core holds each padded-coordinate position (border cores extend)."""
  index = np.floor((np.asarray(position) - layout.before) / stride).astype(np.int64)
  return np.clip(index, 0, len(layout.starts) - 1)


def blend_profile(window: int, stride: int, blend: str) -> np.ndarray:
  """(window,) float64 weights along one axis (module docstring: 'hann' | 'ramp' | 'crop')."""
  t = np.arange(window, dtype=np.float64) + 0.5  # pixel centres
  if blend == 'hann':
    return np.maximum(np.sin(np.pi * t / window) ** 2, WEIGHT_FLOOR)
  overlap = window - stride
  if blend not in ('ramp', 'crop'):
    raise ValueError(f"unknown blend {blend!r}: hann | ramp | crop")
  if overlap == 0:
    return np.ones(window)
  width = overlap / 2 if blend == 'ramp' else 0.0
  start = (overlap - width) / 2  # the rise is centred in the overlap: g(t) + g(overlap - t) = 1
  distance = np.minimum(t, window - t)  # to the nearer window edge
  if width == 0:  # >=: with an odd overlap the middle pixel belongs to both (normalised later)
    return (distance >= start).astype(np.float64)
  return np.clip((distance - start) / width, 0.0, 1.0)


def blend_weights(window: int, stride: int | None = None, blend: str = 'hann') -> np.ndarray:
  """(window, window) float32 separable weights (module docstring); stride only for ramp / crop."""
  w = blend_profile(window, window // 2 if stride is None else stride, blend)
  return np.outer(w, w).astype(np.float32)


class WindowSettings(NamedTuple):
  window: int
  stride: int
  blend: str
  batch_size: int


DETECTION_QUANTUM = 64  # window sides are multiples of the coarsest detection stride (P6)


def window_settings(ev, height: int, width: int) -> WindowSettings:
  """The windows for an (height, width) image under config.eval `ev` (module docstring).

  In 'throughput' mode the batch holds as many windows as config.eval.batch_size windows of
  config.eval.window pixels would (at least 1), and never more windows than the image needs.
  """
  mode = ev.windows
  if mode == 'fixed':
    return WindowSettings(int(ev.window), int(ev.stride), 'hann', int(ev.batch_size))
  if mode != 'throughput':
    raise ValueError(f'unknown eval.windows {mode!r}: throughput | fixed')
  margin = int(ev.margin)
  largest = int(ev.max_window)
  if largest % DETECTION_QUANTUM or largest <= 2 * margin or margin < 0:
    raise ValueError(f'eval.max_window {largest} must be a multiple of {DETECTION_QUANTUM} and '
                     f'larger than 2 * eval.margin ({2 * margin})')
  best = None
  for window in range(largest, 2 * margin, -DETECTION_QUANTUM):  # the fewest network pixels
    stride = window - 2 * margin
    count = (len(axis_layout(height, window=window, stride=stride).starts)
             * len(axis_layout(width, window=window, stride=stride).starts))
    if best is None or count * window ** 2 < best[0]:
      best = (count * window ** 2, window, stride, count)
  _, window, stride, count = best
  budget = int(ev.batch_size) * int(ev.window) ** 2  # pixels per device call, as 'fixed' has
  batch = max(1, min(budget // window ** 2, count))
  return WindowSettings(window, stride, ev.blend, batch)


def pad_image(image: np.ndarray, rows: AxisLayout, cols: AxisLayout) -> np.ndarray:
  """Reflect padding (mirror without repeating the edge pixel; repeats for 1-pixel axes)."""
  return np.pad(image, ((rows.before, rows.after), (cols.before, cols.after), (0, 0)), mode='reflect')


PredictWindows = Callable[[np.ndarray], dict]


def predict_sliding(image: np.ndarray, *, predict_windows: PredictWindows, window: int, stride: int,
                    batch_size: int, score_threshold: float, max_detections: int,
                    core_only: bool = True, blend: str = 'hann', timer: dict | None = None):
  """Stitched probability map and image-coordinate detections (before NMS) of one image.

  image: (H, W, 3) uint8. predict_windows: (b, window, window, 3) uint8 -> {'segmentation':
  (b, window, window) logits, 'detection': tuple of levels}; it always gets exactly `batch_size`
  windows (the last batch is padded with black windows) so a jitted forward compiles once.
  Returns (probability (H, W) float32, Detections in image coordinates, unsorted).
  `timer`, if given, accumulates the seconds spent inside `predict_windows` under 'network'.
  `blend`: 'hann' | 'ramp' | 'crop' (module docstring).
  """
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f'expected an (H, W, 3) image, got shape {image.shape}')
  height, width = image.shape[:2]
  rows = axis_layout(height, window=window, stride=stride)
  cols = axis_layout(width, window=window, stride=stride)
  padded = pad_image(image, rows, cols)  # (Hp, Wp, 3)
  origins = np.stack(np.meshgrid(rows.starts, cols.starts, indexing='ij'), -1).reshape(-1, 2)
  profile = blend_profile(window, stride, blend)  # (win,)
  weights = np.outer(profile, profile).astype(np.float32)  # (win, win)
  prob_sum = np.zeros(padded.shape[:2], np.float32)  # (Hp, Wp)
  found = []

  def window_batch(k):
    batch = np.zeros((batch_size, window, window, 3), np.uint8)
    for n, (r, c) in enumerate(origins[k:k + batch_size]):
      batch[n] = padded[r:r + window, c:c + window]
    return batch

  def call(batch):
    start = time.perf_counter()
    outputs = predict_windows(batch)
    if timer is not None:  # force the (possibly asynchronous) device work to finish for timing
      outputs = {'segmentation': np.asarray(outputs['segmentation']),
                 'detection': [{k: np.asarray(v) for k, v in level.items()}
                               for level in outputs['detection']]}
      timer['network'] = timer.get('network', 0.0) + time.perf_counter() - start
    return outputs

  starts = list(range(0, len(origins), batch_size))
  pending = call(window_batch(0))
  for n, k in enumerate(starts):
    outputs = pending
    if n + 1 < len(starts):  # dispatch the next batch before the host works on this one
      pending = call(window_batch(starts[n + 1]))
    count = min(batch_size, len(origins) - k)
    probs = np.array(outputs['segmentation'][:count], np.float32)  # (b, win, win), writable
    special.expit(probs, out=probs)
    decoded = detections_lib.decode_detections(outputs['detection'], window=window,
                                               score_threshold=score_threshold,
                                               max_detections=max_detections)
    for m in range(count):
      r, c = origins[k + m]
      probs[m] *= weights
      prob_sum[r:r + window, c:c + window] += probs[m]
      found.append(_to_image(decoded[m], r, c, rows, cols, stride=stride, core_only=core_only,
                             height=height, width=width))
  top, left = rows.before, cols.before
  # The weights are separable and the windows a grid, so their sum is an outer product too.
  row_sum, col_sum = axis_weight_sum(rows, profile), axis_weight_sum(cols, profile)
  probability = prob_sum[top:top + height, left:left + width]
  probability /= np.outer(row_sum[top:top + height], col_sum[left:left + width]).astype(np.float32)
  return probability, detections_lib.concatenate(found)


def axis_weight_sum(layout: AxisLayout, profile: np.ndarray) -> np.ndarray:
  """(padded,) float64: the blending profiles of all windows of one axis, summed."""
  total = np.zeros(layout.padded)
  for start in layout.starts:
    total[start:start + layout.window] += profile
  return total


def _to_image(found: detections_lib.Detections, r: int, c: int, rows: AxisLayout, cols: AxisLayout,
              *, stride: int, core_only: bool, height: int, width: int) -> detections_lib.Detections:
  """Window detections -> image coordinates; drops locations outside the image (or the core)."""
  if not len(found.scores):
    return found
  loc_x = found.locations[:, 0] + c  # padded coordinates
  loc_y = found.locations[:, 1] + r
  keep = ((loc_x >= cols.before) & (loc_x < cols.before + width)
          & (loc_y >= rows.before) & (loc_y < rows.before + height))
  if core_only:
    keep &= (core_owner(loc_y, rows, stride=stride) == np.searchsorted(rows.starts, r))
    keep &= (core_owner(loc_x, cols, stride=stride) == np.searchsorted(cols.starts, c))
  shift = np.array([c - cols.before, r - rows.before], np.float32)
  boxes = found.boxes[keep] + np.tile(shift, 2)
  # Boxes may reach into the mirrored margin; clip them to the image's continuous extent.
  boxes[:, 0::2] = np.clip(boxes[:, 0::2], -0.5, width - 0.5)
  boxes[:, 1::2] = np.clip(boxes[:, 1::2], -0.5, height - 0.5)
  return detections_lib.Detections(boxes, found.scores[keep], found.locations[keep] + shift)
