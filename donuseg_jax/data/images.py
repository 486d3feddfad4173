"""Reading microscopy images into the one in-memory form: (H, W, 3) uint8 RGB.

Every dataset reader and every user image goes through `read_image` / `decode_image`, so that the
conversions below happen in one place:

  - TIFF (including LZW, ImageJ and planar (C, H, W) files) is read with `tifffile`, by the rules of
    `decode_tiff` below; PNG, JPEG and other formats with `skimage.io` (imageio / Pillow), except
    that CMYK images (CMYK and YCCK JPEGs, Adobe / Photoshop inverted CMYK included) are decoded
    and converted to RGB by Pillow (`Image.convert('RGB')`), never read as RGBA.
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

TIFF rules (`decode_tiff`): a TIFF must hold exactly one full-resolution image. Reduced-resolution
pages (pyramid levels, thumbnails) and transparency masks are ignored; a file with two or more
full-resolution pages (a z-stack, time series or channel stack, e.g. 5 grayscale pages) is refused,
and the message gives the number of pages, the shape, axes and photometric found. The one image is
read by its photometric interpretation, never by guessing from the array shape:

  - MINISBLACK / MINISWHITE with one sample, or one plus an alpha sample (dropped): gray;
    MINISWHITE is inverted (max - value) so that 0 is black;
  - RGB with 3 samples, contiguous (H, W, 3) or planar (3, H, W), plus any extra samples (alpha,
    dropped): RGB;
  - PALETTE: the colour map is applied;
  - SEPARATED (CMYK ink set, 4 colour samples): R = max * (1 - C / max) * (1 - K / max), the same for
    G from M and B from Y (what Pillow does);
  - YCBCR: only JPEG-compressed (decoded to RGB by the codec);
  - anything else (several gray samples other than gray + alpha, i.e. a channel stack; CIELAB,
    CFA, LogLuv, ...; volumes with image depth > 1) is refused naming the photometric and shape.

Images over `MAX_PIXELS` pixels are refused before decoding (a corrupted header must not make the
reader allocate gigabytes; Pillow applies its own, similar limit to other formats).
"""

import io
import pathlib

import numpy as np
import PIL.Image
import skimage.io
import tifffile

TIFF_SUFFIXES = ('.tif', '.tiff')
MAX_PIXELS = 1 << 28  # 268 M pixels, e.g. 16384 x 16384; larger images are refused
_TIFF_MAGIC = (b'II*\x00', b'MM\x00*', b'II+\x00', b'MM\x00+')
_PILLOW_TO_RGB = ('CMYK', 'YCbCr', 'HSV')  # Pillow modes that skimage would return unconverted
_JPEG_COMPRESSIONS = (6, 7)  # OJPEG, JPEG


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
  is_tiff = pathlib.PurePath(source).suffix.lower() in TIFF_SUFFIXES or data[:4] in _TIFF_MAGIC
  if is_tiff:
    return decode_tiff(data, source=source)
  try:
    mode = _pillow_mode(data)
    if mode == 'LAB':
      raise DataError(f'{source}: CIELAB image; save it as RGB')
    if mode in _PILLOW_TO_RGB:
      # Pillow applies the Adobe CMYK inversion and libjpeg the YCCK -> CMYK transform.
      with PIL.Image.open(io.BytesIO(data)) as image:
        array = np.asarray(image.convert('RGB'))
    else:
      array = skimage.io.imread(io.BytesIO(data))
  except DataError:
    raise
  except Exception as error:  # every decoder raises its own types: report them all as one
    raise DataError(f'{source}: cannot decode image ({type(error).__name__}: {error})') from error
  return to_rgb_uint8(np.asarray(array), source=source)


def decode_tiff(data: bytes, *, source: str) -> np.ndarray:
  """Decodes a TIFF by the rules in the module docstring into (H, W, 3) uint8 RGB."""
  try:
    with tifffile.TiffFile(io.BytesIO(data)) as tiff:
      page = _single_tiff_page(tiff, source)
      photometric = _photometric_name(page.photometric)
      shaped = tuple(int(n) for n in page.shaped)  # (planar samples, depth, height, width, samples)
      found = (f'photometric {photometric}, {page.samplesperpixel} sample(s) per pixel, '
               f'shape {tuple(page.shape)}')
      if shaped[1] != 1:
        raise DataError(f'{source}: TIFF volume with image depth {shaped[1]} ({found}); expected '
                        'one 2-D image')
      if shaped[2] == 0 or shaped[3] == 0:
        raise DataError(f'{source}: image has no pixels ({found})')
      if shaped[2] * shaped[3] > MAX_PIXELS:
        raise DataError(f'{source}: TIFF image of {shaped[3]}x{shaped[2]} pixels is larger than '
                        f'the limit of {MAX_PIXELS} pixels ({found})')
      samples = page.samplesperpixel
      colour_samples = samples - len(page.extrasamples or ())
      plan = _tiff_plan(page, photometric, samples, colour_samples)
      if plan is None:
        raise DataError(
            f'{source}: unsupported TIFF ({found}, {len(page.extrasamples or ())} extra '
            'sample(s)); expected gray (MINISBLACK/MINISWHITE, 1 sample + optional alpha), '
            'RGB (3 samples + optional alpha, contiguous or planar), PALETTE, CMYK or JPEG YCbCr')
      array = page.asarray(squeeze=False).reshape(shaped)
      array = np.moveaxis(array[:, 0], 0, -1).reshape(shaped[2], shaped[3], -1)  # (H, W, samples)
      colormap = page.colormap if plan == 'palette' else None
  except DataError:
    raise
  except Exception as error:  # tifffile and its codecs raise many types on broken files
    raise DataError(f'{source}: cannot decode image ({type(error).__name__}: {error})') from error
  return to_rgb_uint8(_apply_tiff_plan(array, plan, colormap, source), source=source)


