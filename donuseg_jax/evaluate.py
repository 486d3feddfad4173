"""Evaluation of a trained run on one split: per-image and dataset metrics, as JSON and a table.

  python -m donuseg_jax.evaluate --config=configs/tnbc.py --workdir=runs/tnbc_fold0 --split=test
  python -m donuseg_jax.evaluate --workdir=runs/tnbc_fold0 --split=val --protocol=patch

The network comes from the run (DIR/config.json and its best, or latest, checkpoint); data and eval
settings from --config if given (e.g. --config.eval.instance_method=watershed), else from the run.
Writes DIR/eval_<split>_<protocol>.json (atomically), or --output; nothing else in DIR is touched.

Protocols: `image` scores stitched whole-image predictions against whole ground-truth maps;
`patch` cuts both the whole-image prediction and the ground truth into 256 x 256 crops at stride
128 (data.patches.patch_grid) and scores each crop, as the authors' code did. Mean and std are
over the scored units (images or crops); `aggregate` applies the formulas to counts summed over all
units (metrics.aggregate). The library function `evaluate_examples` also serves training's
validation (`Validator`).
"""

import functools
import os
import pathlib
import sys
import time

import jax
import ml_collections
import numpy as np
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags
from tqdm import tqdm

from donuseg_jax import atomic_io
from donuseg_jax import cli
from donuseg_jax import metrics
from donuseg_jax import trained_run
from donuseg_jax.data import patches
from donuseg_jax.data import regions
from donuseg_jax.inference import predictor

PATCH_SIZE = 256  # crops of the `patch` protocol (the paper's evaluation patches)
PATCH_STRIDE = 128


def point_f1(points: np.ndarray, instances: np.ndarray) -> float:
  """How well predicted instances match the clicked points, with no mask: the F1 of a one-to-one
  matching in which a point matches the instance its pixel lies in (a second point in the same
  instance is a miss). 2 TP / (points + instances); 1 when both are empty.

  It judges detection and splitting, not mask extent; it is what selects a checkpoint when the
  validation images have points but no masks (`config.train.select_metric = 'point_f1'`).
  """
  points = np.asarray(points, np.float64).reshape(-1, 2)
  instances = np.asarray(instances)
  predicted = int(len(np.unique(instances[instances > 0])))
  if len(points) + predicted == 0:
    return 1.0
  rows = np.clip(np.floor(points[:, 1] + 0.5).astype(np.int64), 0, instances.shape[0] - 1)
  cols = np.clip(np.floor(points[:, 0] + 0.5).astype(np.int64), 0, instances.shape[1] - 1)
  hit = instances[rows, cols]
  matched = int(len(np.unique(hit[hit > 0])))
  return 2.0 * matched / (len(points) + predicted)


