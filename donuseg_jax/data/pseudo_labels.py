"""Labels made from points, per whole image before any cropping: initial label M and pseudo boxes.

Pure NumPy/SciPy (DESIGN.md section 2). Coordinates follow `batch.py`: a point is (x, y) =
(column, row); pixel (i, j) has its centre at (x, y) = (j, i) and covers [j - 0.5, j + 0.5), so an
H x W image spans [-0.5, W - 0.5) x [-0.5, H - 0.5). A point belongs to the pixel
(floor(y + 0.5), floor(x + 0.5)) (round half up, the same rule everywhere in the data pipeline).
"""

import numpy as np
from scipy import ndimage
from scipy import spatial

from donuseg_jax.data import batch as batch_lib
from donuseg_jax.data import points as points_lib


def point_pixels(points: np.ndarray) -> np.ndarray:
  """(K, 2) float (x, y) -> (K, 2) int64 (row, column) of the pixel each point falls in."""
  points = np.asarray(points, np.float64).reshape(-1, 2)
  return np.floor(points[:, ::-1] + 0.5).astype(np.int64)


def initial_label(points: np.ndarray, shape: tuple[int, int], *, r: float = 4.,
                  d: float = 20.) -> np.ndarray:
  """Initial label M (int8, (H, W)): 1 where dist <= r, 0 where dist > d, -1 (ignored) between.

  dist is the Euclidean distance from each pixel centre to the pixel of its nearest point (an exact
  distance transform). With no points every pixel is background (0): such an image trains as
  background only.
  """
  height, width = shape[:2]
  points = np.asarray(points, np.float32).reshape(-1, 2)
  if len(points) == 0:
    return np.zeros((height, width), np.int8)
  points_lib.check_points_inside(points, (height, width), 'initial_label')
  pixels = point_pixels(points)
  not_point = np.ones((height, width), bool)
  not_point[pixels[:, 0], pixels[:, 1]] = False
  dist = ndimage.distance_transform_edt(not_point)  # (H, W) float64
  label = np.full((height, width), batch_lib.IGNORE, np.int8)
  label[dist <= r] = 1
  label[dist > d] = 0
  return label


def box_sides(points: np.ndarray, shape: tuple[int, int], *, ratio: float = 1.,
              range_split: float = 10, s_min: float = 6., s_max: float = 40.) -> np.ndarray:
  """LUDA box side per point ((K,) float64), Wang et al. TIP 2021, as their public code does it.

  - k <= 2 points: every side is max(H / (4 + k), 12).
  - otherwise: d_i = ratio * mean distance from point i to its 2 nearest neighbours; the local
    radius R = (max y - min y) / range_split; s_i = mean of d_j over the points j among the
    max(k // 2, 1) nearest to i (i itself included) that lie within R of i.
  Every side is then clipped to [s_min, s_max]: nuclei are small, and an image holding one point
  would otherwise get a box of a fifth of its height.
  """
  points = np.asarray(points, np.float64).reshape(-1, 2)
  count = len(points)
  if count == 0:
    return np.zeros((0,), np.float64)
  if count <= 2:
    sides = np.full((count,), max(shape[0] / (4. + count), 12.))
    return np.clip(sides, s_min, s_max)
  tree = spatial.cKDTree(points)
  # k as a list keeps 2-D results; column 0 is the point itself (distance 0).
  near_dist, _ = tree.query(points, k=[2, 3])  # (K, 2)
  local_d = ratio * near_dist.mean(axis=1)  # (K,)
  radius = (points[:, 1].max() - points[:, 1].min()) / range_split
  neighbours = max(count // 2, 1)
  dist, index = tree.query(points, k=list(range(1, neighbours + 1)))  # (K, n), (K, n), sorted
  # The public code takes the first `count within R` of the sorted neighbours: the same set.
  within = dist <= radius  # (K, n); column 0 (itself) is always True
  sides = (local_d[index] * within).sum(axis=1) / within.sum(axis=1)
  return np.clip(sides, s_min, s_max)


def pseudo_boxes(points: np.ndarray, shape: tuple[int, int], *, ratio: float = 1.,
                 range_split: float = 10, s_min: float = 6., s_max: float = 40.) -> np.ndarray:
  """LUDA pseudo boxes (K, 4) float32 (x0, y0, x1, y1): squares of side `box_sides` centred on the
  points, clipped to the image extent [-0.5, W - 0.5] x [-0.5, H - 0.5]."""
  height, width = shape[:2]
  points = np.asarray(points, np.float64).reshape(-1, 2)
  half = box_sides(points, shape, ratio=ratio, range_split=range_split, s_min=s_min,
                   s_max=s_max)[:, None] / 2.  # (K, 1)
  boxes = np.concatenate([points - half, points + half], axis=1)  # (K, 4)
  boxes[:, 0::2] = np.clip(boxes[:, 0::2], -0.5, width - 0.5)
  boxes[:, 1::2] = np.clip(boxes[:, 1::2], -0.5, height - 0.5)
  return boxes.astype(np.float32)
