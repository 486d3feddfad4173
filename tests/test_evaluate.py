"""Evaluation: image and patch protocols on a real TNBC image, and the command on a smoke run."""

import json

import numpy as np
import pytest
import skimage.io
from scipy import ndimage

from configs import default
from donuseg_jax import evaluate
from donuseg_jax import metrics
from donuseg_jax import run_log
from donuseg_jax import trained_run
from donuseg_jax.data import patches
from donuseg_jax.inference import predictor
from test_predict import TNBC_IMAGE, DarknessNet, write_smoke_run


@pytest.fixture(scope='module')
def tnbc_example(data_root):
  image = skimage.io.imread(data_root / TNBC_IMAGE)[..., :3]
  mask = skimage.io.imread(data_root / TNBC_IMAGE.replace('Slide_01', 'GT_01')) > 0
  instances, _ = ndimage.label(mask, structure=np.ones((3, 3)))  # 8-connected, as the reader does
  return {'id': '01_1', 'image': image, 'instances': instances.astype(np.int32)}


def test_image_protocol_scores_the_stitched_prediction(tnbc_example):
  config = default.get_config()
  result = evaluate.evaluate_examples([tnbc_example, dict(tnbc_example, id='again')],
                                      predict_windows=DarknessNet(), config=config,
                                      protocol='image', progress=False)
  pred = predictor.predict_image(tnbc_example['image'], predict_windows=DarknessNet(),
                                 config=config)['instances']
  want = metrics.instance_metrics(tnbc_example['instances'], pred)
  assert result['units'] == 2 and [e['id'] for e in result['per_image']] == ['01_1', 'again']
  for name in metrics.METRIC_NAMES:
    assert result['per_image'][0][name] == pytest.approx(want[name], abs=1e-12)
    assert result['mean'][name] == pytest.approx(want[name], abs=1e-12)
    assert result['aggregate'][name] == pytest.approx(want[name], rel=1e-6)  # SQ's epsilon
    assert result['std'][name] == pytest.approx(0.0, abs=1e-12)
  assert 0.5 < want['dice'] < 1 and 0.1 < want['aji'] < 1  # a real, imperfect prediction
  assert result['per_image'][0]['n_true'] == tnbc_example['instances'].max()
  json.dumps(result)  # plain Python types only


def test_patch_protocol_averages_over_crops(tnbc_example):
  config = default.get_config()
  result = evaluate.evaluate_examples([tnbc_example], predict_windows=DarknessNet(), config=config,
                                      protocol='patch', progress=False)
  pred = predictor.predict_image(tnbc_example['image'], predict_windows=DarknessNet(),
                                 config=config)['instances']
  grid = patches.patch_grid(512, 512, size=256, stride=128)
  assert len(grid) == 9 and result['units'] == 9 and result['per_image'][0]['n_patches'] == 9
  crops = [metrics.instance_metrics(tnbc_example['instances'][y:y + 256, x:x + 256],
                                    pred[y:y + 256, x:x + 256]) for y, x in grid]
  for name in metrics.METRIC_NAMES:
    values = [c[name] for c in crops]
    assert result['mean'][name] == pytest.approx(np.mean(values), abs=1e-12)
    assert result['std'][name] == pytest.approx(np.std(values), abs=1e-12)
  whole = metrics.instance_metrics(tnbc_example['instances'], pred)
  assert result['mean']['aji'] != pytest.approx(whole['aji'], abs=1e-6)  # really per crop


def test_max_images_and_bad_protocol(tnbc_example):
  config = default.get_config()
  config.eval.max_images = 1
  result = evaluate.evaluate_examples([tnbc_example] * 3, predict_windows=DarknessNet(),
                                      config=config, progress=False)
  assert len(result['per_image']) == 1 and result['protocol'] == 'image'
  with pytest.raises(ValueError, match='protocol'):
    evaluate.evaluate_examples([tnbc_example], predict_windows=DarknessNet(), config=config,
                               protocol='tiles')
  assert 'aggregate' in evaluate.format_table(result)


