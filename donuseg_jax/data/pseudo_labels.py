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


INITIAL_LABELS = ('disks', 'watershed')


def hematoxylin_regions(image: np.ndarray, points: np.ndarray, *, cap: float = 20.,
                        sigma: float = 1., core: float = 2.) -> np.ndarray:
  """One region per point, grown over the hematoxylin-rich pixels around it: (H, W) int32 labels.

  Colour deconvolution (Ruifrok & Johnston, `skimage.color.rgb2hed`) gives the hematoxylin
  density; smoothed (Gaussian, `sigma`) and thresholded by Otsu it marks nuclear chromatin. A
  watershed of the inverted density, flooded from each point's pixel, splits that mask between
  the points; each region is limited to pixels within `cap` of some point (a stain-dark area with
  one click never grows into a large blob) and always holds the disk of radius `core` around its
  point (a click on a pale nucleus still labels its centre). Label i + 1 belongs to points[i];
  pixels of no region are 0. Points must lie inside the image.
  """
  from skimage import color, filters, segmentation as skseg  # noqa: PLC0415 (only for this label)

  image = np.asarray(image)
  height, width = image.shape[:2]
  points = np.asarray(points, np.float32).reshape(-1, 2)
  if len(points) == 0:
    return np.zeros((height, width), np.int32)
  points_lib.check_points_inside(points, (height, width), 'hematoxylin_regions')
  density = filters.gaussian(color.rgb2hed(image[..., :3])[..., 0], sigma)
  stained = density > filters.threshold_otsu(density) if np.ptp(density) > 0 else np.zeros_like(
      density, bool)
  pixels = point_pixels(points)
  markers = np.zeros((height, width), np.int32)
  markers[pixels[:, 0], pixels[:, 1]] = np.arange(1, len(pixels) + 1)  # a repeated pixel: last wins
  dist = ndimage.distance_transform_edt(markers == 0)
  regions = skseg.watershed(-density, markers, mask=(stained & (dist <= cap)) | (dist <= core))
  return _fill_holes(regions)


def _fill_holes(regions: np.ndarray) -> np.ndarray:
  """Fills each region's holes: the pale chromatin of a vesicular nucleus is still nucleus."""
  filled = regions.copy()
  for index, window in enumerate(ndimage.find_objects(regions), start=1):
    if window is None:
      continue
    holes = ndimage.binary_fill_holes(regions[window] == index) & (regions[window] == 0)
    filled[window][holes] = index
  return filled


def watershed_label(image: np.ndarray, points: np.ndarray, *, cap: float = 20., sigma: float = 1.,
                    band: int = 3) -> np.ndarray:
  """Image-aware initial label M (int8, (H, W)), an alternative to the paper's r-disks.

  1 on the `hematoxylin_regions` of the points, -1 (ignored) on a `band`-pixel ring around them
  (where the stain threshold is least sure of the border), 0 beyond. On TNBC's fold-0 training
  images its foreground has a precision of 0.78 and a recall of 0.72 against the true masks
  (regions as instances: AJI 0.544), where r = 4 disks recall about 0.13. With no points every pixel is background, as for `initial_label`.
  """
  regions = hematoxylin_regions(image, points, cap=cap, sigma=sigma)
  foreground = regions > 0
  label = np.zeros(foreground.shape, np.int8)
  if band > 0:
    ring = ndimage.binary_dilation(foreground, structure=np.ones((3, 3), bool), iterations=band)
    label[ring] = batch_lib.IGNORE
  label[foreground] = 1
  return label


def make_initial_label(image: np.ndarray, points: np.ndarray, *, labels) -> np.ndarray:
  """Initial label M of one whole image as `labels` (config.labels) asks: 'disks' | 'watershed'."""
  height, width = np.asarray(image).shape[:2]
  if labels.initial == 'disks':
    return initial_label(points, (height, width), r=labels.r, d=labels.d)
  if labels.initial == 'watershed':
    return watershed_label(image, points, cap=labels.watershed_cap, sigma=labels.watershed_sigma,
                           band=labels.watershed_band)
  raise ValueError(f'unknown labels.initial {labels.initial!r}; expected one of {INITIAL_LABELS}')
