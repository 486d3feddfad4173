"""Test set-up: 4 fake CPU devices (sharding tests) and the repository root on sys.path (configs)."""

import os
import pathlib
import sys
import tempfile

# Must happen before JAX is imported anywhere in the test session.
# The suite is dominated by XLA compiles of small models: skip the backend's optimisation passes.
os.environ.setdefault(
    'XLA_FLAGS', '--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# One persistent compilation cache for the session and its subprocesses: the smoke train step is
# compiled by several tests (and by `main` in subprocesses); later compiles become cache reads.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', tempfile.mkdtemp(prefix='donuseg_jax_cache_'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
  sys.path.insert(0, str(REPO_ROOT))

import pytest  # noqa: E402

from donuseg_jax.data import paths  # noqa: E402


@pytest.fixture(scope='session')
def data_root() -> pathlib.Path:
  """The real datasets (../shared/data). Missing data is a failure, never a silent skip."""
  root = paths.data_root()
  if not (root / 'README.md').exists():
    pytest.fail(f'real datasets not found at {root}; set DONUSEG_DATA_ROOT')
  return root


@pytest.fixture(scope='session')
def tfds_dir(tmp_path_factory) -> pathlib.Path:
  """A fresh TFDS directory shared by the tests of one session."""
  return tmp_path_factory.mktemp('tfds')


LEARNED_STEPS = 40  # tens of steps: enough for the smoke model to find the synthetic nuclei


@pytest.fixture(scope='session')
def learned_run(tmp_path_factory):
  """A smoke model trained for LEARNED_STEPS steps on the built-in synthetic tiles, validated at
  steps 18, 36 and 40, so that the tests that compare evaluations and checkpoints compare a model
  that detects something (an untrained head finds nothing at any sensible threshold: 0 = 0).

  Returns (workdir, config, summary)."""
  from configs import demo  # noqa: PLC0415
  from donuseg_jax import train  # noqa: PLC0415

  config = demo.get_config('smoke')
  config.unlock()
  config.train.max_steps = LEARNED_STEPS
  config.train.eval_every_epochs = 3  # 6 steps per epoch on the smoke tiles
  config.train.checkpoint_every_steps = 100
  config.eval.score_threshold = 0.2  # after 40 steps the class scores are still low
  config.lock()
  workdir = tmp_path_factory.mktemp('learned') / 'run'
  summary = train.train_and_evaluate(config, workdir)
  return workdir, config, summary
