"""A training run on disk: the config it recorded, whether a new config fits it, its weights.

Everything here reads and never writes: evaluate, predict and the final report open a work dir
through `load`, which creates no folder and no file in it. Training asks `check_compatible` before
it touches a work dir that already holds a run.

A rerun may change only what changes neither the model nor the data (`SAFE_CHANGES`: the step
budget, logging, checkpoint and evaluation frequency, evaluation settings, where the data files
live), and only when asked to (`--allow_config_change`); any other difference stops it, listed.
"""

import dataclasses
import json
import pathlib
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from donuseg_jax import checkpoints
from donuseg_jax import cli
from donuseg_jax import models

CONFIG_NAME = 'config.json'
# Dotted config keys (or prefixes ending in '.') a rerun may change with --allow_config_change.
SAFE_CHANGES = (
    'train.epochs', 'train.max_steps', 'train.log_every', 'train.eval_every_epochs',
    'train.checkpoint_every_steps', 'train.keep_checkpoints',
    'eval.',
    'data.data_root', 'data.tfds_dir',
)
_ABSENT = '<absent>'
# Config fields added after runs were already being recorded, each with the value a run whose
# config.json lacks it gets: for what shapes training, the behaviour the code had before the field
# existed; for the evaluation windows, the faster layout (a deliberate choice: old runs evaluate
# with it; --config.eval.windows=fixed restores the old one). `read_config` fills them in, so the
# rest of the code reads every field directly and an older run still resumes, evaluates and
# predicts. A new field goes here too.
ADDED_FIELDS = {
    # Before issue 9's accuracy fixes (f74fb6b): disk M, the paper's alpha, batch-statistics CAMs,
    # the best checkpoint by validation AJI.
    'labels.initial': 'disks',
    'labels.watershed_cap': 20.0,
    'labels.watershed_sigma': 1.0,
    'labels.watershed_band': 3,
    'loss.alpha': 'paper',
    'loss.cam_statistics': 'batch',
    'train.select_metric': 'aji',
    # Later additions.
    'data.folder': '',
    'model.init_from': '',
    'model.init_encoder_only': False,
    'eval.windows': 'throughput',
    'eval.max_window': 1024,
    'eval.margin': 32,
    'eval.blend': 'ramp',
    'eval.grow_px': 0.0,
    'eval.flip_tta': False,
    'eval.unclaimed_min_px': 0,
    'loss.pseudo_background': 'cam',
    'loss.cam_warmup_fraction': 0.0,
    'train.ema_decay': 0.0,
    'train.select_within_sem': 0.0,
}


class RunError(cli.CommandError):
  """A work dir that is not a run, or holds a run this config does not fit."""


@dataclasses.dataclass
class TrainedRun:
  config: ml_collections.ConfigDict
  graphdef: Any
  params: Any
  batch_stats: Any
  which: str  # 'best' or 'latest': where the weights came from
  step: int
  damaged: list  # [(step folder, reason)] skipped as damaged


def config_path(workdir) -> pathlib.Path:
  return pathlib.Path(workdir) / CONFIG_NAME


def read_config(workdir) -> ml_collections.ConfigDict:
  """The config a run recorded; RunError naming the file if missing or unreadable."""
  path = config_path(workdir)
  if not pathlib.Path(workdir).is_dir():
    raise RunError(f'work dir {workdir} does not exist')
  if not path.is_file():
    raise RunError(f'{workdir} is not a training work dir: it has no {CONFIG_NAME}')
  try:
    recorded = json.loads(path.read_text())
  except (OSError, ValueError) as error:
    raise RunError(f'cannot read the recorded config {path}: {error}') from error
  if not isinstance(recorded, dict):
    raise RunError(f'cannot read the recorded config {path}: not a JSON object')
  return ml_collections.ConfigDict(with_added_fields(recorded))


def with_added_fields(recorded: dict) -> dict:
  """`recorded` with every ADDED_FIELDS entry it lacks filled in (a copy; sections it lacks stay
  absent: such a file is not a run config of ours, and the caller's checks name it)."""
  recorded = json.loads(json.dumps(recorded))
  for key, value in ADDED_FIELDS.items():
    section, field = key.split('.')
    if isinstance(recorded.get(section), dict):
      recorded[section].setdefault(field, value)
  return recorded


def config_json(config: ml_collections.ConfigDict) -> str:
  return config.to_json_best_effort(indent=2) + '\n'


def differences(recorded: dict, current: dict) -> list[tuple[str, Any, Any]]:
  """[(dotted key, recorded value, current value)] of every leaf that differs, sorted."""
  old, new = _flatten(recorded), _flatten(current)
  return [(key, old.get(key, _ABSENT), new.get(key, _ABSENT)) for key in sorted(set(old) | set(new))
          if old.get(key, _ABSENT) != new.get(key, _ABSENT)]


