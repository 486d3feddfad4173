"""Points: centroids inside their nuclei, user point files, and out-of-image points."""

import json
import re

import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest
import scipy.ndimage

from donuseg_jax.data import images
from donuseg_jax.data import points


def test_centroids_of_squares_in_id_order_with_gaps():
  instances = np.zeros((20, 30), np.int32)
  instances[2:5, 3:6] = 7  # centre (x=4, y=3)
  instances[10:14, 20:22] = 2  # centre (20.5, 11.5) -> rounds half up to (21, 12)
  got = points.centroids_from_instances(instances)
  assert got.dtype == np.float32
  np.testing.assert_array_equal(got, [[21, 12], [4, 3]])  # id 2 first, then id 7


def test_empty_instances_give_no_points():
  assert points.centroids_from_instances(np.zeros((8, 8), np.int32)).shape == (0, 2)


def test_concave_nucleus_point_stays_inside():
  instances = np.zeros((21, 21), np.int32)
  instances[2:19, 2:5] = 1  # a C shape: its centroid lies in the hole
  instances[2:5, 2:19] = 1
  instances[16:19, 2:19] = 1
  mean_x = np.argwhere(instances == 1)[:, 1].mean()
  assert instances[10, int(round(mean_x))] == 0  # the plain centroid would be outside
  (x, y), = points.centroids_from_instances(instances)
  assert instances[int(y), int(x)] == 1
  assert (x, y) == (4, 10)  # the nearest instance pixel to the centroid (7.6, 10)


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(st.integers(0, 2**31 - 1))
def test_every_point_lies_in_its_own_instance(seed):
  rng = np.random.default_rng(seed)
  blobs = scipy.ndimage.gaussian_filter(rng.random((40, 40)), 2) > 0.5
  instances = scipy.ndimage.label(blobs)[0].astype(np.int32) * 3  # ids with gaps
  got = points.centroids_from_instances(instances)
  ids = np.unique(instances)[1:]
  assert len(got) == len(ids)
  assert np.all(got == np.round(got))
  np.testing.assert_array_equal(instances[got[:, 1].astype(int), got[:, 0].astype(int)], ids)


def test_csv_with_extra_columns_and_blank_lines(tmp_path):
  path = tmp_path / 'p.csv'
  path.write_text('name, X ,y,score\na,1.5,2,0.9\n\nb,10,20,0.1\n')
  np.testing.assert_array_equal(points.read_points(path), [[1.5, 2], [10, 20]])
  tsv = tmp_path / 'p.tsv'
  tsv.write_text('x\ty\n3\t4\n')
  np.testing.assert_array_equal(points.read_points(tsv), [[3, 4]])


def test_csv_header_only_means_no_points(tmp_path):
  path = tmp_path / 'none.csv'
  path.write_text('x,y\n')
  assert points.read_points(path).shape == (0, 2)


def test_bad_csv_names_file_and_line(tmp_path):
  path = tmp_path / 'bad.csv'
  path.write_text('x,y\n1,2\n3,oops\n')
  with pytest.raises(images.DataError, match=r'bad\.csv: line 3'):
    points.read_points(path)
  path.write_text('col,row\n1,2\n')
  with pytest.raises(images.DataError, match=r'bad\.csv.*x and y'):
    points.read_points(path)


def _feature(geometry):
  return {'type': 'Feature', 'geometry': geometry, 'properties': {'objectType': 'annotation'}}


