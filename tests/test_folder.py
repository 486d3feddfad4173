"""The folder dataset: a user's images with QuPath points, partial annotation, splits, fine-tuning.

The round trip runs on real TNBC tiles (cropped to keep the smoke model fast): QuPath-style GeoJSON
in (one MultiPoint annotation, one Point feature per nucleus, a region rectangle), `:smoke`
training, predict, and the GeoJSON out checked with shapely.
"""

import importlib
import importlib.util
import json
import pathlib
import subprocess
import sys
import uuid
import warnings

import numpy as np
import PIL.Image
import pytest
import shapely.geometry
import tifffile
from flax import nnx

from configs import folder as folder_config
from donuseg_jax import evaluate
from donuseg_jax import models
from donuseg_jax import predict
from donuseg_jax import train
from donuseg_jax import trained_run
from donuseg_jax.data import folder
from donuseg_jax.data import images
from donuseg_jax.data import pipeline
from donuseg_jax.data import points as points_lib
from donuseg_jax.data.readers import folder as reader
from donuseg_jax.data.readers import tnbc
from donuseg_jax.models import init_from

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
CROP = np.s_[100:260, 60:252]  # 160 x 192 of each 512 x 512 tile: any size, not square
TILE_IDS = ('01_1', '01_4', '01_2', '04_1', '01_5')  # a, b, c, d, e: 13 to 30 nuclei in the crop
REGION = (20, 10, 120, 90)
STEPS = 24  # enough for the smoke model to outline some TNBC nuclei  # QuPath rectangle of image c: x0, y0, x1, y1 (pixel corners)


def qupath_feature(geometry: dict, object_type: str = 'annotation') -> dict:
  """A Feature as QuPath >= 0.3 exports it."""
  return {'type': 'Feature', 'id': str(uuid.uuid4()), 'geometry': geometry,
          'properties': {'objectType': object_type, 'classification': {'name': 'Nucleus',
                                                                        'color': [200, 0, 0]}}}


def corners(points) -> list:
  """Pixel-centre (x, y) -> QuPath's pixel-corner coordinates."""
  return [[float(x) + 0.5, float(y) + 0.5] for x, y in points]


def rectangle(x0, y0, x1, y1) -> dict:
  return {'type': 'Polygon', 'coordinates': [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]}


def centroid_points(instances):
  return points_lib.centroids_from_instances(instances)


@pytest.fixture(scope='module')
def tiles(data_root):
  """Five real TNBC tiles, cropped: list of (image, instances) with instances relabelled 1..K."""
  found = {}
  for example in tnbc.iter_examples(data_root / 'tnbc'):
    if example['id'] in TILE_IDS:
      instances = example['instances'][CROP]
      _, relabelled = np.unique(instances, return_inverse=True)
      found[example['id']] = (example['image'][CROP].copy(),
                              relabelled.reshape(instances.shape).astype(np.int32))
    if len(found) == len(TILE_IDS):
      break
  return [found[i] for i in TILE_IDS]


