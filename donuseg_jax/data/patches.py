"""The patch grid of the paper's evaluation protocol: size-256 windows at stride 128 ([code]).

Along each axis the windows start at 0, stride, 2 * stride, ... and the last one is flush with the
border (start = length - size), so every pixel is covered and no window leaves the image. An axis
shorter than `size` has one window at 0 and is padded at its far end (bottom / right) up to `size`
by `extract_patches`: zeros by default (background, for label maps), `pad_mode='reflect'` for
images fed to a network.
"""

import numpy as np


def axis_starts(length: int, *, size: int = 256, stride: int = 128) -> list[int]:
  """Window starts along one axis of `length` pixels."""
  if length <= 0 or size <= 0 or stride <= 0:
    raise ValueError(f'bad patch grid: length {length}, size {size}, stride {stride}')
  if length <= size:
    return [0]
  starts = list(range(0, length - size, stride))
  return starts + [length - size]


def patch_grid(height: int, width: int, *, size: int = 256,
               stride: int = 128) -> list[tuple[int, int]]:
  """Top-left corners (y, x) of the windows covering a `height` x `width` image, row-major."""
  return [(y, x) for y in axis_starts(height, size=size, stride=stride)
          for x in axis_starts(width, size=size, stride=stride)]


def extract_patches(array: np.ndarray, grid: list[tuple[int, int]], size: int, *,
                    pad_mode: str = 'constant') -> np.ndarray:
  """(H, W, ...) -> (P, size, size, ...) windows at `grid`; short axes padded at the far end."""
  array = np.asarray(array)
  pad_h = max(0, size - array.shape[0])
  pad_w = max(0, size - array.shape[1])
  if pad_h or pad_w:
    widths = [(0, pad_h), (0, pad_w)] + [(0, 0)] * (array.ndim - 2)
    array = np.pad(array, widths, mode=pad_mode)
  if not grid:
    return np.zeros((0, size, size) + array.shape[2:], array.dtype)
  return np.stack([array[y:y + size, x:x + size] for y, x in grid])