def test_geojson_as_qupath_exports_it(tmp_path):
  collection = {'type': 'FeatureCollection', 'features': [
      _feature({'type': 'MultiPoint', 'coordinates': [[10.5, 20.5], [1.5, 2.5]]}),
      _feature({'type': 'Point', 'coordinates': [5.5, 6.5]}),
      _feature({'type': 'Polygon', 'coordinates': [[[0, 0], [1, 0], [1, 1], [0, 0]]]}),
  ]}
  path = tmp_path / 'points.geojson'
  path.write_text(json.dumps(collection))
  # QuPath's (0, 0) is a pixel corner: 0.5 is subtracted to reach pixel centres.
  expected = [[10, 20], [1, 2], [5, 6]]
  np.testing.assert_array_equal(points.read_points(path), expected)
  np.testing.assert_array_equal(points.read_points(path, origin='center'), np.add(expected, 0.5))
  as_list = tmp_path / 'list.json'
  as_list.write_text(json.dumps(collection['features']))
  np.testing.assert_array_equal(points.read_points(as_list), expected)
  single = tmp_path / 'single.geojson'
  single.write_text(json.dumps(collection['features'][1]))
  np.testing.assert_array_equal(points.read_points(single), [[5, 6]])


def test_geojson_without_points_is_an_error(tmp_path):
  path = tmp_path / 'cells.geojson'
  path.write_text(json.dumps([_feature({'type': 'Polygon', 'coordinates': []})]))
  with pytest.raises(images.DataError, match=r'cells\.geojson.*Polygon'):
    points.read_points(path)
  path.write_text('{not json')
  with pytest.raises(images.DataError, match=r'cells\.geojson.*JSON'):
    points.read_points(path)


def test_point_outside_image_names_file_and_point():
  inside = np.array([[0, 0], [99.4, 49.4], [-0.5, -0.5]], np.float32)
  points.check_points_inside(inside, (50, 100, 3), 'slide.csv')
  outside = np.array([[1, 1], [100, 10], [3, 60]], np.float32)
  with pytest.raises(images.DataError, match=r'slide\.csv: point 1 \(x=100, y=10\).*2 point'):
    points.check_points_inside(outside, (50, 100), 'slide.csv')
  with pytest.raises(images.DataError, match='point 0'):
    points.check_points_inside(np.array([[np.nan, 1]]), (5, 5), 'nan.csv')


@pytest.mark.parametrize('bad, found', [
    ('"12.5"', 'x must be a number, found string'),
    ('null', 'x must be a number, found null'),
    ('[1, 2]', 'x must be a number, found list'),
    ('true', 'x must be a number, found boolean'),
    ('NaN', 'x is nan'),
    ('Infinity', 'x is inf'),
    ('1e999', 'x is inf'),
    ('1' + '0' * 400, 'x is 1000'),  # an integer beyond the float range
])
def test_geojson_bad_coordinate_types_name_file_and_feature(tmp_path, bad, found):
  good = json.dumps(_feature({'type': 'Point', 'coordinates': [1.5, 2.5]}))
  bad_feature = ('{"type": "Feature", "id": "cell-7", "geometry": {"type": "Point", '
                 f'"coordinates": [{bad}, 3]}}, "properties": {{}}}}')
  path = tmp_path / 'clicks.geojson'
  path.write_text(f'{{"type": "FeatureCollection", "features": [{good}, {good}, {bad_feature}]}}')
  with pytest.raises(images.DataError,
                     match=rf"clicks\.geojson: feature 2 \(id 'cell-7'\): Point: {re.escape(found)}"):
    points.read_points(path)


