"""Prediction outputs written as instances arrive: GeoJSON, CSV, label-map TIFF, overlay or preview.

`OutputWriter(output, stem, shape=..., placement=...)` is a context manager; `add(instances)` takes
each tile's owned instances (`tiles.Instance`, in image-source pixels) and gives them the next ids,
`add_image` the pixels for the overlay; a clean exit writes the rest and commits everything
(`files` then lists the paths), an exception commits nothing.
Every file is written through `atomic_io` (temporary name, then rename on a clean exit): a crash,
a kill or a full disk leaves no truncated file under a final name. Files (see predict's docstring
for the conventions):
  <stem>.geojson / <stem>.csv  streamed: one Feature / row per instance, nothing kept in memory.
  <stem>.instances.tif         int32 label map of the predicted pixels (ids as in the GeoJSON); a
                               plain TIFF for small images, else a tiled (256 x 256) pyramidal TIFF
                               (SubIFD levels by 2x decimation down to <= 1024 pixels a side),
                               accumulated in a scratch file on disk rather than in memory.
  <stem>.overlay.png           small images: the image with each outline drawn in green.
  <stem>.preview.png           large images: the same, decimated to at most PREVIEW_SIDE a side.

Coordinates in the GeoJSON and CSV are level-0 pixels of the whole input file: a region's offset is
added and a pyramid level's downsample multiplied in (`Placement`), so they overlay the slide in
QuPath whatever level or region was predicted.
"""

import contextlib
import csv
import json
import pathlib
import sys
import tempfile
import uuid
from typing import NamedTuple

import numpy as np
import PIL.Image
import tifffile
from skimage import measure
from skimage import segmentation

from donuseg_jax import atomic_io

OUTLINE_COLOR = (0, 255, 0)
PREVIEW_SIDE = 2048  # the longest side of a large image's preview
LABEL_TILE = 256
LABEL_PYRAMID_SIDE = 1024  # label-map pyramid levels down to this many pixels a side
CSV_COLUMNS = ['id', 'centroid_x', 'centroid_y', 'area', 'bbox_x0', 'bbox_y0', 'bbox_x1',
               'bbox_y1', 'score']


class Placement(NamedTuple):
  """Where the predicted pixels lie in the file's level 0: level pixel (i, j) of the source covers
  level-0 pixels [(row + i) * dy, (row + i + 1) * dy) x [(col + j) * dx, ...)."""
  row: int = 0  # the region's offset, in pixels of the predicted level
  col: int = 0
  dy: float = 1.0
  dx: float = 1.0


def ring_area(ring: np.ndarray) -> float:
  """Signed shoelace area of a closed ring (N, 2) (positive: counter-clockwise in x, y)."""
  x, y = ring[:, 0], ring[:, 1]
  return 0.5 * float(np.sum(x[:-1] * y[1:] - x[1:] * y[:-1]))


def drop_collinear(ring: np.ndarray) -> np.ndarray:
  """A closed ring without the vertices that lie on the straight line through their neighbours.

  Exact for marching-squares outlines (coordinates are multiples of 0.5, so the cross products are
  exact): the polygon is the same point set, with far fewer vertices on straight and 45-degree runs.
  """
  points = ring[:-1]  # (N, 2) distinct vertices
  before = points - np.roll(points, 1, axis=0)
  after = np.roll(points, -1, axis=0) - points
  turn = before[:, 0] * after[:, 1] - before[:, 1] * after[:, 0]
  kept = points[turn != 0]
  return np.concatenate([kept, kept[:1]])


def instance_polygon(mask: np.ndarray, offset: tuple[int, int]) -> np.ndarray | None:
  """Outer ring (N, 2) in (x, y) image pixels of one instance crop, or None if it has no pixels.

  `offset` = (row, col) of the crop in the image. Marching squares on the zero-padded crop (at
  level 0.5, diagonal pixels connected) gives a simple closed ring through pixel-edge midpoints;
  collinear vertices are dropped (exactly: no simplification that could make it self-intersect).
  """
  if not mask.any():
    return None
  contours = measure.find_contours(np.pad(mask, 1).astype(np.float32), 0.5,
                                   fully_connected='high')
  rings = [np.asarray(c[:, ::-1], np.float64) for c in contours]  # (row, col) -> (x, y)
  rings = [r for r in rings if len(r) >= 4 and np.array_equal(r[0], r[-1])]
  if not rings:
    return None
  ring = max(rings, key=lambda r: abs(ring_area(r)))  # the outer boundary; holes are dropped
  # -1 undoes the padding; +0.5 moves from pixel centres to QuPath's pixel-corner coordinates.
  ring = drop_collinear(ring + np.array([offset[1] - 1 + 0.5, offset[0] - 1 + 0.5]))
  return ring if ring_area(ring) > 0 else ring[::-1]  # counter-clockwise in (x, y)


