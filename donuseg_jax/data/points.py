"""Point labels: centroids of ground-truth instances, and user point files (CSV, QuPath GeoJSON).

All points are float32 (K, 2) arrays of (x, y) = (column, row), with pixel (row i, column j)
centred at (x, y) = (j, i) (see `batch.py`). A file with no points is valid: that image then trains
as background only.
"""

import csv
import json
import pathlib

import numpy as np
import scipy.ndimage

from donuseg_jax.data import images

DataError = images.DataError


def centroids_from_instances(instances: np.ndarray) -> np.ndarray:
  """One point per instance id, in ascending id order: (K, 2) float32 (x, y).

  The point is the centroid of the instance's pixels rounded to the nearest pixel (halves round
  up), as the benchmark protocol does (DESIGN.md section 2). A point must lie inside its own
  nucleus: when the rounded centroid of a concave or split instance falls outside it, the point
  becomes the instance pixel nearest to the exact centroid (first in row-major order on ties).
  Row k belongs to the k-th smallest id present; absent ids (gaps) get no row.
  """
  instances = np.asarray(instances)
  if instances.ndim != 2:
    raise ValueError(f'instances must be (H, W), got shape {instances.shape}')
  flat = instances.ravel().astype(np.int64)
  if flat.size == 0 or flat.max() <= 0:
    return np.zeros((0, 2), np.float32)
  if flat.min() < 0:
    raise ValueError('instances must be >= 0 (0 = background)')
  rows, cols = np.indices(instances.shape)
  counts = np.bincount(flat)
  ids = np.nonzero(counts)[0]
  ids = ids[ids > 0]
  mean_y = np.bincount(flat, weights=rows.ravel())[ids] / counts[ids]
  mean_x = np.bincount(flat, weights=cols.ravel())[ids] / counts[ids]
  # floor(v + 0.5): halves round up, unlike np.round's round-half-to-even.
  y = np.floor(mean_y + 0.5).astype(np.int64)
  x = np.floor(mean_x + 0.5).astype(np.int64)
  outside = np.nonzero(instances[y, x] != ids)[0]
  if outside.size:
    boxes = scipy.ndimage.find_objects(instances.astype(np.int64))
    for k in outside:
      box = boxes[ids[k] - 1]
      inside = np.argwhere(instances[box] == ids[k]) + [box[0].start, box[1].start]  # (n, 2) row, col
      nearest = np.argmin((inside[:, 0] - mean_y[k]) ** 2 + (inside[:, 1] - mean_x[k]) ** 2)
      y[k], x[k] = inside[nearest]
  return np.stack([x, y], axis=1).astype(np.float32)


def read_points(path, *, origin: str | None = None) -> np.ndarray:
  """Reads a point file by suffix: .csv / .tsv / .txt (x,y columns) or .geojson / .json (QuPath)."""
  path = pathlib.Path(path)
  suffix = path.suffix.lower()
  if suffix in ('.csv', '.tsv', '.txt'):
    return read_points_csv(path, origin=origin or 'center')
  if suffix in ('.geojson', '.json'):
    return read_points_geojson(path, origin=origin or 'corner')
  raise DataError(f'{path}: unknown point file type {suffix!r}; expected .csv or .geojson')


def read_points_csv(path, *, origin: str = 'center') -> np.ndarray:
  """Reads a CSV (or tab-separated) file with a header naming `x` and `y`; other columns are ignored.

  `origin='center'` (default) takes the values as pixel-centre coordinates (numpy column/row);
  `origin='corner'` treats them as image coordinates with (0, 0) at the top-left corner of the
  first pixel (QuPath, ImageJ), and subtracts 0.5.
  """
  path = pathlib.Path(path)
  text = _read_text(path)
  lines = text.splitlines()
  if not lines or not lines[0].strip():
    raise DataError(f'{path}: empty point file; expected a header line with columns x,y')
  delimiter = '\t' if '\t' in lines[0] and ',' not in lines[0] else ','
  reader = csv.reader(lines, delimiter=delimiter)
  header = [name.strip().lower() for name in next(reader)]
  if 'x' not in header or 'y' not in header:
    raise DataError(f'{path}: header {header} lacks columns x and y')
  x_col, y_col = header.index('x'), header.index('y')
  points = []
  for line_number, row in enumerate(reader, start=2):
    if not any(cell.strip() for cell in row):
      continue  # blank line
    try:
      points.append((float(row[x_col]), float(row[y_col])))
    except (IndexError, ValueError) as error:
      raise DataError(f'{path}: line {line_number}: cannot read x,y from {row}') from error
  return _finish(points, path, origin)


