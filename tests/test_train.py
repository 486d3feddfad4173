"""Training loop: sharded step == single-device step, resume, kill mid-save, no retrace, best ckpt."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from configs import demo
from donuseg_jax import parallel
from donuseg_jax import run_log
from donuseg_jax import train
from donuseg_jax import trained_run
from donuseg_jax.data import folds
from donuseg_jax.data import pipeline

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _smoke_config(loss=None, **train_overrides):
  config = demo.get_config('smoke')
  config.unlock()
  for key, value in train_overrides.items():
    setattr(config.train, key, value)
  for key, value in (loss or {}).items():
    setattr(config.loss, key, value)
  config.lock()
  return config


@pytest.fixture(scope='module')
def smoke_batch():
  config = _smoke_config()
  prepared = pipeline.prepare_images(folds.load_fold_examples(config)['train'], config=config)
  batches = pipeline.TrainBatches(prepared, config=config)
  return config, batches.batch_at(0)


def _one_step(config, batch, devices):
  mesh = parallel.create_mesh(devices)
  graphdef, state, tx, schedule = train.create_train_state(config, total_steps=10)
  state = jax.device_put(state, parallel.replicated(mesh))
  step_fn = train.compile_train_step(mesh, graphdef=graphdef, tx=tx, schedule=schedule,
                                     config=config, steps_per_epoch=5)
  state, metrics = step_fn(state, parallel.shard_batch(batch, mesh))
  return jax.device_get(state), jax.device_get(metrics)


def test_sharded_step_equals_single_device_step(smoke_batch):
  config, batch = smoke_batch
  assert len(jax.devices()) == 4, 'tests/conftest.py sets 4 fake CPU devices'
  single_state, single_metrics = _one_step(config, batch, jax.devices()[:1])
  sharded_state, sharded_metrics = _one_step(config, batch, jax.devices())
  np.testing.assert_allclose(sharded_metrics['loss'], single_metrics['loss'], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(single_state), jax.tree.leaves(sharded_state), strict=True):
    np.testing.assert_allclose(np.asarray(b, np.float64), np.asarray(a, np.float64),
                               rtol=2e-4, atol=2e-6)
  # The step moved the parameters (the comparison above is not between two untouched states).
  _, initial, _, _ = train.create_train_state(config, total_steps=10)
  moved = [np.abs(np.asarray(a) - np.asarray(b)).max()
           for a, b in zip(jax.tree.leaves(initial.params), jax.tree.leaves(single_state.params))]
  assert max(moved) > 0


def test_step_is_traced_once(smoke_batch):
  config, batch = smoke_batch
  mesh = parallel.create_mesh()
  graphdef, state, tx, schedule = train.create_train_state(config, total_steps=10)
  state = jax.device_put(state, parallel.replicated(mesh))
  step_fn = train.compile_train_step(mesh, graphdef=graphdef, tx=tx, schedule=schedule,
                                     config=config, steps_per_epoch=2)
  for _ in range(4):  # crosses an epoch boundary: the epoch is traced data, not a constant
    state, _ = step_fn(state, parallel.shard_batch(batch, mesh))
  assert step_fn._cache_size() == 1
  assert int(state.step) == 4


def test_train_resume_and_best_checkpoint(tmp_path):
  workdir = tmp_path / 'run'
  first = train.train_and_evaluate(_smoke_config(max_steps=2), workdir)
  assert first['steps'] == 2 and first['latest_step'] == 2
  with pytest.raises(trained_run.RunError, match=r'train\.max_steps: 2 in the run, 4 now'):
    train.train_and_evaluate(_smoke_config(max_steps=4), workdir)  # a longer run: only if asked
  second = train.train_and_evaluate(_smoke_config(max_steps=4), workdir, allow_config_change=True)
  assert second['steps'] == 4
  records = run_log.read_metrics(workdir)
  steps = [r['step'] for r in records if 'loss' in r]
  assert steps == [1, 2, 3, 4], steps  # the second run started at step 3: nothing repeated
  vals = {r['step']: r['val/point_f1'] for r in records if 'val/aji' in r}
  assert set(vals) == {2, 4}  # evaluated at the end of each run
  # test_best_checkpoint_of_a_learning_run checks the choice where the scores differ.
  config, _, params, batch_stats = trained_run.load_trained_model(workdir, which='best')
  assert config.data.name == 'synthetic' and jax.tree.leaves(params)
  assert json.loads((workdir / 'config.json').read_text())['train']['max_steps'] == 4


def test_best_checkpoint_of_a_learning_run(learned_run):
  """The best checkpoint is the validation step with the highest select_metric (point F1), on a
  run whose validations differ and find nuclei; restoring it reproduces its logged AJI."""
  from donuseg_jax import evaluate  # noqa: PLC0415

  workdir, config, summary = learned_run
  assert config.train.select_metric == 'point_f1'
  vals = {r['step']: r for r in run_log.read_metrics(workdir) if 'val/aji' in r}
  scores = {step: r['val/point_f1'] for step, r in vals.items()}
  assert len(set(scores.values())) == len(scores) and min(scores.values()) > 0
  assert summary['best_step'] == max(scores, key=scores.get)
  result = evaluate.evaluate_workdir(workdir, split='val', which='best')
  best = vals[summary['best_step']]
  assert best['val/aji'] > 0.1
  for name in ('aji', 'dice', 'pq', 'point_f1'):
    assert result['mean'][name] == pytest.approx(best[f'val/{name}'], abs=1e-6), name
  values = [entry['point_f1'] for entry in result['per_image']]  # the logged standard error
  assert best['val_sem/point_f1'] == pytest.approx(np.std(values, ddof=1) / np.sqrt(len(values)))


def test_selection_margin_is_standard_errors_of_the_per_image_scores():
  config = _smoke_config(max_steps=1)
  val = {'mean': {'point_f1': 0.75},
         'per_image': [{'point_f1': v} for v in (0.6, 0.8, 0.7, 0.9)] + [{'point_f1': np.nan}]}
  # sample standard deviation of 0.6, 0.8, 0.7, 0.9 is sqrt(0.05 / 3); four images: / 2
  sem = np.sqrt(0.05 / 3) / 2
  assert train.selection_sem(val, config) == pytest.approx(sem)
  assert train.selection_score(val, config)[:2] == (0.75, 0.0)  # the default: strictly the best
  with config.unlocked():
    config.train.select_within_sem = 1.5
  score, margin, _ = train.selection_score(val, config)
  assert (score, margin) == (0.75, pytest.approx(1.5 * sem))
  assert train.selection_sem({'mean': {}, 'per_image': [{'point_f1': 0.5}]}, config) == 0.0


_KILL_DURING_SAVE = textwrap.dedent('''
    import os, signal, sys
    from donuseg_jax import checkpoints
    original = checkpoints.RunCheckpoints.save_latest
    def save_then_die(self, step, state, meta):
      original(self, step, state, meta)  # the asynchronous save has started, not finished
      if step == int(os.environ['KILL_AT_STEP']):
        os.kill(os.getpid(), signal.SIGKILL)
    checkpoints.RunCheckpoints.save_latest = save_then_die
    from absl import app
    from donuseg_jax import main
    sys.argv = ['main'] + sys.argv[1:]
    app.run(main.main)
''')


def _run_main(workdir, *extra, env_extra=None):
  env = dict(os.environ, **(env_extra or {}))
  env['PYTHONPATH'] = str(REPO_ROOT)
  return subprocess.run(
      [sys.executable, '-c', _KILL_DURING_SAVE, '--config=configs/demo.py:smoke',
       f'--workdir={workdir}', '--config.train.max_steps=6', '--config.train.eval_every_epochs=100',
       '--skip_report', *extra],
      cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_sigkill_during_save_resumes_from_last_complete_checkpoint(tmp_path):
  workdir = tmp_path / 'killed'
  killed = _run_main(workdir, env_extra={'KILL_AT_STEP': '4'})
  assert killed.returncode == -9, killed.stderr[-2000:]
  latest = workdir / 'checkpoints' / 'latest'
  complete_before = sorted(p.name for p in latest.iterdir() if p.name.isdigit())
  assert '2' in complete_before
  resumed = _run_main(workdir, env_extra={'KILL_AT_STEP': '-1'})
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  records = run_log.read_metrics(workdir)
  steps = [r['step'] for r in records if 'loss' in r]
  # Steps 1-4 were logged before the kill; the resumed run restarted after the last complete
  # checkpoint: 2, or 4 if that asynchronous save happened to finish before the kill.
  assert steps[:4] == [1, 2, 3, 4]
  assert steps[4:] in ([3, 4, 5, 6], [5, 6]), steps
  final = sorted(int(p.name) for p in latest.iterdir() if p.name.isdigit())
  assert final[-1] == 6


def poison_losses_from_step(monkeypatch, poison):
  """Makes every train step's loss `poison(loss, aux, step)`, with `step` the step's traced index
  (state.step, 0-based): train_step is wrapped so that, while it is traced, total_loss sees it."""
  original_step, original_loss = train.train_step, train.losses.total_loss

  def step_with_poison(state, batch, **kwargs):
    def poisoned(outputs, batch, **loss_kwargs):
      return poison(*original_loss(outputs, batch, **loss_kwargs), state.step)

    train.losses.total_loss = poisoned
    try:
      return original_step(state, batch, **kwargs)
    finally:
      train.losses.total_loss = original_loss

  monkeypatch.setattr(train, 'train_step', step_with_poison)


def test_non_finite_loss_stops_naming_step_and_term_and_keeps_last_checkpoint(tmp_path, monkeypatch):
  config = _smoke_config(max_steps=4, checkpoint_every_steps=2, eval_every_epochs=100)

  def poison(loss, aux, step):  # NaN from the third step on (index 2)
    nan = jax.numpy.where(step >= 2, jax.numpy.nan, 0.0)
    return loss + nan, dict(aux, **{'loss/seg': aux['loss/seg'] + nan})

  poison_losses_from_step(monkeypatch, poison)
  workdir = tmp_path / 'nan'
  with pytest.raises(train.NonFiniteLossError, match=r'step 3\b.*loss/seg'):
    train.train_and_evaluate(config, workdir)
  monkeypatch.undo()
  # The checkpoint of step 2 is intact and finite; nothing was saved after the bad step.
  latest = sorted(int(p.name) for p in (workdir / 'checkpoints' / 'latest').iterdir()
                  if p.name.isdigit())
  assert latest == [2]
  _, _, params, _ = trained_run.load_trained_model(workdir, which='latest')
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


def _leaves(tree):
  return [np.asarray(leaf, np.float64) for leaf in jax.tree.leaves(tree)]


def test_weight_average_follows_its_recursion(smoke_batch):
  """train.ema_decay keeps e <- d_t e + (1 - d_t) w_t over params and BatchNorm statistics, with
  d_t = min(decay, (1 + t) / (10 + t)), written out here step by step."""
  config, batch = smoke_batch
  config = _smoke_config(ema_decay=0.5)
  mesh = parallel.create_mesh(jax.devices()[:1])
  graphdef, state, tx, schedule = train.create_train_state(config, total_steps=10)
  state = jax.device_put(state, parallel.replicated(mesh))
  step_fn = train.compile_train_step(mesh, graphdef=graphdef, tx=tx, schedule=schedule,
                                     config=config, steps_per_epoch=5)
  expected = _leaves((state.params, state.batch_stats))
  for t, decay in enumerate([1 / 10, 2 / 11, 3 / 12]):  # all below 0.5: the warm-up decides
    state, _ = step_fn(state, parallel.shard_batch(batch, mesh))
    weights = _leaves((state.params, state.batch_stats))
    expected = [decay * e + (1 - decay) * w for e, w in zip(expected, weights, strict=True)]
    averaged = _leaves((state.ema['params'], state.ema['batch_stats']))
    for got, want in zip(averaged, expected, strict=True):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7, err_msg=f'step {t}')
  # The average is not the weights themselves (a copy would pass the recursion at decay 0).
  assert max(np.abs(a - w).max() for a, w in zip(averaged, weights, strict=True)) > 1e-6
  assert train.ema_decay_at(jax.numpy.asarray(1000), 0.99) == pytest.approx(0.99)


def test_weight_averaged_run_validates_resumes_and_loads_its_average(tmp_path, monkeypatch):
  """With train.ema_decay, validation scores the average, the checkpoint keeps it beside the
  weights (a resumed run continues it), and trained_run.load (evaluate, predict) returns it."""
  from donuseg_jax import checkpoints  # noqa: PLC0415
  from donuseg_jax import evaluate  # noqa: PLC0415

  validated = []
  original = evaluate.Validator.__call__

  def recording(self, params, batch_stats):
    validated.append(_leaves((params, batch_stats)))
    return original(self, params, batch_stats)

  monkeypatch.setattr(evaluate.Validator, '__call__', recording)
  workdir = tmp_path / 'run'
  train.train_and_evaluate(_smoke_config(max_steps=2, ema_decay=0.9), workdir)
  train.train_and_evaluate(_smoke_config(max_steps=4, ema_decay=0.9), workdir,
                           allow_config_change=True)
  run = trained_run.load(workdir, which='latest')
  assert run.step == 4
  weights = {'params': run.params, 'batch_stats': run.batch_stats}
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          dict(weights, ema=weights))
  ckpts = checkpoints.RunCheckpoints(workdir, read_only=True)
  try:
    stored = ckpts.restore_intact(abstract, which='latest', partial=True).state
  finally:
    ckpts.close()
  loaded = _leaves((run.params, run.batch_stats))
  average = _leaves((stored['ema']['params'], stored['ema']['batch_stats']))
  raw = _leaves((stored['params'], stored['batch_stats']))
  for a, b in zip(loaded, average, strict=True):
    np.testing.assert_array_equal(a, b)
  assert max(np.abs(a - w).max() for a, w in zip(average, raw, strict=True)) > 1e-6
  assert len(validated) == 2  # at step 2 and at step 4, each on the average of that step
  for a, b in zip(validated[-1], average, strict=True):
    np.testing.assert_array_equal(a, b)


def test_cam_warmup_step_skips_the_cam_pass_and_makes_the_same_update(smoke_batch):
  _, batch = smoke_batch
  config = _smoke_config(loss=dict(cam_warmup_epochs=1))
  assert train.cam_warmup_steps(config, steps_per_epoch=5) == 5  # steps 0-4
  assert train.cam_warmup_steps(_smoke_config(), steps_per_epoch=5) == 0
  no_cams = _smoke_config(loss=dict(cam_warmup_epochs=1, use_dcs=False, use_ccl=False))
  assert train.cam_warmup_steps(no_cams, steps_per_epoch=5) == 0
  # A share of the training, when longer than the epochs: 0.625 of 480 steps = 300 (20 epochs of 15).
  share = _smoke_config(loss=dict(cam_warmup_fraction=0.625))
  assert train.cam_warmup_steps(share, steps_per_epoch=15, total_steps=480) == 300
  assert train.cam_warmup_steps(share, steps_per_epoch=15, total_steps=None) == 0
  both = _smoke_config(loss=dict(cam_warmup_fraction=0.1, cam_warmup_epochs=2))
  assert train.cam_warmup_steps(both, steps_per_epoch=15, total_steps=480) == 48
  assert train.cam_warmup_steps(both, steps_per_epoch=30, total_steps=480) == 60
  full_state, full_metrics = _one_step(config, batch, jax.devices()[:1])
  warm_state, warm_metrics = _one_step(train.without_cam_losses(config), batch,
                                       jax.devices()[:1])
  assert config.loss.use_dcs and config.loss.use_ccl  # the copy leaves the run's config alone
  assert 'dcs/alpha_p' in full_metrics and 'dcs/alpha_p' not in warm_metrics  # no CAM pass
  assert full_metrics['loss/dcs'] > 0 and full_metrics['loss/ccl'] > 0  # computed, weight 0
  np.testing.assert_allclose(warm_metrics['loss'], full_metrics['loss'], rtol=1e-5)
  for a, b in zip(_leaves(full_state), _leaves(warm_state), strict=True):
    np.testing.assert_allclose(b, a, rtol=2e-4, atol=2e-6)
  # After the warm-up the CAM losses change the update: the comparison above can fail.
  late_state, _ = _one_step(_smoke_config(), batch, jax.devices()[:1])
  assert max(np.abs(a - b).max() for a, b in zip(_leaves(full_state.params),
                                                 _leaves(late_state.params), strict=True)) > 1e-6


@pytest.mark.parametrize('warmup', [dict(cam_warmup_epochs=1), dict(cam_warmup_fraction=0.5)])
def test_training_with_a_cam_warmup_logs_cam_metrics_only_after_it(tmp_path, warmup):
  # 2 epochs: either way the first one is the warm-up.
  config = _smoke_config(loss=warmup, max_steps=0, epochs=2)
  train.train_and_evaluate(config, tmp_path)
  lines = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  steps = [line for line in lines if 'loss/seg' in line]
  spe = max(line['step'] for line in steps) // 2
  assert spe >= 1
  cam = config.loss
  for line in steps:  # the line of step s holds the metrics of step s - 1
    after = line['step'] - 1 >= spe
    assert ('dcs/alpha_p' in line) == after, line['step']
    base = line['loss/det'] + line['loss/seg'] + line['loss/loc']
    gated = cam.w_dcs * line['loss/dcs'] + cam.w_ccl * line['loss/ccl']
    assert line['loss'] == pytest.approx(base + gated if after else base, rel=1e-5)
    assert gated > 0 or not after  # the CAM terms are on, and weigh, after the warm-up
