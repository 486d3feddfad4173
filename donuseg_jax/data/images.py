"""Reading microscopy images into the one in-memory form: (H, W, 3) uint8 RGB.

Every dataset reader and every user image goes through `read_image` / `decode_image`, so that the
conversions below happen in one place:

  - TIFF (including LZW, ImageJ and planar (C, H, W) files) is read with `tifffile`; PNG, JPEG and
    other formats with `skimage.io` (imageio / Pillow).
  - grayscale (H, W) or (H, W, 1) -> the gray value copied to R, G and B;
    gray + alpha (H, W, 2) -> gray; RGBA (H, W, 4) -> RGB with the alpha channel dropped (not
    composited: TNBC ships fully opaque RGBA PNGs, and compositing onto white would change them).
  - unsigned integers wider than 8 bits (16-bit scanners, uint32) -> 8 bits by the full range of the
    dtype: value * 255 / dtype max, rounded. The image's own maximum is NOT used, so a dim image
    stays dim and all images of one dataset scale alike.
  - float images are converted when every value is finite and in [0, 1] (value * 255, rounded);
    any other float image is rejected, because its intensity scale cannot be guessed.
  - signed integers, booleans, more than 4 channels, stacks (ndim > 3), empty files and files that
    fail to decode raise `DataError`, whose message names the file and the problem.
"""

import io
import pathlib

import numpy as np
import skimage.io
import tifffile

TIFF_SUFFIXES = ('.tif', '.tiff')


class DataError(ValueError):
  """A dataset file or folder that cannot be used; the message names the path and the problem."""


def read_image(path) -> np.ndarray:
  """Reads an image file into (H, W, 3) uint8 RGB; see the module docstring for conversions."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise DataError(f'{path}: no such image file')
  return decode_image(path.read_bytes(), source=str(path))


def decode_image(data: bytes, *, source: str) -> np.ndarray:
  """Decodes encoded image bytes (e.g. a zip member); `source` names the file in error messages."""
  if not data:
    raise DataError(f'{source}: empty image file (0 bytes)')
  is_tiff = pathlib.PurePath(source).suffix.lower() in TIFF_SUFFIXES or data[:4] in (
      b'II*\x00', b'MM\x00*', b'II+\x00', b'MM\x00+')
  try:
    if is_tiff:
      array = tifffile.imread(io.BytesIO(data))
    else:
      array = skimage.io.imread(io.BytesIO(data))
  except Exception as error:  # every decoder raises its own types: report them all as one
    raise DataError(f'{source}: cannot decode image ({type(error).__name__}: {error})') from error
  return to_rgb_uint8(np.asarray(array), source=source)


def to_rgb_uint8(array: np.ndarray, *, source: str) -> np.ndarray:
  """Converts a decoded array to (H, W, 3) uint8 RGB, or raises DataError naming `source`."""
  if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] > 4:
    array = np.moveaxis(array, 0, -1)  # planar TIFF (C, H, W) -> (H, W, C)
  if array.ndim == 2:
    array = array[..., None]
  if array.ndim != 3:
    raise DataError(f'{source}: expected one 2-D image, got an array of shape {array.shape}')
  height, width, channels = array.shape
  if height == 0 or width == 0:
    raise DataError(f'{source}: image has no pixels (shape {array.shape})')
  if channels in (1, 2):
    array = np.repeat(array[..., :1], 3, axis=-1)  # gray (+ alpha) -> RGB
  elif channels == 4:
    array = array[..., :3]  # RGBA -> RGB, alpha dropped
  elif channels != 3:
    raise DataError(f'{source}: {channels} channels; expected gray, gray+alpha, RGB or RGBA')
  return _to_uint8(array, source=source)


def _to_uint8(array: np.ndarray, *, source: str) -> np.ndarray:
  if array.dtype == np.uint8:
    return np.ascontiguousarray(array)
  if np.issubdtype(array.dtype, np.unsignedinteger):
    scale = 255.0 / np.iinfo(array.dtype).max
    return np.round(array.astype(np.float64) * scale).astype(np.uint8)
  if np.issubdtype(array.dtype, np.floating):
    if not np.all(np.isfinite(array)) or array.min() < 0 or array.max() > 1:
      raise DataError(
          f'{source}: float image with values outside [0, 1] (min {np.nanmin(array):g}, '
          f'max {np.nanmax(array):g}); save it as 8- or 16-bit integers')
    return np.round(array.astype(np.float64) * 255.0).astype(np.uint8)
  raise DataError(f'{source}: unsupported pixel type {array.dtype}; expected unsigned integers or float')


def pad_to_min_size(array: np.ndarray, min_size: int, *, value=0) -> np.ndarray:
  """Pads the first two axes at the bottom and right up to `min_size` with a constant `value`.

  Padding only at the far ends keeps every (x, y) coordinate valid, so points and boxes need no
  change. Typical values: 255 (white, like empty glass) for images, 0 for instance maps. Arrays that
  are already large enough are returned unchanged.
  """
  height, width = array.shape[:2]
  pad_rows, pad_cols = max(0, min_size - height), max(0, min_size - width)
  if not pad_rows and not pad_cols:
    return array
  widths = [(0, pad_rows), (0, pad_cols)] + [(0, 0)] * (array.ndim - 2)
  return np.pad(array, widths, mode='constant', constant_values=value)
