"""experiments/cross_validation.py: aggregation over folds, resume and skip, override pass-through.

No training here: a stand-in runner writes what a finished fold leaves (config.json and
eval_test_<protocol>.json); the real per-fold job is checked by running the command on :smoke.
"""

import importlib.util
import json
import pathlib
import signal
import sys
import threading
import time

import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from configs import demo
from donuseg_jax import metrics

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location('cross_validation',
                                               REPO_ROOT / 'experiments' / 'cross_validation.py')
cv = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cv)


def _result(fold, base, *, protocol='image', method='boxes', n_images=10):
  """An eval_test json as `report.write_final_report` writes it: per-image mean and aggregate."""
  mean = {name: base + 0.01 * i for i, name in enumerate(metrics.METRIC_NAMES)}
  return {'protocol': protocol, 'method': method, 'units': n_images, 'fold': fold,
          'per_image': [dict(mean, id=str(i)) for i in range(n_images)],
          'mean': mean, 'std': {name: 0.1 for name in metrics.METRIC_NAMES},
          'aggregate': {name: value - 0.05 for name, value in mean.items()}}


def test_aggregate_folds_mean_and_population_std():
  results = {2: _result(2, 0.80, n_images=8), 0: _result(0, 0.60), 1: _result(1, 0.70)}
  summary = cv.aggregate_folds(results)
  assert summary['folds'] == [0, 1, 2] and [e['fold'] for e in summary['per_fold']] == [0, 1, 2]
  assert [e['n_images'] for e in summary['per_fold']] == [10, 10, 8]
  assert summary['protocol'] == 'image' and summary['method'] == 'boxes'
  assert summary['std_ddof'] == 0
  dice = summary['across_folds']['mean']['dice']
  assert dice['mean'] == pytest.approx(0.70)
  assert dice['std'] == pytest.approx(np.sqrt(2 * 0.1 ** 2 / 3))  # ddof=0: 0.0816, not 0.1
  pq = summary['across_folds']['aggregate']['pq']  # aggregate = mean - 0.05; pq = base + 0.05
  assert pq['mean'] == pytest.approx(0.70) and pq['std'] == pytest.approx(dice['std'])
  assert summary['per_fold'][1]['aggregate']['aji'] == pytest.approx(0.70 + 0.01 - 0.05)


def test_aggregate_folds_rejects_mixed_or_mislabelled_results():
  with pytest.raises(ValueError, match='protocol'):
    cv.aggregate_folds({0: _result(0, 0.5), 1: _result(1, 0.5, protocol='patch')})
  with pytest.raises(ValueError, match='method'):
    cv.aggregate_folds({0: _result(0, 0.5), 1: _result(1, 0.5, method='watershed')})
  with pytest.raises(ValueError, match='of fold 3'):
    cv.aggregate_folds({0: _result(3, 0.5)})
  with pytest.raises(ValueError, match='no completed folds'):
    cv.aggregate_folds({})


def test_markdown_is_in_percent_with_mean_and_std_row():
  summary = cv.aggregate_folds({0: _result(0, 0.6399), 1: _result(1, 0.6519)})
  summary.update(dataset='tnbc', config='configs/tnbc.py:lite', missing_folds=[2, 3, 4],
                 overrides={'loss.use_dcs': False}, command='python cv.py', date='2026-01-01',
                 git={'commit': 'abc123', 'dirty': True},
                 machine={'hostname': 'h', 'devices': 'cpu'})
  text = cv.format_markdown(summary)
  assert '**Incomplete: missing folds 2, 3, 4;' in text
  assert '| 0 | 10 | 63.99 | 64.99 | 65.99 |' in text
  # Population std of two folds 1.2 points apart: 0.60 (the sample std would be 0.85).
  assert '| mean ± std | | 64.59 ± 0.60 | 65.59 ± 0.60 |' in text
  assert '| 0 | 10 | 58.99 |' in text  # the aggregate table (aggregate = mean - 5 points)
  assert '`--config.loss.use_dcs=false`' in text and '`abc123` (dirty working tree)' in text
  assert 'Incomplete' not in cv.format_markdown(dict(summary, missing_folds=[]))


@pytest.fixture
def config():
  return demo.get_config('smoke')


def _write_done(workdir, config, fold, base=0.5):
  """What a finished fold leaves behind."""
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / 'config.json').write_text(cv.fold_config(config, fold).to_json_best_effort(indent=2))
  (workdir / f'eval_test_{config.eval.protocol}.json').write_text(json.dumps(_result(fold, base)))


