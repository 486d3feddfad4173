"""5-fold cross-validation: the main job on every fold, then test metrics as mean +- std over folds.

  python experiments/cross_validation.py --config=configs/tnbc.py:lite --root=runs/cv_tnbc_lite
  python experiments/cross_validation.py --config=configs/cryonuseg.py --folds=0,1,2,3,4 \
      --root=runs/cv_cryo_nodcs --config.loss.use_dcs=False          # an ablation (Table 2)

Each fold k trains in its own subprocess (memory is returned between folds) in ROOT/fold_k, exactly
like `python -m donuseg_jax.main` with --config.data.fold=k: model selection on the validation fold,
then the test fold is reported once (eval_test_<protocol>.json). Rerun the same command after a
crash or a kill: folds with that file are reused, an unfinished fold resumes from its checkpoint.
SIGINT / SIGTERM are passed to the running fold, which checkpoints and stops without a test
report (unlike `main`, so a stopped fold is never taken for a finished one). A fold dir trained
with another config is an error (use a new --root), so results of two settings are never mixed.

Folds can also run on several machines: `--dry_run` prints each fold's command (`--single_fold`),
and `--aggregate_only` then writes the summary from the fold dirs.

Writes ROOT/cv_summary.json and ROOT/cv_summary.md: per fold the test per-image mean and dataset
aggregate, and over folds mean +- population std (ddof=0, as numpy and metrics.summarize; the
sample std, ddof=1, is sqrt(5/4) = 1.118 times larger for 5 folds), in percent like the paper's
Table 1, with the command, config overrides, git commit, date and devices.
"""

import copy
import datetime
import functools
import json
import os
import pathlib
import platform
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
  sys.path.insert(0, str(REPO_ROOT))  # configs/ and donuseg_jax/ from a plain checkout

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from donuseg_jax import metrics  # noqa: E402

NUM_FOLDS = 5
INTERRUPTED_EXIT_CODE = 3  # a fold stopped by a signal after saving a checkpoint: rerun resumes
RUNS_FILE = 'cv_fold_runs.jsonl'  # one line per fold run: host, devices, git, seconds, steps
HEADERS = {'dice': 'DICE', 'aji': 'AJI', 'aji_plus': 'AJI+', 'dq': 'DQ', 'sq': 'SQ', 'pq': 'PQ'}


class FoldError(RuntimeError):
  """A fold's run failed or was interrupted; the folds before it are complete."""


class ConfigMismatchError(ValueError):
  """A fold dir holds a run of a different config."""


# ----------------------------------------------------------------------------- aggregation (pure)

def aggregate_folds(fold_results: Mapping[int, dict]) -> dict:
  """Per-fold test metrics and their mean and population std (ddof=0) over folds.

  fold_results: {fold: `evaluate.evaluate_examples` dict (mean, aggregate, per_image, protocol,
  method, units)}. Returns dict(folds, protocol, method, std_ddof, per_fold=[{fold, n_images,
  units, mean, aggregate}], across_folds={'mean': {metric: {mean, std}}, 'aggregate': ...}), where
  'mean' is each fold's per-image mean (the paper's number) and 'aggregate' each fold's dataset
  aggregate. Values are fractions (0..1).
  """
  if not fold_results:
    raise ValueError('no completed folds to aggregate')
  for key in ('protocol', 'method'):
    values = {result.get(key) for result in fold_results.values()}
    if len(values) > 1:
      raise ValueError(f'folds disagree on {key}: {sorted(map(str, values))}')
  folds = sorted(fold_results)
  per_fold = []
  for fold in folds:
    result = fold_results[fold]
    if result.get('fold', fold) != fold:
      raise ValueError(f"result given for fold {fold} is of fold {result['fold']}")
    per_fold.append({'fold': fold, 'n_images': len(result.get('per_image', ())),
                     'units': result.get('units'),
                     'mean': {n: float(result['mean'][n]) for n in metrics.METRIC_NAMES},
                     'aggregate': {n: float(result['aggregate'][n]) for n in metrics.METRIC_NAMES}})
  first = fold_results[folds[0]]
  return {'folds': folds, 'protocol': first.get('protocol'), 'method': first.get('method'),
          'std_ddof': 0, 'per_fold': per_fold,
          'across_folds': {kind: metrics.summarize([entry[kind] for entry in per_fold])
                           for kind in ('mean', 'aggregate')}}


