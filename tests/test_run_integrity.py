"""A work dir keeps its run: a rerun of another config touches nothing, damaged checkpoints are
named and skipped (training, evaluate, predict alike), reading a run writes nothing into it."""

import hashlib
import json
import pathlib
import shutil

import jax
import numpy as np
import pytest
import skimage.io

from configs import demo
from donuseg_jax import checkpoints
from donuseg_jax import evaluate
from donuseg_jax import predict
from donuseg_jax import run_log
from donuseg_jax import train
from donuseg_jax import trained_run
from donuseg_jax.data import folds


def _config(**overrides):
  config = demo.get_config('smoke')
  config.unlock()
  config.train.max_steps = 4
  config.train.eval_every_epochs = 100  # one validation, at the last step: best = latest = 4
  for key, value in overrides.items():
    section, field = key.split('.')
    setattr(config[section], field, value)
  config.lock()
  return config


@pytest.fixture(scope='module')
def finished_run(tmp_path_factory):
  """A 4-step smoke run: checkpoints latest/2, latest/4 and best/4."""
  workdir = tmp_path_factory.mktemp('integrity') / 'run'
  summary = train.train_and_evaluate(_config(), workdir)
  assert (summary['latest_step'], summary['best_step']) == (4, 4)
  return workdir


@pytest.fixture
def run_copy(finished_run, tmp_path):
  copy = tmp_path / 'run'
  shutil.copytree(finished_run, copy)
  return copy


def _snapshot(folder: pathlib.Path) -> dict:
  return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(folder.rglob('*')) if p.is_file()}


def _largest_file(step_dir: pathlib.Path) -> pathlib.Path:
  files = [p for p in step_dir.rglob('*') if p.is_file() and p.name != checkpoints.MANIFEST]
  return max(files, key=lambda p: p.stat().st_size)


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_rerun_with_another_model_stops_listing_differences_and_touches_nothing(run_copy):
  before = _snapshot(run_copy)
  with pytest.raises(trained_run.RunError) as error:
    train.train_and_evaluate(_config(**{'model.fpn_channels': 32, 'optim.learning_rate': 0.5}),
                             run_copy)
  message = str(error.value)
  assert 'model.fpn_channels: 16 in the run, 32 now' in message
  assert 'optim.learning_rate: 0.01 in the run, 0.5 now' in message
  assert 'new --workdir' in message
  # Not even with the flag: these change the model.
  with pytest.raises(trained_run.RunError, match='model.fpn_channels'):
    train.train_and_evaluate(_config(**{'model.fpn_channels': 32}), run_copy,
                             allow_config_change=True)
  assert _snapshot(run_copy) == before


def test_a_run_recorded_before_newer_fields_still_resumes_and_evaluates(run_copy, tmp_path):
  """A config.json without the fields added since (trained_run.ADDED_FIELDS) reads them with the
  behaviour it was trained with, fits today's config, and evaluates through code that reads every
  field directly."""
  path = run_copy / 'config.json'
  recorded = json.loads(path.read_text())
  for key in trained_run.ADDED_FIELDS:
    section, field = key.split('.')
    del recorded[section][field]
  path.write_text(json.dumps(recorded))
  config = trained_run.read_config(run_copy)
  for key, value in trained_run.ADDED_FIELDS.items():
    section, field = key.split('.')
    assert config[section][field] == value, key
  # Today's config set to the old behaviour fits (today's defaults, e.g. loss.alpha, differ).
  assert trained_run.check_compatible(run_copy, _config(**trained_run.ADDED_FIELDS)) == []
  with pytest.raises(trained_run.RunError, match='loss.alpha'):  # it keeps its own behaviour
    trained_run.check_compatible(run_copy, _config())
  result = evaluate.evaluate_workdir(run_copy, split='val', output=tmp_path / 'eval.json')
  assert result['step'] == 4
  # A field the run recorded is never replaced.
  recorded['eval']['flip_tta'] = True
  path.write_text(json.dumps(recorded))
  assert trained_run.read_config(run_copy).eval.flip_tta is True


def test_checkpoints_without_a_recorded_config_are_not_adopted(run_copy):
  (run_copy / 'config.json').unlink()
  with pytest.raises(trained_run.RunError, match='no config.json'):
    train.train_and_evaluate(_config(), run_copy)
  assert not (run_copy / 'config.json').exists()


def test_reading_a_run_creates_nothing(tmp_path):
  workdir = tmp_path / 'untrained'
  with pytest.raises(trained_run.RunError, match='does not exist'):
    trained_run.load(workdir)
  assert not workdir.exists()
  workdir.mkdir()
  (workdir / 'config.json').write_text(trained_run.config_json(_config()))
  with pytest.raises(trained_run.RunError, match='no checkpoint'):
    trained_run.load(workdir)
  with pytest.raises(trained_run.RunError, match='no checkpoint'):
    evaluate.evaluate_workdir(workdir, split='val')
  assert sorted(p.name for p in workdir.iterdir()) == ['config.json']


