"""Point labels: centroids of ground-truth instances, and user point files (CSV, QuPath GeoJSON).

All points are float32 (K, 2) arrays of (x, y) = (column, row), with pixel (row i, column j)
centred at (x, y) = (j, i) (see `batch.py`). A file with no points is valid: that image then trains
as background only.

Point files are checked as they are read; every problem is a `DataError` naming the file and the
line (CSV) or feature (GeoJSON). Coordinates must be finite numbers. Points that fall on the same
pixel as an earlier point of the file (a double click, an export run twice) are not an error: each
point stands for one nucleus, so the repeats are dropped, keeping the first, and a
`DuplicatePointsWarning` names the file and how many were dropped.
"""

import csv
import json
import math
import pathlib
import warnings

import numpy as np
import scipy.ndimage

from donuseg_jax.data import images

DataError = images.DataError


class DuplicatePointsWarning(UserWarning):
  """A point file holds points on the same pixel; the repeats were dropped (the first one kept)."""


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
  """Reads a point file by suffix: .csv / .tsv / .txt (x,y columns) or .geojson / .json (QuPath).

  Points on the same pixel as an earlier point (after `origin` is applied, rounding as
  `check_points_inside` does) are dropped with a `DuplicatePointsWarning` naming the file and the
  count; the order of the points kept is the file's order.
  """
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
  first pixel (QuPath, ImageJ), and subtracts 0.5. A value that is not a finite number is a
  DataError naming the line; duplicated points are dropped as `read_points` says.
  """
  path = pathlib.Path(path)
  text = _read_text(path)
  lines = text.splitlines()
  if not lines or not lines[0].strip():
    raise DataError(f'{path}: empty point file; expected a header line with columns x,y')
  delimiter = '\t' if '\t' in lines[0] and ',' not in lines[0] else ','
  reader = csv.reader(lines, delimiter=delimiter)
  try:
    header = [name.strip().lower() for name in next(reader)]
    if 'x' not in header or 'y' not in header:
      raise DataError(f'{path}: header {_shorten(header)} lacks columns x and y')
    x_col, y_col = header.index('x'), header.index('y')
    points = []
    for line_number, row in enumerate(reader, start=2):
      if not any(cell.strip() for cell in row):
        continue  # blank line
      try:
        x, y = float(row[x_col]), float(row[y_col])
      except (IndexError, ValueError) as error:
        raise DataError(
            f'{path}: line {line_number}: cannot read x,y from {_shorten(row)}') from error
      if not (math.isfinite(x) and math.isfinite(y)):
        raise DataError(f'{path}: line {line_number}: non-finite point (x={x:g}, y={y:g})')
      points.append((x, y))
  except csv.Error as error:  # e.g. a field over the csv module's size limit
    raise DataError(f'{path}: line {reader.line_num}: malformed CSV ({error})') from error
  return _finish(points, path, origin)


def read_points_geojson(path, *, origin: str = 'corner') -> np.ndarray:
  """Reads Point / MultiPoint geometries from GeoJSON as QuPath exports it.

  Accepts a FeatureCollection, a list of Features, a single Feature or a bare geometry. Other
  geometries (e.g. detection polygons exported with the points) are skipped; a file holding only
  such geometries is an error, since it is probably not a point file. QuPath's coordinates have
  (0, 0) at the top-left corner of the first pixel, so the default `origin='corner'` subtracts 0.5
  to put them on the pixel-centre grid used here.

  Every position must be a list of two (or more: an altitude is ignored) finite numbers; a string,
  null, boolean, nested list or NaN / Infinity is a DataError naming the file and the feature
  (its index in the document, and its id or name when it has one). A Feature with a null geometry
  is skipped, as GeoJSON allows. Duplicated points are dropped as `read_points` says.
  """
  points, _, skipped = _read_geojson(path, origin)
  if not len(points) and skipped:
    raise DataError(f'{path}: no Point or MultiPoint geometry (found {_shorten(sorted(skipped))})')
  return points


# QuPath object types that are results, not a user's annotation: never an annotated region.
# QuPath >= 0.3 writes properties.objectType; 0.2 wrote the class name as the Feature's id.
RESULT_OBJECT_TYPES = ('detection', 'cell', 'tile', 'pathdetectionobject', 'pathcellobject',
                       'pathtileobject')


def read_annotations_geojson(path, *, origin: str = 'corner') -> tuple[np.ndarray, list]:
  """Points and annotated regions of a QuPath GeoJSON export: (points (K, 2), polygons).

  Points as `read_points_geojson`. Each Polygon / MultiPolygon annotation (a rectangle, ellipse or
  freehand region drawn in QuPath) is a region; detections and cells (properties.objectType
  'detection' / 'cell', or QuPath 0.2's ids PathDetectionObject / PathCellObject, e.g. a
  prediction imported back) are skipped. A polygon is a list of rings (the outer ring, then
  holes), each a (n, 2) float64 array of (x, y) on the pixel-centre grid (`origin` as for the
  points). A file with regions and no point is valid (regions with no nucleus); one with neither
  is an error naming what it holds.
  """
  points, polygons, skipped = _read_geojson(path, origin, with_polygons=True)
  if not len(points) and not polygons:
    found = f' (found {_shorten(sorted(skipped))})' if skipped else ''
    raise DataError(f'{path}: no Point, MultiPoint or Polygon annotation{found}')
  return points, polygons


def _read_geojson(path, origin: str, *, with_polygons: bool = False):
  """(points (K, 2) float32, polygons, skipped geometry types) of a GeoJSON file."""
  path = pathlib.Path(path)
  try:
    data = json.loads(_read_text(path))
  except ValueError as error:  # JSONDecodeError, or an integer over Python's digit limit
    raise DataError(f'{path}: not valid JSON ({error})') from error
  except RecursionError as error:
    raise DataError(f'{path}: JSON nested too deeply to be a point file') from error
  if origin not in ('center', 'corner'):
    raise ValueError(f"origin must be 'center' or 'corner', got {origin!r}")
  points, polygons, skipped = [], [], set()
  try:
    for where, geometry, is_result in _geometries(data, path, 'the document'):
      kind = geometry.get('type')
      coordinates = geometry.get('coordinates')
      if kind == 'Point':
        points.append(_position(coordinates, path, f'{where}: Point'))
      elif kind == 'MultiPoint':
        if not isinstance(coordinates, list):
          raise DataError(f'{path}: {where}: MultiPoint coordinates must be a list of [x, y] '
                          f'positions, found {_describe(coordinates)}')
        for k, point in enumerate(coordinates):
          points.append(_position(point, path, f'{where}: MultiPoint position {k}'))
      elif with_polygons and kind in ('Polygon', 'MultiPolygon') and not is_result:
        members = [coordinates] if kind == 'Polygon' else coordinates
        if not isinstance(members, list):
          raise DataError(f'{path}: {where}: MultiPolygon coordinates must be a list of polygons, '
                          f'found {_describe(members)}')
        shift = 0.5 if origin == 'corner' else 0.0
        for k, member in enumerate(members):
          label = f'{where}: {kind}' + (f' polygon {k}' if kind == 'MultiPolygon' else '')
          polygons.append([ring - shift for ring in _rings(member, path, label)])
      else:
        skipped.add(str(kind))
  except RecursionError as error:
    raise DataError(f'{path}: GeoJSON geometries nested too deeply') from error
  return _finish(points, path, origin), polygons, skipped


def _rings(value, path, where: str) -> list[np.ndarray]:
  """The rings of one GeoJSON polygon: (n, 2) float64 arrays of at least 3 distinct positions."""
  if not isinstance(value, list) or not value:
    raise DataError(f'{path}: {where}: coordinates must be a list of rings, found '
                    f'{_describe(value)}')
  rings = []
  for index, ring in enumerate(value):
    name = f'{where} ring {index}'
    if not isinstance(ring, list):
      raise DataError(f'{path}: {name}: must be a list of [x, y] positions, found '
                      f'{_describe(ring)}')
    array = np.array([_position(p, path, f'{name} position {k}') for k, p in enumerate(ring)],
                     np.float64).reshape(-1, 2)
    if len(np.unique(array, axis=0)) < 3:
      raise DataError(f'{path}: {name}: a ring needs at least 3 distinct positions, found '
                      f'{len(np.unique(array, axis=0))}')
    rings.append(array)
  return rings


def _geometries(data, path, where: str, is_result: bool = False):
  """Yields (where, geometry dict, is_result) for every geometry of a GeoJSON document; `where`
  names it, `is_result` says its Feature is a QuPath detection or cell (RESULT_OBJECT_TYPES)."""
  if isinstance(data, list) and where == 'the document':  # a bare list of Features
    for index, item in enumerate(data):
      yield from _geometries(item, path, _feature_name(item, index))
    return
  if not isinstance(data, dict):
    raise DataError(f'{path}: {where}: expected a GeoJSON object, found {_describe(data)}')
  kind = data.get('type')
  if kind == 'FeatureCollection':
    features = data.get('features', [])
    if not isinstance(features, list):
      raise DataError(f'{path}: {where}: FeatureCollection "features" must be a list, found '
                      f'{_describe(features)}')
    for index, item in enumerate(features):
      yield from _geometries(item, path, _feature_name(item, index))
  elif kind == 'Feature':
    geometry = data.get('geometry')
    if geometry is not None and geometry != {}:  # null geometry: an unlocated Feature, skipped
      yield from _geometries(geometry, path, where if where != 'the document' else 'the Feature',
                             _is_result(data))
  elif kind == 'GeometryCollection':
    members = data.get('geometries', [])
    if not isinstance(members, list):
      raise DataError(f'{path}: {where}: GeometryCollection "geometries" must be a list, found '
                      f'{_describe(members)}')
    for index, item in enumerate(members):
      yield from _geometries(item, path, f'{where}, geometry {index}', is_result)
  elif 'coordinates' in data:
    yield where, data, is_result
  else:
    raise DataError(f'{path}: {where}: unrecognised GeoJSON object of type {_shorten(kind)}')


def _is_result(feature: dict) -> bool:
  """Whether a Feature is a QuPath detection / cell (a result), not an annotation."""
  properties = feature.get('properties')
  object_type = properties.get('objectType') if isinstance(properties, dict) else None
  if object_type is None and isinstance(properties, dict):
    object_type = properties.get('object_type')
  if object_type is None:
    object_type = feature.get('id')  # QuPath 0.2: 'PathDetectionObject', ...
  return isinstance(object_type, str) and object_type.lower() in RESULT_OBJECT_TYPES


def _feature_name(feature, index: int) -> str:
  """'feature 3', with its id or name when it has one: how messages point at a feature."""
  name = f'feature {index}'
  if isinstance(feature, dict):
    label = feature.get('id')
    properties = feature.get('properties')
    if label is None and isinstance(properties, dict):
      label = properties.get('name')
    if isinstance(label, (str, int)) and not isinstance(label, bool):
      name += f' (id {_shorten(label)})'
  return name


def _position(value, path, where: str) -> tuple[float, float]:
  """(x, y) of a GeoJSON position [x, y(, z)]: finite numbers only, else DataError naming `where`."""
  if not isinstance(value, list) or len(value) < 2:
    raise DataError(f'{path}: {where}: coordinates must be [x, y], found {_describe(value)}')
  numbers = []
  for index, number in enumerate(value):
    axis = ('x', 'y', 'z')[index] if index < 3 else f'value {index}'
    if isinstance(number, bool) or not isinstance(number, (int, float)):
      raise DataError(f'{path}: {where}: {axis} must be a number, found {_describe(number)}')
    try:
      number = float(number)
    except OverflowError:  # an integer beyond the float range
      number = math.inf
    if not math.isfinite(number):
      raise DataError(f'{path}: {where}: {axis} is {_shorten(value[index])}, expected a finite '
                      'number')
    numbers.append(number)
  return numbers[0], numbers[1]


def _describe(value) -> str:
  """A short account of a JSON value for messages: its JSON type and (shortened) text."""
  kinds = {str: 'string', list: 'list', dict: 'object', bool: 'boolean', type(None): 'null',
           int: 'number', float: 'number'}
  return f'{kinds.get(type(value), type(value).__name__)} {_shorten(value)}'


def _shorten(value, limit: int = 80) -> str:
  text = repr(value)
  return text if len(text) <= limit else text[:limit - 3] + '...'



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
  with np.errstate(over='ignore'):
    array = np.asarray(points, np.float64).astype(np.float32).reshape(-1, 2)
  if not np.all(np.isfinite(array)):
    k = int(np.argmax(~np.isfinite(array).all(axis=1)))
    raise DataError(f'{path}: point {k} ({_shorten(tuple(points[k]))}) is out of float32 range')
  array = array - 0.5 if origin == 'corner' else array
  return _drop_duplicates(array, path)


def _drop_duplicates(array: np.ndarray, path) -> np.ndarray:
  """Keeps the first point of each pixel (rounded as `check_points_inside` does); warns if any."""
  if len(array) < 2:
    return array
  pixels = np.floor(array.astype(np.float64) + 0.5)
  _, first = np.unique(pixels, axis=0, return_index=True)
  if len(first) == len(array):
    return array
  keep = np.sort(first)
  repeated = np.setdiff1d(np.arange(len(array)), keep)[0]
  same = int(np.nonzero((pixels[keep] == pixels[repeated]).all(axis=1))[0][0])
  warnings.warn(
      f'{path}: {len(array) - len(keep)} duplicated point(s) on the same pixel as an earlier '
      f'point were dropped (e.g. point {repeated} at x={array[repeated, 0]:g}, '
      f'y={array[repeated, 1]:g} repeats point {keep[same]}); {len(keep)} point(s) kept',
      DuplicatePointsWarning, stacklevel=4)
  return array[keep]
