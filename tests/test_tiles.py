"""Tile-by-tile prediction: nuclei across tile borders and corners come out once, whole, and equal
to whole-image prediction (a stand-in network whose segmentation depends on a neighbourhood)."""

import numpy as np
import pytest
from scipy import ndimage

from configs import default
from donuseg_jax.inference import predictor
from donuseg_jax.inference import tiles

MARKER = (255, 0, 255)  # the stand-in detects a nucleus at an FCOS location holding this colour
RADIUS = 9  # nuclei are dark disks of this radius
HALF = 11.0  # the stand-in's box half-side (ltrb)
BLUR = 3


class DiskNet:
  """Segmentation: a 7 x 7 box blur of darkness, with zeros beyond the window (so it is right only
  where the blending gives weight); detection: a P3 box of half-side HALF at each MARKER location."""

  def __call__(self, images):
    gray = np.asarray(images, np.float32).mean(-1)
    logit = ndimage.uniform_filter((128.0 - gray) / 8.0, size=(1, 2 * BLUR + 1, 2 * BLUR + 1),
                                   mode='constant')
    levels = []
    for s in (4, 8, 16, 32, 64):
      centres = images[:, s // 2::s, s // 2::s]
      hit = (centres == np.array(MARKER, np.uint8)).all(-1) & (s == 8)
      levels.append({'logits': np.where(hit, 8.0, -8.0).astype(np.float32),
                     'ltrb': np.full(hit.shape + (4,), HALF, np.float32),
                     'centerness': np.full(hit.shape, 4.0, np.float32)})
    return {'segmentation': logit, 'detection': tuple(levels)}


# Cores of 160 (multiples of 8, so every region's FCOS locations fall on pixels = 4 mod 8).
SIZE, TILE, HALO = 640, 160, 48
CENTRES = [(156, 300), (164, 332), (324, 164), (300, 476), (484, 612),  # across a core border
           (164, 164), (156, 156), (316, 324), (476, 484), (324, 484),  # at a corner of 4 cores
           (4, 4), (636, 300), (60, 84), (540, 220)]  # at the image edge; inside a core


def disk_image():
  rng = np.random.default_rng(0)
  image = rng.integers(190, 230, (SIZE, SIZE, 3), dtype=np.uint8)
  yy, xx = np.mgrid[:SIZE, :SIZE]
  for x, y in CENTRES:
    image[(xx - x) ** 2 + (yy - y) ** 2 <= RADIUS ** 2] = rng.integers(30, 60, 3)
    image[y, x] = MARKER
  return image


def as_pixel_sets(instances):
  return sorted(frozenset(zip(*(np.nonzero(i.mask) + np.array([[i.row], [i.col]])).tolist()))
                for i in instances) if instances else []


def whole_image_instances(image, cfg):
  result = predictor.predict_image(image, predict_windows=DiskNet(), config=cfg)
  labels = result['instances']
  return [frozenset(zip(*np.nonzero(labels == k).__iter__())) for k in range(1, labels.max() + 1)]


@pytest.fixture(scope='module')
def cfg():
  config = default.get_config()
  config.eval.max_window = 256
  return config


def test_nuclei_across_borders_and_corners_come_out_once_as_in_the_whole_image(cfg):
  image = disk_image()
  whole = sorted(whole_image_instances(image, cfg), key=sorted)
  assert len(whole) == len(CENTRES)
  results = list(tiles.predict_tiles(tiles.ArraySource(image), predict_windows=DiskNet(),
                                     config=cfg, tile=TILE, halo=HALO))
  assert len(results) == 16 and sum(r.cut for r in results) == 0
  tiled = [pixels for r in results for pixels in as_pixel_sets(r.instances)]
  assert sorted(tiled, key=sorted) == whole  # same masks, none twice, none missing
  for r in results:  # each instance was produced by the tile whose core holds its centroid
    r0, r1, c0, c1 = r.tile.core
    for i in r.instances:
      rr, cc = np.nonzero(i.mask)
      assert r0 <= round(rr.mean() + i.row) < r1 and c0 <= round(cc.mean() + i.col) < c1
  assert sum(len(r.instances) for r in results if r.tile.core[0] > 0 and r.tile.core[2] > 0) >= 10


def test_without_a_halo_border_nuclei_are_cut_and_counted(cfg):
  image = disk_image()
  whole = whole_image_instances(image, cfg)
  results = list(tiles.predict_tiles(tiles.ArraySource(image), predict_windows=DiskNet(),
                                     config=cfg, tile=TILE, halo=0))
  tiled = [pixels for r in results for pixels in as_pixel_sets(r.instances)]
  assert sum(r.cut for r in results) >= 8
  assert sorted(tiled, key=sorted) != sorted(whole, key=sorted)


def test_tile_grid_partitions_the_image():
  for height, width, tile in ((640, 640, 160), (1001, 333, 256), (5, 7, 4096)):
    grid = tiles.tile_grid(height, width, tile=tile, halo=16)
    covered = np.zeros((height, width), np.int32)
    for t in grid:
      r0, r1, c0, c1 = t.core
      covered[r0:r1, c0:c1] += 1
      g0, g1, h0, h1 = t.region
      assert g0 == max(0, r0 - 16) and g1 == min(height, r1 + 16) and (h0, h1) == (
          max(0, c0 - 16), min(width, c1 + 16))
      assert r1 - r0 <= tile and c1 - c0 <= tile
    assert (covered == 1).all()
  with pytest.raises(ValueError, match='tile'):
    tiles.tile_grid(10, 10, tile=0, halo=0)