def write_qupath_folder(root: pathlib.Path, tiles) -> dict:
  """a.png: one MultiPoint annotation; b.tif: one Point feature per nucleus; c.png: a region
  rectangle with points inside it only, plus an imported detection polygon; d.png: CSV points and a
  mask (test); e.png: no point file. Returns the points written per stem (pixel centres)."""
  root.mkdir(parents=True, exist_ok=True)
  written = {}
  (image_a, inst_a), (image_b, inst_b), (image_c, inst_c), (image_d, inst_d), (image_e, _) = tiles
  PIL.Image.fromarray(image_a).save(root / 'a.png')
  written['a'] = centroid_points(inst_a)
  (root / 'a.geojson').write_text(json.dumps({'type': 'FeatureCollection', 'features': [
      qupath_feature({'type': 'MultiPoint', 'coordinates': corners(written['a'])})]}))

  tifffile.imwrite(root / 'b.tif', image_b)
  written['b'] = centroid_points(inst_b)
  (root / 'b.geojson').write_text(json.dumps({'type': 'FeatureCollection', 'features': [
      qupath_feature({'type': 'Point', 'coordinates': p}) for p in corners(written['b'])]}))

  PIL.Image.fromarray(image_c).save(root / 'c.png')
  all_c = centroid_points(inst_c)
  x0, y0, x1, y1 = REGION
  inside = (all_c[:, 0] + 0.5 >= x0) & (all_c[:, 0] + 0.5 < x1) & (all_c[:, 1] + 0.5 >= y0) & (
      all_c[:, 1] + 0.5 < y1)
  written['c'] = all_c[inside]
  assert inside.sum() >= 3 and (~inside).sum() >= 10  # nuclei on both sides of the region border
  (root / 'c.geojson').write_text(json.dumps({'type': 'FeatureCollection', 'features': [
      qupath_feature(rectangle(*REGION)),
      qupath_feature({'type': 'MultiPoint', 'coordinates': corners(written['c'])}),
      qupath_feature(rectangle(150, 100, 170, 120), object_type='detection')]}))

  PIL.Image.fromarray(image_d).save(root / 'd.png')
  written['d'] = centroid_points(inst_d)
  lines = ['x,y,class'] + [f'{x:g},{y:g},Nucleus' for x, y in written['d']]
  (root / 'd.csv').write_text('\n'.join(lines) + '\n')
  tifffile.imwrite(root / 'd.mask.tif', inst_d)

  PIL.Image.fromarray(image_e).save(root / 'e.png')  # no point file: left out with a warning
  (root / 'splits.json').write_text(json.dumps({'train': ['a', 'c'], 'val': ['b'], 'test': ['d']}))
  return written


def smoke_config(root, **overrides):
  config = folder_config.get_config('smoke')
  config.unlock()
  config.data.folder = str(root)
  config.train.max_steps = STEPS
  config.train.eval_every_epochs = 4  # 3 steps an epoch here: validate at steps 12 and 24
  config.eval.score_threshold = 0.05  # a model of a few steps is unsure; still outline what it finds
  config.eval.max_images = 0
  for key, value in overrides.items():
    section, field = key.split('.')
    config[section][field] = value
  config.lock()
  return config


@pytest.fixture(scope='module')
def round_trip(tiles, tmp_path_factory):
  """The folder written, a `:smoke` run on it, and predictions of its images."""
  base = tmp_path_factory.mktemp('folder')
  root = base / 'slides'
  written = write_qupath_folder(root, tiles)
  workdir = base / 'run'
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    summary = train.train_and_evaluate(smoke_config(root), workdir)
  config, graphdef, params, batch_stats = trained_run.load_trained_model(workdir)
  from donuseg_jax.inference import predictor  # noqa: PLC0415
  output = base / 'predicted'
  result = predict.predict_paths(
      [root], output, predict_windows=predictor.make_predict_windows(graphdef, params, batch_stats),
      config=config, progress=False)
  return {'root': root, 'written': written, 'workdir': workdir, 'summary': summary,
          'warnings': caught, 'output': output, 'predicted': result}


def test_qupath_points_are_read_on_the_pixel_centre_grid(round_trip):
  examples = folder.load_fold_examples(smoke_config(round_trip['root']).data)
  by_id = {e['id']: e for part in examples.values() for e in part}
  assert sorted(by_id) == ['a', 'b', 'c', 'd']
  for stem in 'abcd':  # MultiPoint, one Point per nucleus, a region's MultiPoint, CSV: same points
    np.testing.assert_array_equal(by_id[stem]['points'], round_trip['written'][stem])
  assert by_id['b']['image'].shape == (160, 192, 3)


def test_region_rectangle_covers_exactly_its_pixels(round_trip):
  example = reader.read_example(reader.scan(round_trip['root']).entries[2])
  assert example['id'] == 'c'
  x0, y0, x1, y1 = REGION  # QuPath: pixel (i, j) covers [j, j + 1) x [i, i + 1)
  expected = np.zeros((160, 192), bool)
  expected[y0:y1, x0:x1] = True  # the detection polygon at (150, 100) is no region
  np.testing.assert_array_equal(example['region'], expected)
  assert reader.read_example(reader.scan(round_trip['root']).entries[0])['region'] is None