@pytest.mark.slow
def test_evaluate_command_and_validator_on_a_smoke_run(tmp_path, tfds_dir):
  import jax  # noqa: PLC0415
  from donuseg_jax import parallel  # noqa: PLC0415
  from donuseg_jax import train  # noqa: PLC0415
  from donuseg_jax.data import folds  # noqa: PLC0415

  config = default.get_config('smoke')  # the built-in synthetic dataset
  config.data.tfds_dir = str(tfds_dir)
  workdir = write_smoke_run(tmp_path / 'run', config)
  result = evaluate.evaluate_workdir(workdir, split='val', protocol='patch')
  saved = json.loads((workdir / 'eval_val_patch.json').read_text())
  assert saved['split'] == 'val' and saved['protocol'] == 'patch'
  assert len(saved['per_image']) == config.eval.max_images
  # Point F1 is a per-image score (the clicks against the predicted instances), so it has a mean
  # but no dataset-pooled aggregate.
  assert set(saved['mean']) == {*metrics.METRIC_NAMES, 'point_f1'}
  assert set(result['aggregate']) == set(metrics.METRIC_NAMES)
  # Training's validation: the same numbers, from parameters replicated over the 4-device mesh.
  _, graphdef, params, batch_stats = trained_run.load_trained_model(workdir, which='latest')
  replicated = parallel.replicated(parallel.create_mesh())
  params, batch_stats = jax.device_put((params, batch_stats), replicated)
  validator = evaluate.Validator(folds.load_fold_examples(config)['val'], graphdef=graphdef,
                                 config=config, protocol='patch')
  val = validator(params, batch_stats)
  for name in (*metrics.METRIC_NAMES, 'point_f1'):
    assert val['mean'][name] == pytest.approx(saved['mean'][name], abs=1e-9)


def test_point_f1_counts_a_one_to_one_matching():
  instances = np.zeros((20, 30), np.int32)
  instances[2:6, 2:6] = 1  # holds two points: one match, one miss
  instances[10:14, 10:14] = 2  # holds one point
  instances[15:18, 25:28] = 3  # holds none: a false positive
  points = np.array([[3., 3.], [4., 5.], [11., 12.], [20., 2.]], np.float32)  # the last one: missed
  # 2 matches; 4 points; 3 instances.
  assert evaluate.point_f1(points, instances) == pytest.approx(2 * 2 / (4 + 3))
  assert evaluate.point_f1(np.zeros((0, 2)), np.zeros((5, 5), np.int32)) == 1.
  assert evaluate.point_f1(points, np.zeros((20, 30), np.int32)) == 0.
  # Round half up, as everywhere in the pipeline: x = 5.5 is column 6.
  edge = np.zeros((4, 8), np.int32)
  edge[1, 6] = 1
  assert evaluate.point_f1(np.array([[5.5, 1.]]), edge) == 1.


def test_evaluate_a_chosen_saved_step(learned_run, tmp_path):
  """--step loads that saved step, not the newest: its validation scores equal the ones logged at
  that step; a step that was not kept is refused, naming the saved steps."""
  workdir, _, summary = learned_run
  logged = {r['step']: r for r in run_log.read_metrics(workdir) if 'val/aji' in r}
  early = min(logged)
  assert early != summary['latest_step']
  result = evaluate.evaluate_workdir(workdir, split='val', which='latest', step=early,
                                     output=tmp_path / 'early.json')
  assert (result['checkpoint'], result['step']) == ('latest', early)
  for name in ('aji', 'point_f1'):
    assert result['mean'][name] == pytest.approx(logged[early][f'val/{name}'], abs=1e-6), name
  with pytest.raises(trained_run.RunError, match=r'no latest checkpoint at step 7; saved latest '
                     r'steps: \[18, 36, 40\]'):
    evaluate.evaluate_workdir(workdir, split='val', which='latest', step=7,
                              output=tmp_path / 'missing.json')