class FakeRunner:
  """Records the folds it is asked to run and leaves a finished fold (or fails on `fail_on`)."""

  def __init__(self, config, *, fail_on=(), write_result=True):
    self.config, self.fail_on, self.write_result, self.calls = config, fail_on, write_result, []

  def __call__(self, fold, workdir):
    self.calls.append(fold)
    if fold in self.fail_on:
      raise cv.FoldError(f'fold {fold} exited with code 1')
    if self.write_result:
      _write_done(workdir, self.config, fold, base=0.5 + 0.1 * fold)


def test_done_folds_are_reused_and_unfinished_ones_run(tmp_path, config):
  _write_done(tmp_path / 'fold_0', config, 0)
  killed = tmp_path / 'fold_1'  # killed mid-training: config and checkpoints, no test result
  killed.mkdir()
  (killed / 'config.json').write_text(cv.fold_config(config, 1).to_json_best_effort())
  (killed / 'checkpoints').mkdir()
  cut = tmp_path / 'fold_2'  # killed while the report was being written
  _write_done(cut, config, 2)
  path = cut / 'eval_test_image.json'
  path.write_text(path.read_text()[:40])
  runner = FakeRunner(config)
  status = cv.run_cross_validation(config, root=tmp_path, folds=[0, 1, 2, 3], run_fold=runner)
  assert runner.calls == [1, 2, 3]
  assert status == {0: 'reused', 1: 'ran', 2: 'ran', 3: 'ran'}
  again = FakeRunner(config)
  status = cv.run_cross_validation(config, root=tmp_path, folds=[0, 1, 2, 3], run_fold=again)
  assert again.calls == [] and set(status.values()) == {'reused'}


def test_a_failed_fold_stops_the_run_and_a_rerun_resumes(tmp_path, config):
  runner = FakeRunner(config, fail_on=(1,))
  status = cv.run_cross_validation(config, root=tmp_path, folds=[0, 1, 2], run_fold=runner)
  assert runner.calls == [0, 1]
  assert status[0] == 'ran' and status[1].startswith('failed: fold 1') and status[2] == 'not run'
  rerun = FakeRunner(config)
  cv.run_cross_validation(config, root=tmp_path, folds=[0, 1, 2], run_fold=rerun)
  assert rerun.calls == [1, 2]


def test_a_fold_that_leaves_no_result_is_a_failure(tmp_path, config):
  runner = FakeRunner(config, write_result=False)
  status = cv.run_cross_validation(config, root=tmp_path, folds=[3, 4], run_fold=runner)
  assert runner.calls == [3] and 'without' in status[3] and status[4] == 'not run'


def test_fold_dirs_of_another_config_are_refused_before_anything_runs(tmp_path, config):
  _write_done(tmp_path / 'fold_4', config, 4)
  ablation = demo.get_config('smoke')
  ablation.loss.use_dcs = False
  runner = FakeRunner(ablation)
  with pytest.raises(cv.ConfigMismatchError, match='loss.use_dcs: True there, False now'):
    cv.run_cross_validation(ablation, root=tmp_path, folds=[0, 4], run_fold=runner)
  assert runner.calls == []
  with pytest.raises(ValueError, match='of fold 4, not 1'):  # a result copied into the wrong dir
    cv.load_fold_result(tmp_path / 'fold_4', protocol='image', fold=1)
  # An override lost on the way to the fold's process is caught after the fold ran.
  lossy = FakeRunner(config)
  with pytest.raises(cv.ConfigMismatchError, match='loss.use_dcs: True there, False now'):
    cv.run_cross_validation(ablation, root=tmp_path / 'other', folds=[0], run_fold=lossy)
  assert lossy.calls == [0]


def _parse(argv):
  values = flags.FlagValues()
  holder = config_flags.DEFINE_config_file('config', None, 'config', flag_values=values,
                                           lock_config=True, sys_argv=argv)
  values(argv)
  return holder.value, values['config'].override_values


