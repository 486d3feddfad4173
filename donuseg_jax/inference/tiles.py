"""Tile-by-tile prediction of images of any size: peak memory set by the tile, not by the image.

The image is cut into cores (a grid of `tile` x `tile` squares, shorter at the right and bottom);
each core is predicted as a region that extends it by a `halo` on every side (clipped at the image
border, where the windows pad by reflection exactly as for a whole image). The halo gives the
windows real context at the core's edge and holds the part of a nucleus that crosses it.

Ownership: an instance is produced by the tile whose core holds its centroid (the mean of its
pixel centres, rounded to a pixel). Cores partition the image, so an instance found alike by two
neighbouring tiles is produced once; a nucleus smaller than the halo that crosses a core border
lies wholly inside both regions, so it is never cut. An owned instance that still touches its
region's edge inside the image (a nucleus larger than the halo) is counted as `cut`.

Only one region's image, probability map and label map exist at a time; instances leave as small
crops (`Instance`), so a caller can stream them to disk.
"""

import math
import time
from typing import Iterator, NamedTuple

import ml_collections
import numpy as np
from scipy import ndimage

from donuseg_jax.inference import predictor


class ArraySource:
  """An in-memory (H, W, 3) uint8 image behind the region-reading interface of large images."""

  def __init__(self, image: np.ndarray):
    self.image = predictor.check_image(image)
    self.shape = self.image.shape[:2]

  def read(self, row: int, col: int, rows: int, cols: int) -> np.ndarray:
    return self.image[row:row + rows, col:col + cols]


class Tile(NamedTuple):
  """A core and its region, as (row0, row1, col0, col1) half-open image rows and columns."""
  core: tuple[int, int, int, int]
  region: tuple[int, int, int, int]


class Instance(NamedTuple):
  """One nucleus: a boolean crop of its pixels placed at (row, col) of the image."""
  row: int
  col: int
  mask: np.ndarray  # (h, w) bool
  score: float


class TileResult(NamedTuple):
  tile: Tile
  image: np.ndarray  # (h, w, 3) uint8 of the region
  instances: list  # [Instance] owned by this tile, in descending score
  cut: int  # owned instances that touch the region's edge inside the image


def axis_cuts(length: int, tile: int) -> np.ndarray:
  """Core boundaries along one axis: every `tile` pixels, the last core shorter."""
  return np.append(np.arange(0, length, tile, dtype=np.int64), length)


def tile_grid(height: int, width: int, *, tile: int, halo: int) -> list[Tile]:
  """The tiles of an image in raster order (module docstring)."""
  if tile < 1 or halo < 0:
    raise ValueError(f'need tile >= 1 and halo >= 0, got tile {tile}, halo {halo}')
  rows, cols = axis_cuts(height, tile), axis_cuts(width, tile)
  tiles = []
  for r0, r1 in zip(rows[:-1], rows[1:]):
    for c0, c1 in zip(cols[:-1], cols[1:]):
      tiles.append(Tile(core=(int(r0), int(r1), int(c0), int(c1)),
                        region=(max(0, int(r0) - halo), min(height, int(r1) + halo),
                                max(0, int(c0) - halo), min(width, int(c1) + halo))))
  return tiles


def owned_instances(labels: np.ndarray, scores: np.ndarray, tile: Tile, shape: tuple[int, int]):
  """([Instance] of `labels` (region label map, ids 1..N) whose centroid is in the tile's core,
  in id order; the number of those that touch the region's edge inside the image)."""
  (r0, r1, c0, c1), (g0, g1, h0, h1) = tile.core, tile.region
  found = ndimage.find_objects(labels, max_label=len(scores))
  owned, cut = [], 0
  for index, slices in enumerate(found):
    if slices is None:
      continue
    mask = labels[slices] == index + 1
    rr, cc = np.nonzero(mask)
    row = int(np.floor(rr.mean() + slices[0].start + g0 + 0.5))  # centroid's pixel, image coords
    col = int(np.floor(cc.mean() + slices[1].start + h0 + 0.5))
    if not (r0 <= row < r1 and c0 <= col < c1):
      continue
    top, left = slices[0].start + g0, slices[1].start + h0
    bottom, right = slices[0].stop + g0, slices[1].stop + h0
    cut += ((top == g0 and g0 > 0) or (left == h0 and h0 > 0)
            or (bottom == g1 and g1 < shape[0]) or (right == h1 and h1 < shape[1]))
    owned.append(Instance(top, left, mask, float(scores[index])))
  return owned, int(cut)


def predict_tiles(source, *, predict_windows, config: ml_collections.ConfigDict, tile: int,
                  halo: int, timer: dict | None = None) -> Iterator[TileResult]:
  """Predicts `source` (`.shape` (H, W) and `.read(row, col, rows, cols)` -> uint8 RGB) tile by
  tile; yields each tile's owned instances (module docstring). `timer` as in predict_image, plus
  'read' (seconds spent reading regions)."""
  height, width = (int(n) for n in source.shape)
  for current in tile_grid(height, width, tile=tile, halo=halo):
    g0, g1, h0, h1 = current.region
    start = time.perf_counter()
    image = np.asarray(source.read(g0, h0, g1 - g0, h1 - h0))
    if timer is not None:
      timer['read'] = timer.get('read', 0.0) + time.perf_counter() - start
    result = predictor.predict_image(image, predict_windows=predict_windows, config=config,
                                     timer=timer)
    start = time.perf_counter()
    owned, cut = owned_instances(result['instances'], result['instance_scores'], current,
                                 (height, width))
    if timer is not None:
      timer['instances'] = timer.get('instances', 0.0) + time.perf_counter() - start
    yield TileResult(current, image, owned, cut)