def test_damaged_newest_checkpoint_is_named_and_the_older_one_used(run_copy, tmp_path, capsys):
  victim = _largest_file(run_copy / 'checkpoints' / 'latest' / '4')
  victim.write_bytes(victim.read_bytes()[:victim.stat().st_size // 2])  # truncated
  run = trained_run.load(run_copy, which='latest')
  assert (run.which, run.step) == ('latest', 2)
  assert [pathlib.Path(p).parts[-2:] for p, _ in run.damaged] == [('latest', '4')]
  assert str(victim) in run.damaged[0][1]  # the manifest names the file
  # evaluate and predict load the same way: they work, from step 2.
  result = evaluate.evaluate_workdir(run_copy, split='val', which='latest',
                                     output=tmp_path / 'eval.json')
  assert result['step'] == 2 and json.loads((tmp_path / 'eval.json').read_text())['step'] == 2
  image = folds.load_fold_examples(run.config)['val'][0]['image']
  skimage.io.imsave(tmp_path / 'tile.png', image, check_contrast=False)
  assert predict.main(['--workdir', str(run_copy), '--which', 'latest', '--input',
                       str(tmp_path / 'tile.png'), '--output', str(tmp_path / 'out')]) == 0
  assert list((tmp_path / 'out').iterdir())
  capsys.readouterr()
  # Training resumes from step 2, sets step 4 aside (kept), and redoes steps 3 and 4: the same
  # step 4 as before (best/4 holds the original, intact).
  summary = train.train_and_evaluate(_config(), run_copy)
  assert summary['steps'] == 4
  assert (run_copy / 'checkpoints' / 'damaged' / 'latest-4').is_dir()
  redone = trained_run.load(run_copy, which='latest')
  original = trained_run.load(run_copy, which='best')
  assert (redone.step, original.step, redone.damaged) == (4, 4, [])
  for a, b in zip(_leaves((redone.params, redone.batch_stats)),
                  _leaves((original.params, original.batch_stats)), strict=True):
    np.testing.assert_array_equal(a, b)
  steps = [r['step'] for r in run_log.read_metrics(run_copy) if 'loss' in r]
  assert steps == [1, 2, 3, 4]  # the records of steps 3 and 4 were cut and written again once


def test_changed_bytes_in_a_complete_checkpoint_fail_its_checksum(run_copy):
  victim = _largest_file(run_copy / 'checkpoints' / 'latest' / '4')
  data = bytearray(victim.read_bytes())
  data[len(data) // 2] ^= 0xFF  # same size, one byte different
  victim.write_bytes(bytes(data))
  run = trained_run.load(run_copy, which='latest')
  assert run.step == 2
  assert 'checksum' in run.damaged[0][1] and str(victim) in run.damaged[0][1]


def test_a_change_orbax_would_restore_is_caught_by_the_manifest(run_copy):
  """A step's meta, changed to other valid JSON of the same size, restores without any error
  from Orbax (wrong data-order seed, same step): only the checksum tells it from the saved one."""
  meta = run_copy / 'checkpoints' / 'latest' / '4' / 'meta' / 'metadata'
  text = meta.read_text()
  assert '"data_seed": 0' in text
  meta.write_text(text.replace('"data_seed": 0', '"data_seed": 7'))
  run = trained_run.load(run_copy, which='latest')
  assert run.step == 2
  assert 'checksum' in run.damaged[0][1] and str(meta) in run.damaged[0][1]


def test_every_step_damaged_is_one_error_listing_them(run_copy):
  for step in ('2', '4'):
    victim = _largest_file(run_copy / 'checkpoints' / 'latest' / step)
    victim.write_bytes(b'')
  with pytest.raises(checkpoints.CheckpointError) as error:
    trained_run.load(run_copy, which='latest')
  text = str(error.value)
  assert 'no intact latest checkpoint' in text
  assert str(run_copy / 'checkpoints' / 'latest' / '2') in text
  assert str(run_copy / 'checkpoints' / 'latest' / '4') in text


def test_metrics_are_cut_back_to_the_restored_step(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  path.write_text(''.join(json.dumps({'step': s, 'loss': 1.0}) + '\n' for s in (1, 2, 3, 4)) +
                  '{"step": 5, "lo')  # a line torn by a kill
  assert run_log.read_metrics(tmp_path) == [{'step': s, 'loss': 1.0} for s in (1, 2, 3, 4)]
  assert run_log.truncate_after(tmp_path, 2) == 2
  assert path.read_text() == ''.join(json.dumps({'step': s, 'loss': 1.0}) + '\n' for s in (1, 2))
  assert run_log.truncate_after(tmp_path, 2) == 0
  assert list(tmp_path.iterdir()) == [path]  # no temporary file left
