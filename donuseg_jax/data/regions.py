"""Partial annotation: the regions of an image in which every nucleus was clicked.

A user rarely clicks every nucleus of a slide; in QuPath they draw a region (rectangle, ellipse,
freehand polygon) and click the nuclei inside it. Only that area is annotated: inside it an
unclicked pixel is background, outside it nothing is known. The region map is an (H, W) bool array,
True = annotated; an image without regions is annotated everywhere (region None).

A pixel belongs to a polygon when its centre does (the polygons are on the pixel-centre grid of
`batch.py`: pixel (i, j) is centred at (x, y) = (j, i)); a polygon's later rings are holes. The
regions of one image are the union of its polygons.

Instances and points are scored inside the regions only (`keep_inside`, `points_inside`): an
instance counts when at least half of its pixels lie inside (a nucleus cut by the region border
belongs to the side that holds most of it).
"""

import numpy as np
import skimage.draw

from donuseg_jax.data import pseudo_labels


def region_mask(polygons, shape) -> np.ndarray:
  """(H, W) bool: pixels whose centre lies inside some polygon (outer ring less its holes)."""
  height, width = shape[:2]
  mask = np.zeros((height, width), bool)
  for rings in polygons:
    inside = np.zeros((height, width), bool)
    for index, ring in enumerate(rings):
      ring = np.asarray(ring, np.float64).reshape(-1, 2)
      rows, cols = skimage.draw.polygon(ring[:, 1], ring[:, 0], shape=(height, width))
      filled = np.zeros((height, width), bool)
      filled[rows, cols] = True
      inside = inside | filled if index == 0 else inside & ~filled
    mask |= inside
  return mask


def points_inside(points: np.ndarray, region: np.ndarray | None) -> np.ndarray:
  """(K,) bool: which points fall in an annotated pixel (all of them when region is None).

  Points must lie inside the image (`points.check_points_inside`).
  """
  points = np.asarray(points, np.float32).reshape(-1, 2)
  if region is None:
    return np.ones((len(points),), bool)
  pixels = pseudo_labels.point_pixels(points)  # (K, 2) row, col
  return np.asarray(region, bool)[pixels[:, 0], pixels[:, 1]]


def keep_inside(instances: np.ndarray, region: np.ndarray | None) -> np.ndarray:
  """The label map with every instance that lies mostly outside the region set to 0.

  Ids are kept (not renumbered); an instance counts as inside when at least half of its pixels
  are annotated. Pixels of kept instances outside the region stay as they are.
  """
  instances = np.asarray(instances)
  if region is None:
    return instances
  region = np.asarray(region, bool)
  if region.shape != instances.shape:
    raise ValueError(f'region {region.shape} does not match instances {instances.shape}')
  flat = instances.ravel().astype(np.int64)
  if not flat.size or flat.max() <= 0:
    return instances
  total = np.bincount(flat)
  inside = np.bincount(flat, weights=region.ravel(), minlength=len(total))
  outside_ids = np.nonzero((total > 0) & (2 * inside < total))[0]
  outside_ids = outside_ids[outside_ids > 0]
  return np.where(np.isin(instances, outside_ids), 0, instances).astype(instances.dtype)


def annotated_fraction(region: np.ndarray | None) -> float:
  """Share of the image's pixels that are annotated (1 without regions)."""
  return 1.0 if region is None else float(np.mean(region))
