"""Training under faults: SIGTERM/SIGINT save and stop, non-finite gradients behind a finite loss,
the deferred finiteness check, and kill -9 at random points over several restarts."""

import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import test_train
from donuseg_jax import run_log
from donuseg_jax import train
from donuseg_jax import trained_run

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
_config = test_train._smoke_config  # one smoke-config factory for both training test files


def _latest_steps(workdir):
  return sorted(int(p.name) for p in (workdir / 'checkpoints' / 'latest').iterdir()
                if p.name.isdigit())


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_a_checkpoint_and_stops(tmp_path, monkeypatch, signum):
  original = run_log.MetricsWriter.write

  def write_then_signal(self, step, scalars):
    original(self, step, scalars)
    if step == 3:  # mid-run, between checkpoints (every 2 steps)
      os.kill(os.getpid(), signum)

  monkeypatch.setattr(run_log.MetricsWriter, 'write', write_then_signal)
  workdir = tmp_path / 'run'
  config = _config(max_steps=6, eval_every_epochs=100)
  summary = train.train_and_evaluate(config, workdir)
  assert (summary['steps'], summary['total_steps'], summary['latest_step']) == (3, 6, 3)
  assert _latest_steps(workdir) == [2, 3]
  assert signal.getsignal(signum) is not None  # the previous handler is back
  if signum == signal.SIGTERM:  # a rerun resumes from the step saved on the signal
    monkeypatch.setattr(run_log.MetricsWriter, 'write', original)
    assert train.train_and_evaluate(config, workdir)['steps'] == 6
    steps = [r['step'] for r in run_log.read_metrics(workdir) if 'loss' in r]
    assert steps == [1, 2, 3, 4, 5, 6]


@jax.custom_vjp
def _nan_gradient(x, poison):
  """The identity on x; its gradient is NaN where `poison` is true."""
  del poison
  return x


def _nan_gradient_fwd(x, poison):
  return x, poison


def _nan_gradient_bwd(poison, g):
  return g * jnp.where(poison, jnp.nan, 1.0), None


_nan_gradient.defvjp(_nan_gradient_fwd, _nan_gradient_bwd)


def test_non_finite_gradients_behind_a_finite_loss_stop_training(tmp_path, monkeypatch):
  """The loss stays finite, its gradient is NaN from step 3; with log_every=4 the check of step
  3 is the deferred one (made while step 4 runs), and it names step 3, not 4."""
  config = _config(max_steps=6, log_every=4, checkpoint_every_steps=2, eval_every_epochs=100)
  test_train.poison_losses_from_step(
      monkeypatch, lambda loss, aux, step: (_nan_gradient(loss, step >= 2), aux))  # steps 3 on
  workdir = tmp_path / 'nan_grad'
  with pytest.raises(train.NonFiniteLossError, match=r'non-finite gradients at step 3\b'):
    train.train_and_evaluate(config, workdir)
  assert _latest_steps(workdir) == [2]
  assert not [r for r in run_log.read_metrics(workdir) if r['step'] >= 3]
  params = trained_run.load(workdir, which='latest').params
  assert all(np.isfinite(x).all() for x in map(np.asarray, jax.tree.leaves(params)))


# Fault injection: the smoke training killed (SIGKILL) at random moments, rerun until it finishes.
_FAULT_STEPS = 8
_FAULT_FLAGS = ['--config=configs/demo.py:smoke', f'--config.train.max_steps={_FAULT_STEPS}',
                '--config.train.checkpoint_every_steps=2', '--config.train.eval_every_epochs=1',
                '--config.train.keep_checkpoints=2', '--skip_report']


def _fault_config():
  config = _config(max_steps=_FAULT_STEPS, checkpoint_every_steps=2, eval_every_epochs=1,
                   keep_checkpoints=2)
  return config


def _start(workdir):
  env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
  return subprocess.Popen([sys.executable, '-m', 'donuseg_jax.main', f'--workdir={workdir}',
                           *_FAULT_FLAGS], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _logged_steps(workdir):
  return max((r['step'] for r in run_log.read_metrics(workdir)), default=0)


@pytest.mark.slow
def test_kill_9_at_random_points_resumes_to_the_same_parameters(tmp_path):
  seed = int(os.environ.get('DONUSEG_FAULT_SEED', time.time_ns() % 10_000))
  rng = random.Random(seed)
  workdir = tmp_path / 'killed'
  kills, restarts = [], 0
  for _ in range(8):
    process = _start(workdir)
    restarts += 1
    target = rng.randint(1, _FAULT_STEPS) if len(kills) < 3 else None
    if target is not None:
      start = time.monotonic()
      while process.poll() is None and _logged_steps(workdir) < target:
        if time.monotonic() - start > 300:
          break
        time.sleep(0.05)
      time.sleep(rng.uniform(0.0, 1.5))  # lands inside a step, a save or a validation
      if process.poll() is None:
        process.kill()
        kills.append((target, _logged_steps(workdir)))
    out, err = process.communicate(timeout=600)
    if process.returncode == 0:
      break
    assert process.returncode == -signal.SIGKILL, (seed, kills, err[-3000:])
  else:
    pytest.fail(f'no finished run after {restarts} starts (seed {seed}, kills {kills})')
  assert kills, f'seed {seed}: every start finished before its kill'
  assert f"'steps': {_FAULT_STEPS}" in out
  assert not [line for line in err.splitlines() if line[:1] == 'I' and line[1:5].isdigit()], (
      'library INFO logging in a default run:\n' + err[-2000:])
  # Each step's records once, in order: training records, and validations at 6 and 8.
  records = run_log.read_metrics(workdir)
  assert [r['step'] for r in records if 'loss' in r] == list(range(1, _FAULT_STEPS + 1)), (seed, kills)
  assert [r['step'] for r in records if 'val/aji' in r] == [6, 8], (seed, kills)
  # The same parameters, bit for bit, as a run never interrupted.
  reference = tmp_path / 'reference'
  assert train.train_and_evaluate(_fault_config(), reference)['steps'] == _FAULT_STEPS
  for which in ('latest', 'best'):
    killed, clean = trained_run.load(workdir, which=which), trained_run.load(reference, which=which)
    assert killed.step == clean.step, (which, seed, kills)
    for a, b in zip(jax.tree.leaves((killed.params, killed.batch_stats)),
                    jax.tree.leaves((clean.params, clean.batch_stats)), strict=True):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=f'{which} seed {seed}')