def _single_tiff_page(tiff, source: str):
  """The one full-resolution page of `tiff`; DataError naming what was found if not exactly one."""
  pages = tiff.pages
  count = len(pages)
  full = []
  for index in range(count):
    page = pages[index]
    if int(getattr(page, 'subfiletype', 0) or 0) & 0b101:  # reduced resolution or mask
      continue
    full.append(page)
    if len(full) > 1:
      break
  if len(full) == 1:
    return full[0]
  if not full:
    raise DataError(f'{source}: TIFF holds no full-resolution image ({count} page(s))')
  try:
    series = tiff.series[0]
    layout = f'series shape {tuple(series.shape)}, axes {series.axes}'
  except Exception:  # a damaged file may have pages but no readable series
    layout = f'first page shape {tuple(full[0].shape)}'
  raise DataError(
      f'{source}: TIFF holds {count} pages with more than one full-resolution image ({layout}, '
      f'photometric {_photometric_name(full[0].photometric)}), e.g. a z-stack, time series or '
      'channel stack; expected one 2-D gray, RGB or RGBA image (save the plane or an RGB '
      'composite as its own file)')


def _photometric_name(photometric) -> str:
  return getattr(photometric, 'name', None) or str(photometric)


def _tiff_plan(page, photometric: str, samples: int, colour_samples: int):
  """How to turn the page's samples into gray / RGB: a name, or None when refused."""
  alpha = [int(kind) in (1, 2) for kind in page.extrasamples or ()]  # ASSOCALPHA, UNASSALPHA
  # Unspecified extra samples beside gray are a channel stack (tifffile writes (C, H, W) so).
  if photometric in ('MINISBLACK', 'MINISWHITE') and (
      samples == 1 or (samples == 2 and alpha == [True])):
    return 'gray_inverted' if photometric == 'MINISWHITE' else 'gray'
  if photometric == 'RGB' and (colour_samples == 3 or (samples == 4 and colour_samples == 4)):
    return 'rgb'  # extra samples (declared, or a 4th one left undeclared) are dropped
  if photometric == 'PALETTE' and samples == 1 and page.colormap is not None:
    return 'palette'
  if photometric == 'SEPARATED' and colour_samples == 4 and int(_tag(page, 'InkSet', 1)) == 1:
    return 'cmyk'
  if photometric == 'YCBCR' and samples >= 3 and int(page.compression) in _JPEG_COMPRESSIONS:
    return 'rgb'  # the JPEG codec returns RGB
  return None


def _tag(page, name: str, default):
  tag = page.tags.get(name)
  return default if tag is None else tag.value


def _apply_tiff_plan(array: np.ndarray, plan: str, colormap, source: str) -> np.ndarray:
  """(H, W, samples) TIFF samples -> (H, W, 1) gray or (H, W, 3) RGB, in a dtype `_to_uint8` takes."""
  if plan == 'gray':
    return array[..., :1]
  if plan == 'rgb':
    return array[..., :3]
  if plan == 'gray_inverted':
    gray = array[..., :1]
    if gray.dtype == bool:
      return ~gray  # refused as boolean by `_to_uint8`, like a MINISBLACK bilevel image
    if not np.issubdtype(gray.dtype, np.unsignedinteger):
      raise DataError(f'{source}: MINISWHITE TIFF with pixel type {gray.dtype}; expected '
                      'unsigned integers')
    return np.iinfo(gray.dtype).max - gray
  if plan == 'palette':
    colormap = np.asarray(colormap)
    indices = array[..., 0]
    if not np.issubdtype(indices.dtype, np.unsignedinteger) or colormap.ndim != 2 or (
        colormap.shape[0] != 3) or indices.max(initial=0) >= colormap.shape[1]:
      raise DataError(f'{source}: PALETTE TIFF whose indices do not fit its colour map')
    # Colour maps are 16-bit; a few writers store 8-bit values in them.
    colormap = colormap.astype(np.uint8 if colormap.max(initial=0) <= 255 else np.uint16)
    return np.moveaxis(colormap[:, indices], 0, -1)
  if plan == 'cmyk':
    if not np.issubdtype(array.dtype, np.unsignedinteger):
      raise DataError(f'{source}: CMYK TIFF with pixel type {array.dtype}; expected unsigned '
                      'integers')
    top = float(np.iinfo(array.dtype).max)
    ink = array[..., :4].astype(np.float64) / top
    rgb = (1.0 - ink[..., :3]) * (1.0 - ink[..., 3:4])
    return np.round(rgb * top).astype(array.dtype)
  raise AssertionError(plan)


def _pillow_mode(data: bytes):
  """Pillow's mode for the image in `data` (header only), or None if Pillow cannot identify it."""
  try:
    with PIL.Image.open(io.BytesIO(data)) as image:
      return image.mode
  except Exception:  # not a format Pillow knows (or broken): skimage reports it below
    return None


def to_rgb_uint8(array: np.ndarray, *, source: str) -> np.ndarray:
  """Converts a decoded (H, W[, C]) array to (H, W, 3) uint8 RGB, or raises DataError naming `source`.

  Channels are the last axis; planar (C, H, W) arrays are not guessed at (`decode_tiff` reorders
  planar TIFFs by their header).
  """
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