def is_safe_change(key: str) -> bool:
  return any(key == safe or (safe.endswith('.') and key.startswith(safe)) for safe in SAFE_CHANGES)


def check_compatible(workdir, config: ml_collections.ConfigDict, *,
                     allow_changes: bool = False) -> list[tuple[str, Any, Any]]:
  """Whether `config` may continue the run in `workdir`; returns the differences it may have.

  No recorded config: fine if the work dir holds no checkpoint either (a new run), else RunError.
  Differences in a key outside SAFE_CHANGES, or any difference without `allow_changes`: RunError
  listing them. Reads only.
  """
  path = config_path(workdir)
  if not path.exists():
    if (pathlib.Path(workdir) / 'checkpoints').is_dir() and any(
        (pathlib.Path(workdir) / 'checkpoints').glob('*/[0-9]*')):
      raise RunError(f'{workdir} holds checkpoints but no {CONFIG_NAME}: it is not known which '
                     'config they were trained with; use a new --workdir')
    return []
  recorded = read_config(workdir).to_dict()
  diffs = differences(recorded, json.loads(config_json(config)))
  if not diffs:
    return []
  unsafe = [d for d in diffs if not is_safe_change(d[0])]
  if unsafe or not allow_changes:
    shown = unsafe or diffs
    lines = [f'{key}: {_show(old)} in the run, {_show(new)} now' for key, old, new in shown]
    if unsafe:
      advice = ('these change the model or the data: use a new --workdir (or rerun with the '
                'recorded config)')
    else:
      advice = ('rerun with --allow_config_change to continue the run with these settings '
                '(a longer step budget also stretches the learning-rate schedule)')
    raise RunError(f'{workdir} holds a run trained with another config ({path}); nothing was '
                   'changed. Differences:\n' + '\n'.join(f'  {line}' for line in lines) +
                   f'\n{advice}')
  return diffs


def load(workdir, *, which: str = 'best', step: int | None = None) -> TrainedRun:
  """The run's recorded config and the weights of its best (or latest) intact checkpoint: the
  moving average of the weights where the run kept one (`train.ema_decay`), else the weights.

  'best' falls back to the latest steps when the run has no (intact) best checkpoint yet. Damaged
  steps are skipped with a warning naming their folder. `step` asks for that saved step of
  `which` and nothing else (RunError naming the saved steps if it is not there). Writes nothing
  in `workdir`.
  """
  config = read_config(workdir)
  config.model.pretrained = ''  # the checkpoint holds every weight; no need for the ImageNet file
  model = models.create_model(config, rngs=nnx.Rngs(config.seed))
  graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  weights = {'params': params, 'batch_stats': batch_stats}
  # A run trained with weight averaging is evaluated, and was selected, by its average (train.py).
  with_ema = config.train.ema_decay > 0
  target = {'step': jax.ShapeDtypeStruct((), np.int32, sharding=device),
            **({'ema': weights} if with_ema else weights)}
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), target)
  ckpts = checkpoints.RunCheckpoints(workdir, read_only=True)
  try:
    if not ckpts.steps('latest') and not ckpts.steps('best'):
      raise RunError(f'{workdir} holds no checkpoint yet (checkpoints/latest and '
                     'checkpoints/best are empty or missing)')
    if step is not None and step not in ckpts.steps(which):
      raise RunError(f'{workdir} has no {which} checkpoint at step {step}; saved {which} steps: '
                     f'{ckpts.steps(which) or "none"}')
    restored = ckpts.restore_intact(abstract, which=which, step=step, partial=True,
                                    fallback_to_latest=which == 'best' and step is None)
  finally:
    ckpts.close()
  if restored.which != which:
    log = logging.warning if restored.damaged else logging.info
    log('%s has no %sbest checkpoint: using latest step %d', workdir,
        'intact ' if restored.damaged else '', restored.step)
  weights = restored.state['ema'] if with_ema else restored.state
  return TrainedRun(config=config, graphdef=graphdef, params=weights['params'],
                    batch_stats=weights['batch_stats'], which=restored.which, step=restored.step,
                    damaged=restored.damaged)


def load_trained_model(workdir, *, which: str = 'best'):
  """(config, graphdef, params, batch_stats) of `load`."""
  run = load(workdir, which=which)
  return run.config, run.graphdef, run.params, run.batch_stats


def _flatten(tree, prefix: str = '') -> dict:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = list(value) if isinstance(value, tuple) else value
  return flat


def _show(value) -> str:
  return value if value is _ABSENT else json.dumps(value)