@pytest.mark.parametrize('geometry, found', [
    ({'type': 'Point', 'coordinates': '12,3'}, "Point: coordinates must be [x, y], found string '12,3'"),
    ({'type': 'Point', 'coordinates': None}, 'Point: coordinates must be [x, y], found null'),
    ({'type': 'Point', 'coordinates': [[1, 2]]}, 'Point: coordinates must be [x, y], found list'),
    ({'type': 'Point', 'coordinates': [[1, 2], [3, 4]]}, 'Point: x must be a number, found list'),
    ({'type': 'MultiPoint', 'coordinates': 5}, 'MultiPoint coordinates must be a list'),
    ({'type': 'MultiPoint', 'coordinates': [[1, 2], ['a', 2]]},
     "MultiPoint position 1: x must be a number, found string 'a'"),
    ({'type': 'MultiPoint', 'coordinates': [[1, 2], [[3, 4]]]},
     'MultiPoint position 1: coordinates must be [x, y], found list'),
])
def test_geojson_malformed_geometries_name_the_feature(tmp_path, geometry, found):
  path = tmp_path / 'shapes.json'
  features = [_feature({'type': 'Point', 'coordinates': [1, 1]}), _feature(geometry)]
  features[1]['properties']['name'] = 'nucleus B'
  path.write_text(json.dumps(features))
  with pytest.raises(images.DataError,
                     match=rf"shapes\.json: feature 1 \(id 'nucleus B'\): {re.escape(found)}"):
    points.read_points(path)


def test_geojson_odd_structures_are_data_errors(tmp_path):
  path = tmp_path / 'odd.geojson'
  for document, found in [
      ({'type': 'FeatureCollection', 'features': 3}, '"features" must be a list'),
      ({'type': 'FeatureCollection', 'features': [7]}, 'feature 0: expected a GeoJSON object'),
      ({'type': 'Feature', 'geometry': 'here'}, 'expected a GeoJSON object, found string'),
      ({'type': 'GeometryCollection', 'geometries': {}}, '"geometries" must be a list'),
      ('[' * 5000 + ']' * 5000, 'nested too deeply'),
  ]:
    path.write_text(document if isinstance(document, str) else json.dumps(document))
    with pytest.raises(images.DataError, match=rf'odd\.geojson: .*{re.escape(found)}'):
      points.read_points(path)
  # A Feature without a geometry is allowed by GeoJSON: skipped.
  path.write_text(json.dumps([_feature(None), _feature({'type': 'Point', 'coordinates': [2.5, 3.5]})]))
  np.testing.assert_array_equal(points.read_points(path), [[2, 3]])


def test_duplicated_points_dropped_with_a_warning(tmp_path):
  path = tmp_path / 'twice.csv'
  path.write_text('x,y\n10,20\n5,5\n10.2,19.9\n7,8\n5,5\n10,20\n')
  with pytest.warns(points.DuplicatePointsWarning,
                    match=r'twice\.csv: 3 duplicated point\(s\).*point 2 .*repeats point 0.*3 point'):
    got = points.read_points(path)
  np.testing.assert_array_equal(got, [[10, 20], [5, 5], [7, 8]])  # first of each, file order
  geojson = tmp_path / 'twice.geojson'
  geojson.write_text(json.dumps([
      _feature({'type': 'MultiPoint', 'coordinates': [[10.5, 20.5], [1.5, 2.5]]}),
      _feature({'type': 'Point', 'coordinates': [10.5, 20.5]})]))
  with pytest.warns(points.DuplicatePointsWarning, match=r'twice\.geojson: 1 duplicated'):
    np.testing.assert_array_equal(points.read_points(geojson), [[10, 20], [1, 2]])


def test_distinct_points_give_no_warning(tmp_path, recwarn):
  path = tmp_path / 'near.csv'
  path.write_text('x,y\n10,20\n10.6,20\n10,19.4\n')  # neighbouring pixels, not the same one
  assert len(points.read_points(path)) == 3
  assert not [w for w in recwarn if issubclass(w.category, points.DuplicatePointsWarning)]


def test_csv_non_finite_and_malformed_lines_named(tmp_path):
  path = tmp_path / 'odd.csv'
  path.write_text('x,y\n1,2\nnan,3\n')
  with pytest.raises(images.DataError, match=r'odd\.csv: line 3: non-finite'):
    points.read_points(path)
  path.write_text('x,y\n1,"' + '9' * 200_000 + '"\n')  # beyond the csv module's field limit
  with pytest.raises(images.DataError, match=r'odd\.csv: line 2: malformed CSV'):
    points.read_points(path)