def test_training_ran_and_left_out_the_image_without_points(round_trip):
  assert round_trip['summary']['steps'] == STEPS and round_trip['summary']['best_step'] is not None
  messages = [str(w.message) for w in round_trip['warnings']
              if issubclass(w.category, folder.UnannotatedImagesWarning)]
  assert messages and 'e.png' in messages[0] and '1 image(s) without a point file' in messages[0]
  records = [json.loads(line) for line in (round_trip['workdir'] / 'metrics.jsonl').read_text()
             .splitlines()]
  val = [r for r in records if 'val/point_f1' in r]
  assert val and all(np.isnan(float(r['val/aji'])) for r in val)  # b has no mask: point F1 only


def test_predicted_geojson_is_valid_and_counts_the_instances(round_trip):
  output = round_trip['output']
  assert round_trip['predicted']['failed'] == []
  # The mask d.mask.tif is not an image to predict; every image of the folder is.
  assert sorted(round_trip['predicted']['written']) == ['a', 'b', 'c', 'd', 'e']
  total = 0
  for stem in round_trip['predicted']['written']:
    collection = json.loads((output / f'{stem}.geojson').read_text())
    instances = tifffile.imread(output / f'{stem}.instances.tif')
    ids = np.unique(instances[instances > 0])
    assert len(collection['features']) == len(ids)
    for feature in collection['features']:
      polygon = shapely.geometry.shape(feature['geometry'])
      assert polygon.geom_type == 'Polygon' and polygon.is_valid, (stem, feature['id'])
      assert polygon.area > 0
    total += len(ids)
  assert total > 0  # the check saw real polygons


def test_predicted_geojson_reads_back_as_a_region_file(round_trip):
  """Imported into QuPath and exported again, predictions are detections: never a region."""
  path = round_trip['output'] / 'a.geojson'
  with pytest.raises(images.DataError, match='no Point, MultiPoint or Polygon annotation'):
    points_lib.read_annotations_geojson(path)