def evaluate_examples(examples, *, predict_windows, config: ml_collections.ConfigDict,
                      protocol: str | None = None, progress: bool = True) -> dict:
  """Predicts and scores whole-image examples (dicts with 'image', 'instances', 'id').

  protocol: 'image' | 'patch' (None: config.eval.protocol). At most config.eval.max_images
  examples are used (0 = all). Returns dict(protocol, units, per_image=[{id, n_true, n_pred,
  seconds, metrics...}], mean={metric: v}, std={metric: v}, aggregate={metric: v}); for 'patch'
  each per-image entry holds the mean over its crops and 'n_patches'.
  """
  protocol = protocol or config.eval.protocol
  if protocol not in ('image', 'patch'):
    raise ValueError(f'unknown evaluation protocol {protocol!r}: image | patch')
  examples = list(examples)
  if config.eval.max_images:
    examples = examples[:config.eval.max_images]
  if not examples:
    raise ValueError('no examples to evaluate')
  per_image, unit_metrics, unit_counts = [], [], []
  for example in tqdm(examples, desc=f'evaluate ({protocol})', disable=not progress,
                      dynamic_ncols=True):
    start = time.perf_counter()
    result = predictor.predict_image(example['image'], predict_windows=predict_windows,
                                     config=config)
    true, pred = np.asarray(example['instances']), result['instances']
    points = example.get('points')
    region = example.get('region')
    if region is not None:  # partial annotation: score inside the annotated regions only
      true, pred = regions.keep_inside(true, region), regions.keep_inside(pred, region)
      points = np.asarray(points).reshape(-1, 2)[regions.points_inside(points, region)]
    if not example.get('has_mask', True):
      pairs = []  # no ground-truth mask (a user's image): point F1 only
    elif protocol == 'image':
      pairs = [(true, pred)]
    else:
      grid = patches.patch_grid(*true.shape, size=PATCH_SIZE, stride=PATCH_STRIDE)
      pairs = [(true[y:y + PATCH_SIZE, x:x + PATCH_SIZE], pred[y:y + PATCH_SIZE, x:x + PATCH_SIZE])
               for y, x in grid]
    counts = [metrics.instance_counts(t, p) for t, p in pairs]
    values = [metrics.metrics_from_counts(c) for c in counts]
    unit_counts += counts
    unit_metrics += values
    entry = {'id': str(example.get('id', len(per_image))),
             'n_true': int(len(np.unique(true[true > 0]))),
             'n_pred': int(len(result['instance_scores'])),
             'seconds': time.perf_counter() - start}
    entry.update({name: float(np.mean([v[name] for v in values]) if values else np.nan)
                  for name in metrics.METRIC_NAMES})
    if points is not None:
      entry['point_f1'] = point_f1(points, pred)
    if protocol == 'patch':
      entry['n_patches'] = len(pairs)
    per_image.append(entry)
  nan = {name: {'mean': np.nan, 'std': np.nan} for name in metrics.METRIC_NAMES}  # no mask at all
  summary = metrics.summarize(unit_metrics) if unit_metrics else nan
  mean = {name: summary[name]['mean'] for name in metrics.METRIC_NAMES}
  std = {name: summary[name]['std'] for name in metrics.METRIC_NAMES}
  if all('point_f1' in entry for entry in per_image):
    values = [entry['point_f1'] for entry in per_image]
    mean['point_f1'], std['point_f1'] = float(np.mean(values)), float(np.std(values))
  return {'protocol': protocol, 'method': config.eval.instance_method, 'units': len(unit_metrics),
          'per_image': per_image, 'mean': mean, 'std': std,
          'aggregate': ({k: float(v) for k, v in metrics.aggregate(unit_counts).items()}
                        if unit_counts else {k: v['mean'] for k, v in nan.items()})}


class Validator:
  """Training's validation: `Validator(examples, graphdef=..., config=...)(params, batch_stats)`.

  Returns `evaluate_examples`'s dict. The forward is jitted once per graphdef; replicated
  parameters are read from this process's first device, so the windows run on one device.
  """

  def __init__(self, examples, *, graphdef, config: ml_collections.ConfigDict,
               protocol: str | None = None):
    self.examples = list(examples)
    self.graphdef = graphdef
    self.config = config
    self.protocol = protocol
    self.forward_windows = predictor.make_forward_windows(  # compiled at the first call
        graphdef, flips=config.eval.flip_tta)

  def __call__(self, params, batch_stats) -> dict:
    params, batch_stats = local_copy(params), local_copy(batch_stats)
    predict_windows = predictor.make_predict_windows(self.graphdef, params, batch_stats,
                                                     forward_windows=self.forward_windows)
    return evaluate_examples(self.examples, predict_windows=predict_windows, config=self.config,
                             protocol=self.protocol, progress=False)


def local_copy(tree):
  """A replicated (possibly multi-device) pytree as single-device arrays, without communication."""
  def first_shard(x):
    if isinstance(x, jax.Array) and len(x.sharding.device_set) > 1:
      return x.addressable_data(0)
    return x
  return jax.tree.map(first_shard, tree)


def format_table(result: dict) -> str:
  """A plain-text table: one row per statistic, one column per metric."""
  names = metrics.METRIC_NAMES
  lines = [f"{'':>10} " + ' '.join(f'{n:>9}' for n in names)]
  lines.append(f"{'mean':>10} " + ' '.join(f"{result['mean'][n]:9.4f}" for n in names))
  lines.append(f"{'std':>10} " + ' '.join(f"{result['std'][n]:9.4f}" for n in names))
  lines.append(f"{'aggregate':>10} " + ' '.join(f"{result['aggregate'][n]:9.4f}" for n in names))
  return '\n'.join(lines)