def instance_record(instance, label: int, *, name: str, placement: Placement):
  """(GeoJSON Feature or None, CSV row dict) of one `tiles.Instance` with id `label`."""
  mask = instance.mask
  rows, cols = np.nonzero(mask)
  p = placement
  row, col = instance.row + p.row, instance.col + p.col  # in level pixels of the whole file
  unit = p.dy == 1.0 and p.dx == 1.0
  area = int(rows.size) if unit else round(rows.size * p.dy * p.dx, 1)
  # A level pixel's centre, (j + 0.5) * dx in pixel-corner units, is (j + 0.5) * dx - 0.5 in
  # level-0 pixel indices (the CSV's convention; = j when dx = 1).
  table = {'id': label,
           'centroid_x': f'{(cols.mean() + col + 0.5) * p.dx - 0.5:.3f}',
           'centroid_y': f'{(rows.mean() + row + 0.5) * p.dy - 0.5:.3f}',
           'area': area,
           'bbox_x0': round(col * p.dx), 'bbox_y0': round(row * p.dy),
           'bbox_x1': round((col + mask.shape[1]) * p.dx),
           'bbox_y1': round((row + mask.shape[0]) * p.dy),
           'score': f'{instance.score:.5f}'}
  ring = instance_polygon(mask, (row, col))
  if ring is None:
    return None, table
  ring = ring * np.array([p.dx, p.dy])  # a positive scaling keeps it simple and counter-clockwise
  feature = {
      'type': 'Feature',
      'id': str(uuid.uuid5(uuid.NAMESPACE_URL, f'donuseg/{name}/{label}')),
      'geometry': {'type': 'Polygon', 'coordinates': [np.round(ring, 3).tolist()]},
      'properties': {'objectType': 'detection', 'isLocked': False,
                     'classification': {'name': 'Nucleus', 'color': [0, 200, 0]},
                     'measurements': {'score': float(instance.score), 'area': area,
                                      'instance_id': label}},
  }
  return feature, table


