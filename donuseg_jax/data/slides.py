"""Large and pyramidal TIFF images (tiled TIFF, OME-TIFF, SVS, NDPI, ...) read region by region.

`open_slide(path, level=..., mpp=...)` opens one pyramid level of the file's first image series
(tifffile's `series[0].levels`: OME-TIFF SubIFDs, SVS and NDPI pyramids, tifffile-written
pyramids; a plain TIFF is a one-level pyramid) and returns a `Slide`, whose `read(row, col, rows,
cols)` decodes only the tiles (or strips) that the region touches: memory is set by the region,
never by the level. Pixels are converted to (h, w, 3) uint8 RGB by the same photometric rules as
whole images (`images.decode_tiff`: gray, RGB(A), palette, CMYK, JPEG YCbCr; 16-bit by the dtype's
range).

Coordinates: `Slide.shape` is the level's (height, width); `downsample` = (level-0 rows per level
row, level-0 columns per level column), so that a level pixel (i, j) covers level-0 pixels
[i * dy, (i + 1) * dy) x [j * dx, (j + 1) * dx).

Pixel size (`mpp`, microns per pixel of level 0, scaled by the downsample for other levels) is read
where the file records it: the SVS description (`MPP = 0.2520`), OME-XML PhysicalSizeX (in um, or
nm / mm / cm by its unit), or the TIFF resolution tags when their unit is centimetre. `mpp=` picks
the coarsest level whose pixels are at most 10% larger than asked (level 0 if none is).

Files that are not one 2-D image per level (z-stacks, time series, channel stacks), levels that are
neither tiled nor split into strips small enough to read by region, and unsupported photometrics
raise `images.DataError` naming the file.
"""

import pathlib
import re

import numpy as np
import tifffile

from donuseg_jax.data import images

MPP_TOLERANCE = 1.1  # `mpp=` accepts a level whose pixels are this much larger than asked
MAX_SEGMENT_PIXELS = 1 << 26  # a strip or tile bigger than this cannot be read "by region"
_OME_UNITS_UM = {'µm': 1.0, 'um': 1.0, 'nm': 1e-3, 'mm': 1e3, 'cm': 1e4, 'm': 1e6}