def evaluate_workdir(workdir, *, split: str, protocol: str | None = None, which: str = 'best',
                     step: int | None = None, config: ml_collections.ConfigDict | None = None,
                     output: str | pathlib.Path | None = None) -> dict:
  """Loads a run (its newest `which` checkpoint, or that saved `step`), evaluates one split,
  writes DIR/eval_<split>_<protocol>.json (or `output`); returns the dict. The output folder is
  checked before the (long) evaluation starts."""
  from donuseg_jax.data import folds  # noqa: PLC0415

  workdir = pathlib.Path(workdir)
  # The output is checked first, from the recorded config alone: before the model is built.
  protocol = protocol or (config or trained_run.read_config(workdir)).eval.protocol
  path = pathlib.Path(output) if output else workdir / f'eval_{split}_{protocol}.json'
  check_output_path(path, hint='' if output else '; pass --output=FILE.json')
  run = trained_run.load(workdir, which=which, step=step)
  run_config, graphdef, params, batch_stats = run.config, run.graphdef, run.params, run.batch_stats
  config = run_config if config is None else config
  for key in ('name', 'fold', 'split_scheme'):
    if config.data[key] != run_config.data[key]:
      logging.warning('evaluating data.%s=%r but the run was trained with %r', key,
                      config.data[key], run_config.data[key])
  examples = folds.load_fold_examples(config)[split]
  predict_windows = predictor.make_predict_windows(graphdef, params, batch_stats,
                                                   flips=config.eval.flip_tta)
  result = evaluate_examples(examples, predict_windows=predict_windows, config=config,
                             protocol=protocol)
  result.update(split=split, checkpoint=run.which, step=run.step, dataset=config.data.name,
                fold=config.data.fold)
  atomic_io.write_json(path, result)
  result['path'] = str(path)
  return result


def check_output_path(path: pathlib.Path, *, hint: str = '') -> None:
  """CommandError unless `path` can be written: its folder exists, is a folder (not a file, which
  os.access alone would accept) and is writable, and `path` is not itself a folder. Creates and
  probes nothing: the default output lies inside the run, which evaluation does not touch."""
  folder = path.parent
  if path.is_dir():
    problem = 'it is a folder; name a .json file'
  elif not folder.exists():
    problem = f'its folder {folder} does not exist'
  elif not folder.is_dir():
    problem = f'{folder} is a file, not a folder'
  elif not os.access(folder, os.W_OK | os.X_OK):
    problem = f'its folder {folder} is read-only'
  else:
    return
  raise cli.CommandError(f'cannot write {path}: {problem}{hint}')


def define_flags() -> dict:
  """The command's flags; defined only when run as a command, so importing this module (training
  imports `Validator`) adds nothing to absl's global flags."""
  return {
      'config': config_flags.DEFINE_config_file(
          'config', None, "Config file for data and eval settings (default: the run's config.json).",
          lock_config=True),
      'workdir': flags.DEFINE_string('workdir', None, 'Training work dir (config.json, checkpoints).'),
      'split': flags.DEFINE_enum('split', 'test', ['train', 'val', 'test'], 'Which split to evaluate.'),
      'protocol': flags.DEFINE_enum('protocol', None, ['image', 'patch'],
                                    'Evaluation protocol (default: config.eval.protocol).'),
      'which': flags.DEFINE_enum('which', 'best', ['best', 'latest'], 'Which checkpoint to load.'),
      'step': flags.DEFINE_integer('step', None, 'A saved step of --which to load (default: '
                                   'the newest; the best is the newest best).'),
      'output': flags.DEFINE_string('output', None,
                                    'Result JSON (default: WORKDIR/eval_<split>_<protocol>.json).'),
  }


def main(argv, *, holders: dict) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not holders['workdir'].value:
    raise app.UsageError('--workdir is required')
  result = evaluate_workdir(holders['workdir'].value, split=holders['split'].value,
                            protocol=holders['protocol'].value, which=holders['which'].value,
                            step=holders['step'].value,
                            config=holders['config'].value, output=holders['output'].value)
  print(f"{result['dataset']} fold {result['fold']}, split {result['split']}, {result['checkpoint']} "
        f"checkpoint (step {result['step']}), protocol "
        f"{result['protocol']}, {len(result['per_image'])} images / {result['units']} units, "
        f"instances by {result['method']}")
  print(format_table(result))
  print(f"wrote {result['path']}")
  sys.stdout.flush()


if __name__ == '__main__':
  cli.run_absl(functools.partial(main, holders=define_flags()))