def format_markdown(summary: dict) -> str:
  """The summary as markdown: two tables in percent (per-image mean, aggregate) and provenance."""
  names = metrics.METRIC_NAMES
  missing = summary.get('missing_folds', [])
  lines = [f"# Cross-validation: {summary.get('dataset', '?')}, `{summary.get('config', '?')}`", '']
  if missing:
    lines += [f"**Incomplete: missing folds {', '.join(map(str, missing))}; the statistics below "
              f"are over {len(summary['folds'])} fold(s) only.**", '']
  lines += [f"Folds {', '.join(map(str, summary['folds']))}, protocol `{summary['protocol']}`, "
            f"instances by `{summary['method']}`. Test-fold metrics in percent of the checkpoint "
            'selected on the validation fold; last row: mean ± std over folds, population std '
            '(ddof=0; the sample std is sqrt(n/(n-1)) times larger).', '']
  for kind, title in (('mean', 'per-image mean over each test fold (as the paper\'s Table 1)'),
                      ('aggregate', 'dataset aggregate of each test fold (counts summed)')):
    lines += [f'## Test metrics: {title}', '',
              '| fold | images | ' + ' | '.join(HEADERS[n] for n in names) + ' |',
              '|---' * (len(names) + 2) + '|']
    for entry in summary['per_fold']:
      lines.append(f"| {entry['fold']} | {entry['n_images']} | "
                   + ' | '.join(f'{100 * entry[kind][n]:.2f}' for n in names) + ' |')
    stats = summary['across_folds'][kind]
    lines.append('| mean ± std | | ' + ' | '.join(
        f"{100 * stats[n]['mean']:.2f} ± {100 * stats[n]['std']:.2f}" for n in names) + ' |')
    lines.append('')
  overrides = ' '.join(override_args(summary.get('overrides', {}))) or '(none)'
  git = summary.get('git') or {}
  machine = summary.get('machine') or {}
  lines += ['## Provenance', '',
            f"- command: `{summary.get('command', '?')}`",
            f"- config: `{summary.get('config', '?')}`, overrides: `{overrides}`",
            f"- git: `{git.get('commit')}`" + (' (dirty working tree)' if git.get('dirty') else ''),
            f"- date: {summary.get('date', '?')}",
            f"- summary written on {machine.get('hostname', '?')}: {machine.get('devices', '?')}"]
  for entry in summary['per_fold']:
    run = entry.get('run')
    if run:
      lines.append(f"- fold {entry['fold']}: {entry.get('status', 'found')}, last run on "
                   f"{run.get('hostname')} ({run.get('devices')}), {run.get('seconds', 0):.0f} s, "
                   f"{run.get('steps')} steps, best step {run.get('best_step')}, "
                   f"git `{(run.get('git') or {}).get('commit')}`")
    else:
      lines.append(f"- fold {entry['fold']}: {entry.get('status', 'found')}, no {RUNS_FILE} record")
  return '\n'.join(lines) + '\n'


# ---------------------------------------------------------------------- fold dirs and the loop

def fold_workdir(root: str | pathlib.Path, fold: int) -> pathlib.Path:
  return pathlib.Path(root) / f'fold_{fold}'


def fold_config(config, fold: int):
  """A copy of the (locked) config with data.fold set."""
  config = copy.deepcopy(config)
  config.data.fold = fold
  return config


def load_fold_result(workdir: pathlib.Path, *, protocol: str, fold: int) -> dict | None:
  """The fold's eval_test_<protocol>.json; None if absent or cut short (a kill mid-write)."""
  path = pathlib.Path(workdir) / f'eval_test_{protocol}.json'
  try:
    result = json.loads(path.read_text())
  except (FileNotFoundError, json.JSONDecodeError):
    return None
  kinds = ('mean', 'aggregate')
  if not all(n in result.get(kind, {}) for kind in kinds for n in metrics.METRIC_NAMES):
    return None
  if result.get('fold', fold) != fold:
    raise ValueError(f"{path} is of fold {result['fold']}, not {fold}")
  return result