class OutputWriter:
  """Streams one image's outputs (module docstring). `labels` / `overlay`: write them or not;
  `small`: a plain label TIFF and a full-size overlay (else pyramid and preview)."""

  def __init__(self, output, stem: str, *, shape: tuple[int, int], placement: Placement = Placement(),
               labels: bool = True, overlay: bool = True, small: bool = True):
    self.output, self.stem = pathlib.Path(output), stem
    self.shape = tuple(int(n) for n in shape)
    self.placement = placement
    self.write_labels, self.write_overlay, self.small = labels, overlay, small
    self.count = 0
    self.cut = 0
    self.files = []

  def __enter__(self):
    self._stack = contextlib.ExitStack()
    try:
      self._geojson = self._stack.enter_context(
          atomic_io.atomic_open(self.path('.geojson'), 'w', encoding='utf-8'))
      self._geojson.write('{"type": "FeatureCollection", "features": [')
      csv_file = self._stack.enter_context(
          atomic_io.atomic_open(self.path('.csv'), 'w', newline='', encoding='utf-8'))
      self._csv = csv.DictWriter(csv_file, fieldnames=CSV_COLUMNS)
      self._csv.writeheader()
      self._features = 0
      self.labels = None
      if self.write_labels or (self.write_overlay and self.small):
        self.labels = self._label_canvas()
      self.canvas, self.step = None, 1
      if self.write_overlay:
        self.step = 1 if self.small else -(-max(self.shape) // PREVIEW_SIDE)
        self.canvas = np.zeros((-(-self.shape[0] // self.step), -(-self.shape[1] // self.step), 3),
                               np.uint8)
    except BaseException:
      self._stack.close()
      raise
    return self

  def path(self, suffix: str) -> pathlib.Path:
    return self.output / f'{self.stem}{suffix}'

  def _label_canvas(self) -> np.ndarray:
    if self.small:
      return np.zeros(self.shape, np.int32)
    # Large: on disk, so that resident memory stays bounded (the OS pages it in and out).
    scratch = tempfile.NamedTemporaryFile(dir=self.output, prefix=f'.{self.stem}.labels-',
                                          suffix='.tmp')
    self._stack.callback(scratch.close)  # deleted when the writer closes, whatever happens
    scratch.truncate(self.shape[0] * self.shape[1] * 4)
    return np.memmap(scratch, dtype=np.int32, mode='r+', shape=self.shape)

  def add_image(self, image: np.ndarray, row: int, col: int) -> None:
    """Pixels of the source at (row, col), for the overlay or preview (decimated by `step`)."""
    if self.canvas is None:
      return
    s = self.step
    top, left = -row % s, -col % s  # the first rows / columns that fall on the decimated grid
    part = image[top::s, left::s]
    r, c = (row + top) // s, (col + left) // s
    self.canvas[r:r + part.shape[0], c:c + part.shape[1]] = part

  def add(self, instances) -> None:
    """Writes `instances` (tiles.Instance, in source pixels) with the next ids."""
    for instance in instances:
      self.count += 1
      feature, row = instance_record(instance, self.count, name=self.stem,
                                     placement=self.placement)
      self._csv.writerow(row)
      if feature is not None:
        self._geojson.write((',\n' if self._features else '\n') + json.dumps(feature))
        self._features += 1
      h, w = instance.mask.shape
      if self.labels is not None:
        crop = self.labels[instance.row:instance.row + h, instance.col:instance.col + w]
        crop[instance.mask & (crop == 0)] = self.count  # first come keeps a pixel
      if self.canvas is not None and not self.small:
        edge = segmentation.find_boundaries(np.pad(instance.mask, 1), mode='inner')[1:-1, 1:-1]
        rr, cc = np.nonzero(edge)
        self.canvas[(rr + instance.row) // self.step, (cc + instance.col) // self.step] = (
            OUTLINE_COLOR)

  def _finish(self) -> None:
    """Writes the label map and overlay; the GeoJSON and CSV are committed after them."""
    self._geojson.write('\n]}\n')
    files = [self.path('.geojson'), self.path('.csv')]
    if self.write_labels:
      files.append(self.path('.instances.tif'))
      with atomic_io.atomic_open(files[-1], 'wb') as stream:
        write_label_tiff(Unnamed(stream), self.labels, pyramid=not self.small)
    if self.write_overlay:
      if self.small:
        self.canvas[segmentation.find_boundaries(self.labels, mode='inner')] = OUTLINE_COLOR
      files.append(self.path('.overlay.png' if self.small else '.preview.png'))
      with atomic_io.atomic_open(files[-1], 'wb') as stream:
        PIL.Image.fromarray(self.canvas).save(stream, format='PNG')
    self.files = files

  def __exit__(self, kind, error, trace):
    if kind is not None:  # temporaries removed, nothing committed
      return self._stack.__exit__(kind, error, trace)
    try:
      self._finish()
    except BaseException:
      if not self._stack.__exit__(*sys.exc_info()):
        raise
      return False
    self._stack.close()  # commits the CSV and GeoJSON (renames) and drops the scratch file
    return False


class Unnamed:
  """A file object without its `name` (an int for atomic_io's descriptors, which tifffile would
  take for a path)."""

  def __init__(self, stream):
    self._stream = stream

  def __getattr__(self, key):
    if key == 'name':
      raise AttributeError(key)
    return getattr(self._stream, key)


def write_label_tiff(stream, labels: np.ndarray, *, pyramid: bool) -> None:
  """int32 labels to `stream`: plain (small) or tiled with 2x-decimated SubIFD levels."""
  if not pyramid:
    tifffile.imwrite(stream, np.asarray(labels), compression='zlib')
    return
  steps = [1]
  while max(labels.shape) // (steps[-1] * 2) >= LABEL_PYRAMID_SIDE:
    steps.append(steps[-1] * 2)
  with tifffile.TiffWriter(stream, bigtiff=labels.size * 4 > 2 ** 31) as tiff:
    for n, step in enumerate(steps):
      shape = (-(-labels.shape[0] // step), -(-labels.shape[1] // step))
      options = dict(subifds=len(steps) - 1) if n == 0 else dict(subfiletype=1)
      tiff.write(label_tiles(labels, step, shape), shape=shape, dtype=np.int32,
                 tile=(LABEL_TILE, LABEL_TILE), compression='zlib', **options)


def label_tiles(labels: np.ndarray, step: int, shape: tuple[int, int]):
  """Full LABEL_TILE x LABEL_TILE tiles of labels[::step, ::step] in raster order (zero-padded)."""
  t = LABEL_TILE
  for r in range(0, shape[0], t):
    for c in range(0, shape[1], t):
      block = np.zeros((t, t), np.int32)
      part = labels[r * step:(r + t) * step:step, c * step:(c + t) * step:step]
      block[:part.shape[0], :part.shape[1]] = part
      yield block