def test_override_args_reproduce_the_config(monkeypatch):
  monkeypatch.chdir(REPO_ROOT)
  argv = ['cv', '--config=configs/demo.py:smoke', '--noconfig.loss.use_dcs',
          '--config.optim.learning_rate=0.0033', '--config.model.pretrained=',
          '--config.eval.protocol=patch', '--config.train.max_steps=7']
  config, overrides = _parse(argv)
  assert overrides == {'loss.use_dcs': False, 'optim.learning_rate': 0.0033,
                       'model.pretrained': '', 'eval.protocol': 'patch', 'train.max_steps': 7}
  again, _ = _parse(['cv', '--config=configs/demo.py:smoke', *cv.override_args(overrides)])
  assert again.to_dict() == config.to_dict() and again.loss.use_dcs is False
  command = cv.SubprocessRunner(config_arg='configs/demo.py:smoke', overrides=overrides,
                                root=pathlib.Path('/r')).command(2)
  assert command[2:] == ['--config=configs/demo.py:smoke', *cv.override_args(overrides),
                         '--config.data.fold=2', '--root=/r', '--single_fold']


class ScriptRunner(cv.SubprocessRunner):
  """The real runner around a stand-in fold: a Python snippet instead of training."""

  def __init__(self, code):
    super().__init__(config_arg='unused', overrides={}, root=pathlib.Path('.'))
    self.code = code

  def command(self, fold):
    return [sys.executable, '-c', self.code]


def test_runner_exit_codes_and_signal_forwarding(tmp_path):
  ScriptRunner('pass')(0, tmp_path)
  with pytest.raises(cv.FoldError, match='exited with code 1'):
    ScriptRunner('raise SystemExit(1)')(0, tmp_path)
  # A fold that, like training, saves and exits INTERRUPTED_EXIT_CODE on its first SIGTERM.
  ready = tmp_path / 'ready'
  code = (f'import pathlib, signal, sys, time\n'
          f'signal.signal(signal.SIGTERM, lambda *_: sys.exit({cv.INTERRUPTED_EXIT_CODE}))\n'
          f'pathlib.Path({str(ready)!r}).touch()\n'
          f'time.sleep(20)\n')

  # Ctrl-C at the runner once the fold can handle SIGTERM, delivered to this helper thread, not
  # the one waiting on the fold (the OS may pick any thread): the runner must still forward it.
  # The wait for the fold to start is generous (a loaded machine takes seconds to start Python);
  # the time that counts runs from the signal.
  sent = []

  def interrupt_when_ready():
    deadline = time.monotonic() + 120
    while not ready.exists() and time.monotonic() < deadline:
      time.sleep(0.02)
    sent.append(time.monotonic())
    signal.pthread_kill(threading.get_ident(), signal.SIGINT)
  before = signal.getsignal(signal.SIGINT)
  thread = threading.Thread(target=interrupt_when_ready)
  thread.start()
  with pytest.raises(cv.FoldError, match='interrupted after a checkpoint'):
    ScriptRunner(code)(0, tmp_path)
  thread.join()
  assert time.monotonic() - sent[0] < 15  # forwarded, not waited out (the fold sleeps 20 s)
  assert signal.getsignal(signal.SIGINT) is before  # the runner put the handler back


def test_summary_files_of_a_partial_cross_validation(tmp_path, config):
  for fold in (0, 1, 3):
    _write_done(tmp_path / f'fold_{fold}', config, fold, base=0.5 + 0.1 * fold)
  with (tmp_path / 'fold_1' / cv.RUNS_FILE).open('w') as f:
    f.write(json.dumps({'seconds': 12.0, 'hostname': 'gpu7', 'devices': '[CudaDevice(id=0)]',
                        'steps': 400, 'best_step': 300, 'git': {'commit': 'c0ffee'}}) + '\n')
  summary = cv.write_summary(tmp_path, config, folds=[0, 1, 2, 3], status={0: 'ran'},
                             config_arg='configs/demo.py:smoke', overrides={})
  saved = json.loads((tmp_path / 'cv_summary.json').read_text())
  assert saved == json.loads(json.dumps(summary))
  assert saved['folds'] == [0, 1, 3] and saved['missing_folds'] == [2]
  assert saved['across_folds']['mean']['dice']['mean'] == pytest.approx((0.5 + 0.6 + 0.8) / 3)
  assert [e['status'] for e in saved['per_fold']] == ['ran', 'found', 'found']
  assert saved['per_fold'][1]['run']['hostname'] == 'gpu7' and saved['per_fold'][0]['run'] is None
  assert 'devices' in saved['machine'] and 'commit' in saved['git'] and saved['date']
  text = (tmp_path / 'cv_summary.md').read_text()
  assert 'missing folds 2;' in text and 'last run on gpu7 ([CudaDevice(id=0)]), 12 s' in text
  assert cv.write_summary(tmp_path / 'empty', config, folds=[0], status={}, config_arg='x',
                          overrides={}) is None