def check_fold_config(workdir: pathlib.Path, config) -> None:
  """Raises ConfigMismatchError if workdir/config.json (if any) is not `config`."""
  path = pathlib.Path(workdir) / 'config.json'
  if not path.exists():
    return
  have = _flatten(json.loads(path.read_text()))
  want = _flatten(json.loads(config.to_json_best_effort()))
  absent = object()
  diff = sorted(k for k in have.keys() | want.keys() if have.get(k, absent) != want.get(k, absent))
  if diff:
    details = ', '.join(f"{k}: {have.get(k, '<absent>')!r} there, {want.get(k, '<absent>')!r} now"
                        for k in diff[:8])
    raise ConfigMismatchError(f'{workdir} was trained with another config ({details}); use a new '
                              '--root, or delete that fold dir to retrain it')


def run_cross_validation(config, *, root: str | pathlib.Path, folds: Sequence[int],
                         run_fold: Callable[[int, pathlib.Path], None]) -> dict[int, str]:
  """Runs `run_fold(fold, workdir)` for each fold without a test result; stops at the first failure.

  Every fold dir's config is checked before anything runs. Returns {fold: 'reused' | 'ran' |
  'failed: <why>' | 'not run'}.
  """
  protocol = config.eval.protocol
  for fold in folds:
    check_fold_config(fold_workdir(root, fold), fold_config(config, fold))
  status = {fold: 'not run' for fold in folds}
  for fold in folds:
    workdir = fold_workdir(root, fold)
    if load_fold_result(workdir, protocol=protocol, fold=fold) is not None:
      status[fold] = 'reused'
      logging.info('fold %d: %s/eval_test_%s.json exists, reused', fold, workdir, protocol)
      continue
    try:
      run_fold(fold, workdir)
      if load_fold_result(workdir, protocol=protocol, fold=fold) is None:
        raise FoldError(f'fold {fold} finished without {workdir}/eval_test_{protocol}.json')
      check_fold_config(workdir, fold_config(config, fold))  # the overrides reached the fold
    except FoldError as error:
      status[fold] = f'failed: {error}'
      logging.error('%s', error)
      break
    status[fold] = 'ran'
  return status


def override_args(overrides: Mapping[str, object]) -> list[str]:
  """`--config.path=value` arguments that config_flags parses back to the same values."""
  args = []
  for path, value in overrides.items():
    if isinstance(value, bool):
      text = 'true' if value else 'false'
    elif isinstance(value, float):
      text = repr(value)  # round-trips exactly
    elif isinstance(value, (tuple, list)):
      text = repr(tuple(value))
    else:
      text = str(value)
    args.append(f'--config.{path}={text}')
  return args


class SubprocessRunner:
  """Runs one fold as `python experiments/cross_validation.py ... --single_fold` in a subprocess."""

  def __init__(self, *, config_arg: str, overrides: Mapping[str, object], root: pathlib.Path):
    self.config_arg, self.overrides, self.root = config_arg, dict(overrides), pathlib.Path(root)

  def command(self, fold: int) -> list[str]:
    return [sys.executable, str(pathlib.Path(__file__).resolve()), f'--config={self.config_arg}',
            *override_args(self.overrides), f'--config.data.fold={fold}', f'--root={self.root}',
            '--single_fold']

  def __call__(self, fold: int, workdir: pathlib.Path) -> None:
    del workdir  # the child derives it from --root and the fold
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [str(REPO_ROOT), os.environ.get('PYTHONPATH', '')])))
    logging.info('fold %d: %s', fold, shlex.join(self.command(fold)))
    # Own session: a terminal Ctrl-C reaches only this process, which passes exactly one SIGTERM
    # on (a second signal would make the fold stop at once, without its checkpoint).
    child = subprocess.Popen(self.command(fold), env=env, start_new_session=True,
                             preexec_fn=_die_with_parent)

    def forward(signum, frame):
      del frame
      logging.warning('signal %d: asking fold %d to checkpoint and stop', signum, fold)
      child.send_signal(signal.SIGTERM)
    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, forward) for sig in signals}
    try:
      while True:
        # Short waits: a signal that the OS gave another thread runs `forward` only between them.
        try:
          code = child.wait(timeout=1.0)
          break
        except subprocess.TimeoutExpired:
          pass
    finally:
      for sig, handler in previous.items():
        signal.signal(sig, handler)
    if code == INTERRUPTED_EXIT_CODE:
      raise FoldError(f'fold {fold} was interrupted after a checkpoint; rerun to resume')
    if code != 0:
      raise FoldError(f'fold {fold} exited with code {code}; rerun to resume from its checkpoint')


