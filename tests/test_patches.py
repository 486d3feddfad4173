"""The evaluation protocol's 256 / stride-128 patch grid."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from donuseg_jax.data import patches


def test_known_grids():
  assert patches.axis_starts(512) == [0, 128, 256]
  assert patches.axis_starts(1000) == [0, 128, 256, 384, 512, 640, 744]
  assert patches.axis_starts(256) == [0]
  assert patches.axis_starts(100) == [0]
  assert patches.patch_grid(300, 512) == [(y, x) for y in (0, 44) for x in (0, 128, 256)]


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 700), st.integers(1, 700), st.sampled_from([(64, 32), (256, 128), (50, 50)]))
def test_grid_covers_image_and_stays_inside(height, width, size_stride):
  size, stride = size_stride
  grid = patches.patch_grid(height, width, size=size, stride=stride)
  covered = np.zeros((max(height, size), max(width, size)), bool)
  for y, x in grid:
    assert 0 <= y and 0 <= x
    assert y + size <= max(height, size) and x + size <= max(width, size)
    covered[y:y + size, x:x + size] = True
  assert covered.all()
  assert len(set(grid)) == len(grid)
  ys = sorted({y for y, _ in grid})
  assert all(b - a <= stride for a, b in zip(ys, ys[1:]))


def test_extract_patches_values_and_padding():
  image = np.arange(300 * 400 * 3, dtype=np.int64).reshape(300, 400, 3)
  grid = patches.patch_grid(300, 400)
  out = patches.extract_patches(image, grid, 256)
  assert out.shape == (len(grid), 256, 256, 3)
  for (y, x), patch in zip(grid, out):
    np.testing.assert_array_equal(patch, image[y:y + 256, x:x + 256])
  small = np.ones((100, 300), np.int32)
  grid = patches.patch_grid(100, 300)
  out = patches.extract_patches(small, grid, 256)
  assert out.shape == (2, 256, 256)
  assert (out[:, :100] == 1).all() and (out[:, 100:] == 0).all()
  reflected = patches.extract_patches(np.arange(10)[:, None] * np.ones((1, 300)), grid, 256,
                                      pad_mode='reflect')
  np.testing.assert_array_equal(reflected[0, 10:12, 0], [8, 7])