class Slide:
  """One pyramid level of a TIFF, read by region; a context manager (module docstring)."""

  def __init__(self, path, *, level: int | None = None, mpp: float | None = None):
    self.path = pathlib.Path(path)
    self.source = str(self.path)
    if not self.path.is_file():
      raise images.DataError(f'{self.source}: no such image file')
    try:
      self._tiff = tifffile.TiffFile(self.path)
    except Exception as error:  # tifffile raises many types on broken files
      raise images.DataError(f'{self.source}: cannot decode image ({type(error).__name__}: '
                             f'{error})') from error
    try:
      self._open_level(level, mpp)
    except BaseException:
      self._tiff.close()
      raise

  def _open_level(self, level, mpp):
    try:
      series = self._tiff.series[0]
      levels = list(series.levels)
    except Exception as error:
      raise images.DataError(f'{self.source}: cannot decode image ({type(error).__name__}: '
                             f'{error})') from error
    self.level_shapes = []
    for index, found in enumerate(levels):
      shaped = tuple(int(n) for n in found.keyframe.shaped)  # (planes, depth, height, width, spp)
      if len(found.pages) != 1 or shaped[1] != 1:
        raise images.DataError(
            f'{self.source}: level {index} holds {len(found.pages)} page(s) of depth {shaped[1]} '
            f'(series shape {tuple(series.shape)}, axes {series.axes}); expected one 2-D image '
            'per level (a z-stack, time series or channel stack cannot be predicted)')
      self.level_shapes.append((shaped[2], shaped[3]))
    base_mpp = self._base_mpp(levels[0].keyframe)
    if mpp is not None:
      if base_mpp is None:
        raise images.DataError(f'{self.source}: the file records no pixel size; use --level')
      level = self.level_for_mpp(base_mpp, mpp)
    level = 0 if level is None else int(level)
    if not 0 <= level < len(levels):
      raise images.DataError(f'{self.source}: no pyramid level {level} (the file has '
                             f'{len(levels)}: {self.level_shapes})')
    self.level = level
    self._page = page = levels[level].keyframe
    self.shape = self.level_shapes[level]
    if self.shape[0] == 0 or self.shape[1] == 0:
      raise images.DataError(f'{self.source}: image has no pixels (level {level})')
    full = self.level_shapes[0]
    self.downsample = (full[0] / self.shape[0], full[1] / self.shape[1])
    self.mpp = None if base_mpp is None else base_mpp * self.downsample[1]
    photometric = images._photometric_name(page.photometric)  # noqa: SLF001 (one set of rules)
    samples = page.samplesperpixel
    self._plan = images._tiff_plan(page, photometric, samples,  # noqa: SLF001
                                   samples - len(page.extrasamples or ()))
    if self._plan is None:
      raise images.DataError(f'{self.source}: unsupported TIFF (photometric {photometric}, '
                             f'{samples} sample(s) per pixel); expected gray, RGB(A), palette, '
                             'CMYK or JPEG YCbCr')
    self._planar = int(page.planarconfig) == 2  # SEPARATE: one segment per sample plane
    if page.is_tiled:
      self._segment = (int(page.tilelength), int(page.tilewidth))
    else:
      self._segment = (int(page.rowsperstrip) if page.rowsperstrip else self.shape[0],
                       self.shape[1])
      self._segment = (min(self._segment[0], self.shape[0]), self._segment[1])
    if self._segment[0] * self._segment[1] > MAX_SEGMENT_PIXELS:
      raise images.DataError(
          f'{self.source}: level {level} is stored as {self._segment[0]}x{self._segment[1]}-pixel '
          'strips, too large to read by region; save it as a tiled (pyramidal) TIFF')
    self._grid = (-(-self.shape[0] // self._segment[0]), -(-self.shape[1] // self._segment[1]))

  def _base_mpp(self, page) -> float | None:
    """Microns per level-0 pixel where the file records it (module docstring), else None."""
    description = page.description or ''
    found = re.search(r'\|\s*MPP\s*=\s*([0-9.eE+-]+)', description)  # SVS
    if found:
      return float(found.group(1))
    if self._tiff.is_ome and self._tiff.ome_metadata:
      size = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', self._tiff.ome_metadata)
      unit = re.search(r'PhysicalSizeXUnit="([^"]+)"', self._tiff.ome_metadata)
      if size:
        return float(size.group(1)) * _OME_UNITS_UM.get(unit.group(1) if unit else 'µm', 1.0)
    resolution, unit = page.tags.get('XResolution'), page.tags.get('ResolutionUnit')
    if resolution is not None and unit is not None and int(unit.value) == 3:  # centimetre
      numerator, denominator = resolution.value
      if numerator > 0:
        return 1e4 * denominator / numerator
    return None

  def level_for_mpp(self, base_mpp: float, mpp: float) -> int:
    if mpp <= 0:
      raise images.DataError(f'{self.source}: microns per pixel must be positive, got {mpp}')
    chosen = 0
    for index, (_, width) in enumerate(self.level_shapes):
      if base_mpp * self.level_shapes[0][1] / width <= mpp * MPP_TOLERANCE:
        chosen = index if width < self.level_shapes[chosen][1] else chosen
    return chosen

  def read(self, row: int, col: int, rows: int, cols: int) -> np.ndarray:
    """(rows, cols, 3) uint8 RGB of the level's pixels [row, row + rows) x [col, col + cols)."""
    height, width = self.shape
    if rows < 1 or cols < 1 or row < 0 or col < 0 or row + rows > height or col + cols > width:
      raise ValueError(f'{self.source}: region {col},{row},{cols},{rows} (x, y, w, h) is not '
                       f'inside the {width}x{height} image')
    page = self._page
    th, tw = self._segment
    samples = page.samplesperpixel
    out = None
    handle = self._tiff.filehandle
    tiles = self._grid[0] * self._grid[1]
    try:
      for ti in range(row // th, (row + rows - 1) // th + 1):
        for tj in range(col // tw, (col + cols - 1) // tw + 1):
          for plane in range(samples if self._planar else 1):
            index = plane * tiles + ti * self._grid[1] + tj
            offset, count = page.dataoffsets[index], page.databytecounts[index]
            data = None
            if count:
              handle.seek(offset)
              data = handle.read(count)
            segment, _, _ = page.decode(data, index, jpegtables=page.jpegtables)
            segment = np.asarray(segment)
            segment = segment.reshape(-1, segment.shape[-2], segment.shape[-1])  # (h, w, spp|1)
            if out is None:
              out = np.zeros((rows, cols, samples), segment.dtype)
            # The part of this tile inside the region, in tile and in region coordinates.
            r0, r1 = max(row, ti * th), min(row + rows, (ti + 1) * th)
            c0, c1 = max(col, tj * tw), min(col + cols, (tj + 1) * tw)
            block = segment[r0 - ti * th:r1 - ti * th, c0 - tj * tw:c1 - tj * tw]
            if self._planar:
              out[r0 - row:r1 - row, c0 - col:c1 - col, plane] = block[..., 0]
            else:
              out[r0 - row:r1 - row, c0 - col:c1 - col] = block
    except images.DataError:
      raise
    except Exception as error:  # a damaged tile: name the file and the region
      raise images.DataError(f'{self.source}: cannot decode the region {col},{row},{cols},{rows} '
                             f'of level {self.level} ({type(error).__name__}: {error})') from error
    colormap = page.colormap if self._plan == 'palette' else None
    rgb = images._apply_tiff_plan(out, self._plan, colormap, self.source)  # noqa: SLF001
    return images.to_rgb_uint8(rgb, source=self.source)

  def close(self) -> None:
    self._tiff.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def open_slide(path, *, level: int | None = None, mpp: float | None = None) -> Slide:
  return Slide(path, level=level, mpp=mpp)


def is_slide(path, *, max_pixels: int) -> bool:
  """Whether a TIFF is better read by region: pyramidal, tiled, or over `max_pixels` pixels.

  False for other files and for TIFFs tifffile cannot open (the whole-image reader reports them).
  """
  path = pathlib.Path(path)
  if path.suffix.lower() not in images.TIFF_SUFFIXES:
    return False
  try:
    with tifffile.TiffFile(path) as tiff:
      series = tiff.series[0]
      page = series.levels[0].keyframe
      height, width = (int(n) for n in page.shaped[2:4])
      return len(series.levels) > 1 or page.is_tiled or height * width > max_pixels
  except Exception:  # not a TIFF tifffile can read: left to images.read_image's messages
    return False