def _die_with_parent() -> None:
  """In the child (Linux): SIGTERM when the runner dies, so no orphan keeps training a fold dir."""
  try:
    import ctypes  # noqa: PLC0415
    ctypes.CDLL('libc.so.6', use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
  except (OSError, AttributeError):
    pass


def train_and_report_fold(config, workdir: pathlib.Path) -> bool:
  """In this process: trains (resuming), and writes the test report only if training finished.

  A run stopped by a signal must not leave eval_test_*.json, which would mark the fold as done.
  Appends a record to workdir/cv_fold_runs.jsonl. Returns whether the fold is complete.
  """
  from donuseg_jax import parallel  # noqa: PLC0415 (imports JAX)
  parallel.maybe_initialize_distributed()
  import jax  # noqa: PLC0415
  from donuseg_jax import report  # noqa: PLC0415
  from donuseg_jax import train  # noqa: PLC0415

  start, started = time.perf_counter(), _now()
  summary = train.train_and_evaluate(config, workdir)
  complete = summary['steps'] >= summary['total_steps']
  if complete:
    report.write_final_report(workdir)  # on every process, as donuseg_jax.main does
  if jax.process_index() == 0:
    record = dict(summary, fold=config.data.fold, complete=complete, started=started,
                  seconds=time.perf_counter() - start, hostname=platform.node(),
                  devices=str(jax.devices()), git=git_state())
    with (pathlib.Path(workdir) / RUNS_FILE).open('a') as f:
      f.write(json.dumps(record) + '\n')
  return complete


# ---------------------------------------------------------------------------------- provenance

def git_state() -> dict:
  """{'commit': HEAD or None, 'dirty': tracked changes or untracked files, 'changed_paths': n}."""
  def git(*args):
    return subprocess.run(['git', '-C', str(REPO_ROOT), *args], capture_output=True, text=True,
                          check=True).stdout
  try:
    changed = [line for line in git('status', '--porcelain').splitlines() if line.strip()]
    return {'commit': git('rev-parse', 'HEAD').strip(), 'dirty': bool(changed),
            'changed_paths': len(changed)}
  except (OSError, subprocess.CalledProcessError):
    return {'commit': None, 'dirty': None, 'changed_paths': None}


def _last_run_record(workdir: pathlib.Path) -> dict | None:
  path = pathlib.Path(workdir) / RUNS_FILE
  if not path.exists():
    return None
  records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  return records[-1] if records else None


def _machine() -> dict:
  """This process's host and JAX devices; called after every fold's subprocess has exited."""
  os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')  # only a look at the devices
  import jax  # noqa: PLC0415
  return {'hostname': platform.node(), 'devices': str(jax.devices()), 'jax': jax.__version__}


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')


def _flatten(tree: dict, prefix: str = '') -> dict:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


def write_summary(root: pathlib.Path, config, *, folds: Sequence[int], status: Mapping[int, str],
                  config_arg: str, overrides: Mapping[str, object]) -> dict | None:
  """Aggregates the completed folds into ROOT/cv_summary.{json,md}; None if no fold is complete."""
  results = {}
  for fold in folds:
    result = load_fold_result(fold_workdir(root, fold), protocol=config.eval.protocol, fold=fold)
    if result is not None:
      results[fold] = result
  if not results:
    return None
  summary = {'dataset': config.data.name, 'config': config_arg, 'overrides': dict(overrides),
             'command': shlex.join([pathlib.Path(sys.executable).name, *sys.argv]),
             'folds_requested': list(folds),
             'missing_folds': [f for f in folds if f not in results],
             'date': _now(), 'git': git_state(), 'machine': _machine()}
  summary.update(aggregate_folds(results))
  for entry in summary['per_fold']:
    entry['status'] = status.get(entry['fold'], 'found')
    entry['run'] = _last_run_record(fold_workdir(root, entry['fold']))
  (root / 'cv_summary.json').write_text(json.dumps(summary, indent=2) + '\n')
  (root / 'cv_summary.md').write_text(format_markdown(summary))
  return summary


# ------------------------------------------------------------------------------------- command

def define_flags() -> dict:
  """Defined only when run as a command, so tests can import this file."""
  return {
      'config': config_flags.DEFINE_config_file(
          'config', None, 'Config file (configs/<name>.py[:lite|:smoke]); --config.x=y overrides.',
          lock_config=True),
      'root': flags.DEFINE_string('root', None, 'CV directory: ROOT/fold_k, ROOT/cv_summary.*'),
      'folds': flags.DEFINE_list('folds', [str(k) for k in range(NUM_FOLDS)], 'Folds to run.'),
      'aggregate_only': flags.DEFINE_bool('aggregate_only', False,
                                          'Run nothing; summarise the completed fold dirs.'),
      'dry_run': flags.DEFINE_bool('dry_run', False,
                                   "Print each fold's state and command; run nothing."),
      'single_fold': flags.DEFINE_bool(
          'single_fold', False, 'Train and report fold --config.data.fold in this process, in '
          'ROOT/fold_k (what the runner starts per fold); no summary.'),
  }


def main(argv, *, holders: dict) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not holders['config'].value or not holders['root'].value:
    raise app.UsageError('--config and --root are required')
  logging.set_verbosity(logging.INFO)
  config = holders['config'].value
  root = pathlib.Path(holders['root'].value).absolute()
  if holders['single_fold'].value:
    complete = train_and_report_fold(config, fold_workdir(root, config.data.fold))
    sys.exit(0 if complete else INTERRUPTED_EXIT_CODE)

  config_flag = flags.FLAGS['config']
  overrides = dict(config_flags.get_override_values(config_flag))
  if 'data.fold' in overrides:
    raise app.UsageError('choose folds with --folds, not --config.data.fold')
  folds = list(dict.fromkeys(int(k) for k in holders['folds'].value))
  if not folds or any(not 0 <= k < NUM_FOLDS for k in folds):
    raise app.UsageError(f'--folds must name folds in 0..{NUM_FOLDS - 1}')
  config_arg = config_flags.get_config_filename(config_flag)
  runner = SubprocessRunner(config_arg=config_arg, overrides=overrides, root=root)
  if holders['dry_run'].value:
    for fold in folds:
      done = load_fold_result(fold_workdir(root, fold), protocol=config.eval.protocol, fold=fold)
      print(f"fold {fold} ({'done' if done else 'to run'}): {shlex.join(runner.command(fold))}")
    return
  status = {}
  if not holders['aggregate_only'].value:
    root.mkdir(parents=True, exist_ok=True)
    try:
      status = run_cross_validation(config, root=root, folds=folds, run_fold=runner)
    except ConfigMismatchError as error:
      sys.exit(f'error: {error}')
  summary = write_summary(root, config, folds=folds, status=status, config_arg=config_arg,
                          overrides=overrides)
  if summary is None:
    print(f'no completed fold in {root}')
  else:
    print((root / 'cv_summary.md').read_text())
  failed = {k: v for k, v in status.items() if v.startswith('failed')}
  if failed or summary is None or summary['missing_folds']:
    sys.exit(f'cross-validation incomplete: {failed or "folds missing"}; rerun to resume')


if __name__ == '__main__':
  app.run(functools.partial(main, holders=define_flags()))