def test_summary_command_on_the_folder(round_trip):
  result = subprocess.run(
      [sys.executable, '-m', 'donuseg_jax.data', 'summary', '--dataset', 'folder',
       '--data_dir', str(round_trip['root'])],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  summary = json.loads(result.stdout)
  written = round_trip['written']
  assert summary['images'] == 4 and summary['left_out'] == ['e.png']
  assert summary['points'] == sum(len(p) for p in written.values())
  assert summary['splits']['test']['masks'] == 1 and summary['splits']['train']['masks'] == 0
  assert summary['splits']['train']['partially_annotated'] == 1
  x0, y0, x1, y1 = REGION
  assert summary['annotated_fraction'] == {'c': round((x1 - x0) * (y1 - y0) / (160 * 192), 4)}


# --- partial annotation: the unannotated area is never background --------------------------------

def partial_example(tiles):
  """A tile with points only in its left half; instances mark the right half with 7 (a tracer that
  goes through the same crops and turns as the labels: instances are never used by a loss)."""
  image, instances = tiles[2]
  region = np.zeros(instances.shape, bool)
  region[:, :80] = True
  points = centroid_points(instances)
  keep = np.floor(points[:, 0] + 0.5) < 80
  assert keep.sum() >= 3 and (~keep).sum() >= 10
  return {'image': image, 'instances': np.where(region, 0, 7).astype(np.int32),
          'points': points[keep], 'id': 'partial', 'group': '', 'region': region}


def test_partially_annotated_image_never_trains_unannotated_area_as_background(tiles):
  config = smoke_config('unused', **{'data.color_jitter': 'none'})
  example = partial_example(tiles)
  prepared = pipeline.prepare_images([example], config=config)
  batches = pipeline.TrainBatches(prepared, config=config)
  assert batches.steps_per_epoch == 1  # 160 x 80 annotated pixels: 4 crops of 64 x 64
  seen = 0
  for index in range(200):
    sample = batches.sample(index)
    outside = sample['instances'] == 7
    # M ignores the outside; the detector and the CAMs see white glass there, not tissue.
    assert (sample['label_m'][outside] == -1).all()
    assert (sample['image'][outside] == pipeline.PAD_VALUE).all()
    assert (~outside).any()  # every crop holds annotated pixels
    seen += (sample['label_m'] == 0).sum()
  assert seen > 0  # inside the region the unclicked area is background


def test_validation_score_counts_only_inside_the_regions(tiles, monkeypatch):
  """Point F1 inside the region: predictions of the unannotated nuclei are no false positives."""
  image, instances = tiles[2]
  example = partial_example(tiles)
  example.update(instances=np.zeros_like(instances), has_mask=False)
  monkeypatch.setattr(evaluate.predictor, 'predict_image', lambda image, **kwargs: {
      'instances': instances, 'instance_scores': np.ones(instances.max())})
  config = smoke_config('unused')
  partial = evaluate.evaluate_examples([example], predict_windows=None, config=config,
                                       progress=False)
  whole = evaluate.evaluate_examples([dict(example, region=None)], predict_windows=None,
                                     config=config, progress=False)
  inside = np.unique(instances[:, :80][instances[:, :80] > 0])
  assert partial['mean']['point_f1'] > 0.95  # the true instances, inside the region
  assert whole['mean']['point_f1'] < 2 * len(example['points']) / (
      len(example['points']) + len(inside) + 10)
  assert np.isnan(partial['mean']['aji'])  # no mask: no mask metric


def test_masks_are_for_evaluation_only(round_trip):
  config = smoke_config(round_trip['root'])
  entry = reader.scan(round_trip['root']).entries[3]
  with_mask = reader.read_example(entry)
  without = reader.read_example(reader.Entry(entry.stem, entry.image, entry.points, None))
  assert with_mask['has_mask'] and not without['has_mask'] and without['instances'].max() == 0
  assert with_mask['instances'].max() == len(with_mask['points'])
  a, b = pipeline.prepare_images([with_mask, without], config=config)
  np.testing.assert_array_equal(a['label_m'], b['label_m'])
  np.testing.assert_array_equal(a['boxes'], b['boxes'])


# --- bad files, small folders -------------------------------------------------------------------

def one_image_folder(root, tiles, stem='x'):
  root.mkdir(parents=True, exist_ok=True)
  PIL.Image.fromarray(tiles[0][0]).save(root / f'{stem}.png')
  return root


def test_bad_point_file_is_an_error_naming_it(tiles, tmp_path):
  root = one_image_folder(tmp_path / 'bad', tiles)
  (root / 'x.geojson').write_text('{"type": "FeatureCollection", "features": [{"type": "Feature", '
                                  '"geometry": {"type": "Point", "coordinates": ["a", 3]}}]}')
  config = smoke_config(root)
  with pytest.raises(images.DataError, match=r'x\.geojson.*feature 0.*x must be a number'):
    folder.load_fold_examples(config.data)
  (root / 'x.geojson').write_text('[1, 2')
  with pytest.raises(images.DataError, match=r'x\.geojson: not valid JSON'):
    folder.load_fold_examples(config.data)
  (root / 'x.geojson').unlink()
  (root / 'x.csv').write_text('x,y\n5000,3\n')
  with pytest.raises(images.DataError, match=r'x\.csv: point 0 .* outside the image'):
    folder.load_fold_examples(config.data)
  (root / 'x.geojson').write_text(json.dumps(
      {'type': 'Feature', 'geometry': {'type': 'Point', 'coordinates': [3, 3]}}))
  with pytest.raises(images.DataError, match=r'x\.csv and x\.geojson are both point files'):
    folder.load_fold_examples(config.data)


def test_bad_mask_and_region_are_errors_naming_the_file(tiles, tmp_path):
  root = one_image_folder(tmp_path / 'bad', tiles)
  config = smoke_config(root)
  (root / 'x.geojson').write_text(json.dumps({'type': 'FeatureCollection', 'features': [
      qupath_feature(rectangle(5000, 5000, 5100, 5100))]}))
  with pytest.raises(images.DataError, match=r'x\.geojson: its 1 region polygon\(s\) cover no pixel'):
    folder.load_fold_examples(config.data)
  (root / 'x.geojson').write_text(json.dumps(qupath_feature({'type': 'Point',
                                                             'coordinates': [3, 3]})))
  tifffile.imwrite(root / 'x.mask.tif', np.ones((10, 10), np.int32))
  with pytest.raises(images.DataError, match=r'x\.mask\.tif: mask is 10x10 but the image is 192x160'):
    folder.load_fold_examples(config.data)
  (root / 'y.csv').write_text('x,y\n1,1\n')
  with pytest.raises(images.DataError, match=r'y\.csv has no image y'):
    folder.load_fold_examples(config.data)


def test_points_outside_the_regions_are_dropped_with_a_warning(tiles, tmp_path):
  root = one_image_folder(tmp_path / 'out', tiles)
  (root / 'x.geojson').write_text(json.dumps({'type': 'FeatureCollection', 'features': [
      qupath_feature(rectangle(0, 0, 50, 50)),
      qupath_feature({'type': 'MultiPoint', 'coordinates': [[10, 10], [100, 100], [20.5, 30]]})]}))
  with pytest.warns(reader.OutsideRegionWarning, match=r'x\.geojson: 1 of 3 point\(s\).*x=99.5'):
    points, region = reader.read_annotations(root / 'x.geojson', (160, 192))
  np.testing.assert_array_equal(points, [[9.5, 9.5], [20, 29.5]])
  assert region.sum() == 50 * 50


@pytest.mark.parametrize('count, expected', [
    (1, 'train on 1 image(s), select the checkpoint on 1, test on 0; validation uses the training '
        'images'),
    (2, 'train on 1 image(s), select the checkpoint on 1, test on 0; no test image'),
    (3, 'train on 1 image(s), select the checkpoint on 1, test on 1'),
    (10, 'train on 6 image(s), select the checkpoint on 2, test on 2'),
])
def test_small_folders_say_what_is_used_for_what(count, expected):
  stems = [f'img{i}' for i in range(count)]
  split = folder.seeded_split(stems)
  assert sorted(sum(split.values(), [])) == sorted(stems) or count == 1
  assert folder.describe_split(split, source='seeded split').startswith(f'seeded split: {expected}')
  if count < 3:
    with pytest.warns(folder.SplitWarning, match='no test image'):
      folder.split_stems(pathlib.Path('/nonexistent'), stems)


def test_splits_file_errors_name_it(tmp_path):
  path = tmp_path / 'splits.json'
  path.write_text(json.dumps({'train': ['a'], 'val': ['a']}))
  with pytest.raises(images.DataError, match=r"splits\.json: image 'a' is in both"):
    folder.read_splits_file(path, ['a', 'b'])
  path.write_text(json.dumps({'train': ['a', 'zz']}))
  with pytest.raises(images.DataError, match=r"splits\.json: 1 listed image.*\['zz'\]"):
    folder.read_splits_file(path, ['a', 'b'])
  path.write_text(json.dumps({'train': ['a'], 'val': ['b']}))
  with pytest.warns(folder.SplitWarning, match=r"left out: \['c'\]"):
    assert folder.read_splits_file(path, ['a', 'b', 'c']) == {'train': ['a'], 'val': ['b'],
                                                              'test': []}


def test_folder_config_variants():
  module = importlib.import_module('configs.folder')
  paper, cpu, plus, smoke = (module.get_config(v) for v in ('', 'cpu', 'cpu,plus', 'smoke'))
  assert paper.data.name == 'folder' and paper.train.select_metric == 'point_f1'
  assert cpu.model.encoder == 'resnet18' and plus.labels.initial == 'watershed'
  assert smoke.model.encoder == 'tiny' and paper.model.init_from == ''
  with pytest.raises(images.DataError, match='--config.data.folder=DIR'):
    folder.load_fold_examples(paper.data)


# --- fine-tuning -------------------------------------------------------------------------------

def test_init_from_starts_from_the_runs_best_weights(round_trip, tmp_path):
  """One step from the source's best weights stays next to them, far from a fresh init (the
  config is the round trip's, so the compiled step is reused)."""
  source = init_from._flat(trained_run.load_trained_model(round_trip['workdir'])[2])[0]
  config = smoke_config(round_trip['root'], **{'model.init_from': str(round_trip['workdir']),
                                               'train.max_steps': 1})
  train.train_and_evaluate(config, tmp_path / 'tuned')
  tuned = init_from._flat(trained_run.load_trained_model(tmp_path / 'tuned', which='latest')[2])[0]
  fresh = init_from._flat(train.create_train_state(config, total_steps=1)[1].params)[0]
  def distance(a, b):
    return sum(float(np.sum((np.asarray(a[k]) - np.asarray(b[k])) ** 2)) for k in source)
  assert distance(tuned, source) < 0.01 * distance(fresh, source)


def test_init_encoder_only_takes_the_encoder_alone(round_trip):
  _, graphdef, source_params, source_stats = trained_run.load_trained_model(round_trip['workdir'])
  config = folder_config.get_config('smoke')
  config.unlock()
  config.seed = 1  # another init than the source's
  config.lock()
  _, fresh, _, _ = train.create_train_state(config, total_steps=1)
  params, stats = init_from.load_weights(round_trip['workdir'], params=fresh.params,
                                         batch_stats=fresh.batch_stats, encoder_only=True)
  got, want, init = (init_from._flat(t)[0] for t in (params, source_params, fresh.params))
  encoder = [k for k in got if k[0] == 'encoder']
  assert encoder and len(encoder) < len(got)
  for key in got:
    np.testing.assert_array_equal(np.asarray(got[key]),
                                  np.asarray((want if key[0] == 'encoder' else init)[key]))
  for key, value in init_from._flat(stats)[0].items():
    np.testing.assert_array_equal(np.asarray(value), np.asarray(init_from._flat(source_stats)[0][key]))


def test_init_from_a_different_model_names_the_mismatch(round_trip):
  config = folder_config.get_config('smoke')
  config.unlock()
  config.model.head_channels = 8
  config.lock()
  model = nnx.eval_shape(lambda: models.create_model(config, rngs=nnx.Rngs(0)))  # shapes suffice
  _, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  fresh = train.TrainState(step=0, params=params, batch_stats=batch_stats, opt_state=None)
  with pytest.raises(ValueError, match=r'init_from=.*of another shape, e.g. detection/.*'
                                       r'init_encoder_only=True'):
    init_from.load_weights(round_trip['workdir'], params=fresh.params,
                           batch_stats=fresh.batch_stats)
  init_from.load_weights(round_trip['workdir'], params=fresh.params, batch_stats=fresh.batch_stats,
                         encoder_only=True)  # same encoder: fine
  with pytest.raises(FileNotFoundError, match='no checkpoints/ folder'):
    init_from.load_weights(round_trip['root'], params=fresh.params, batch_stats=fresh.batch_stats)


# --- the like-for-like folder of the issue ------------------------------------------------------

def test_folder_from_tnbc_gives_the_tnbc_examples(data_root, tmp_path):
  spec = importlib.util.spec_from_file_location(
      'folder_from_tnbc', REPO_ROOT / 'experiments' / 'folder_from_tnbc.py')
  script = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(script)
  split = script.write_folder(tmp_path / 'tnbc', fold=0, data_root=data_root, limit=1)
  config = folder_config.get_config('smoke')
  config.unlock()
  config.data.folder = str(tmp_path / 'tnbc')
  config.lock()
  examples = folder.load_fold_examples(config.data)
  reference = {e['id']: e for e in tnbc.iter_examples(data_root / 'tnbc')
               if e['id'] in sum(split.values(), [])}
  for part in ('train', 'val', 'test'):
    assert [e['id'] for e in examples[part]] == split[part]
    for example in examples[part]:
      expected = reference[example['id']]
      np.testing.assert_array_equal(example['image'], expected['image'])
      np.testing.assert_array_equal(example['points'], expected['points'])
      assert example['region'] is None and example['has_mask'] == (part == 'test')
      if part == 'test':
        np.testing.assert_array_equal(example['instances'], expected['instances'])