def read_points_geojson(path, *, origin: str = 'corner') -> np.ndarray:
  """Reads Point / MultiPoint geometries from GeoJSON as QuPath exports it.

  Accepts a FeatureCollection, a list of Features, a single Feature or a bare geometry. Other
  geometries (e.g. detection polygons exported with the points) are skipped; a file holding only
  such geometries is an error, since it is probably not a point file. QuPath's coordinates have
  (0, 0) at the top-left corner of the first pixel, so the default `origin='corner'` subtracts 0.5
  to put them on the pixel-centre grid used here.
  """
  path = pathlib.Path(path)
  try:
    data = json.loads(_read_text(path))
  except json.JSONDecodeError as error:
    raise DataError(f'{path}: not valid JSON ({error})') from error
  points, skipped = [], set()
  for geometry in _geometries(data, path):
    kind = geometry.get('type')
    coordinates = geometry.get('coordinates')
    if kind == 'Point':
      coordinates = [coordinates]
    elif kind != 'MultiPoint':
      skipped.add(str(kind))
      continue
    for point in coordinates or []:
      if not isinstance(point, (list, tuple)) or len(point) < 2:
        raise DataError(f'{path}: malformed point coordinates {point!r}')
      points.append((float(point[0]), float(point[1])))
  if not points and skipped:
    raise DataError(f'{path}: no Point or MultiPoint geometry (found {sorted(skipped)})')
  return _finish(points, path, origin)


def _geometries(data, path):
  """Yields every geometry dict of a GeoJSON document (FeatureCollection, Features, geometries)."""
  if isinstance(data, list):
    for item in data:
      yield from _geometries(item, path)
    return
  if not isinstance(data, dict):
    raise DataError(f'{path}: expected GeoJSON objects, found {type(data).__name__}')
  kind = data.get('type')
  if kind == 'FeatureCollection':
    yield from _geometries(data.get('features', []), path)
  elif kind == 'Feature':
    if data.get('geometry'):
      yield from _geometries(data['geometry'], path)
  elif kind == 'GeometryCollection':
    yield from _geometries(data.get('geometries', []), path)
  elif 'coordinates' in data:
    yield data
  else:
    raise DataError(f'{path}: unrecognised GeoJSON object of type {kind!r}')


def check_points_inside(points: np.ndarray, shape, source: str) -> None:
  """Raises DataError naming `source` and the first point outside an image of `shape` (H, W, ...).

  A point is inside when it rounds to a pixel of the image: -0.5 <= x < W - 0.5, and the same for y.
  """
  height, width = shape[:2]
  points = np.asarray(points, np.float64).reshape(-1, 2)
  x, y = points[:, 0], points[:, 1]
  bad = ~((x >= -0.5) & (x < width - 0.5) & (y >= -0.5) & (y < height - 0.5))  # NaN is bad too
  if bad.any():
    k = int(np.argmax(bad))
    raise DataError(
        f'{source}: point {k} (x={x[k]:g}, y={y[k]:g}) lies outside the image '
        f'(width {width}, height {height}); {int(bad.sum())} point(s) outside in all')


def _read_text(path: pathlib.Path) -> str:
  if not path.is_file():
    raise DataError(f'{path}: no such point file')
  try:
    return path.read_text(encoding='utf-8-sig')  # -sig: tolerate the BOM some exporters write
  except UnicodeDecodeError as error:
    raise DataError(f'{path}: not a UTF-8 text file ({error})') from error


def _finish(points, path, origin: str) -> np.ndarray:
  if origin not in ('center', 'corner'):
    raise ValueError(f"origin must be 'center' or 'corner', got {origin!r}")
  array = np.asarray(points, np.float32).reshape(-1, 2)
  if not np.all(np.isfinite(array)):
    raise DataError(f'{path}: non-finite point coordinates')
  return array - 0.5 if origin == 'corner' else array
