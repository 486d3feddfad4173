"""Reproduce the paper's Table 1, 2 or 3: each row x dataset x fold, our numbers beside the paper's.

  python experiments/reproduce.py table1 --root=runs/reproduce             # paper settings (GPU)
  python experiments/reproduce.py table2 --root=runs/reproduce --datasets=consep --folds=0,1
  python experiments/reproduce.py table3 --root=runs/reproduce_cpu --variant=cpu
  python experiments/reproduce.py table2 --root=/tmp/r --datasets=demo --variant=smoke \
      --rows=base,both --folds=0,1 --max_steps=2 --config.eval.write_overlays=0   # a small dry run
  python experiments/reproduce.py table1 --root=runs/reproduce --dry_run        # commands only

The tables (DoNuSeg, MICCAI 2024, section 3):
  table1  DoNuSeg on CryoNuSeg, CoNSeP and TNBC (paper Table 1; its other rows are other methods).
  table2  L_dcs / L_ccl ablation (paper Table 2, on CryoNuSeg and CoNSeP): base = L_det + L_seg +
          L_loc (`loss.use_dcs=False, loss.use_ccl=False`), + L_dcs, + L_ccl, + both (= DoNuSeg).
  table3  CAM block for the pseudo label (paper Table 3, on CryoNuSeg): `loss.fixed_cam_block` 1..4
          against the dynamic selection (0, = DoNuSeg).
--datasets may name any of tnbc, consep, cryonuseg, monuseg (MoNuSeg is in none of the paper's
tables: its paper columns read "-") and demo (the built-in synthetic tiles, no download).

Each row is a set of config overrides on configs/<dataset>.py[:<variant>], and its folds run with
experiments/cross_validation.py's machinery (imported, not copied): one subprocess per fold, in
ROOT/<dataset>[-<variant>]/<row dir>/fold_k, resumable (rerun the same command after a crash or a
kill: finished folds are reused, an unfinished one resumes from its checkpoint), refused if the dir
holds another config. The row dir is named by the row's overrides (`donuseg` for none), so a run
shared by two tables (Table 1's DoNuSeg = Table 2's "both" = Table 3's "dynamic") trains once.
Each row dir gets cross_validation's cv_summary.{json,md}; ROOT/<table>.md and ROOT/<table>.json
get the table: per-image mean test metrics in percent, mean +- population std (ddof=0, as
cross_validation) over the folds, beside the paper's numbers (Table 1 prints mean +- std over 5
folds, Tables 2 and 3 means only; the paper does not say which std).

Any `--config.path=value` / `--noconfig.path` argument is passed to every row (after the row's own
overrides, which it may not change); `--max_steps=N` is `--config.train.max_steps=N`. Those are not
part of the dir names: a second setting needs its own --root (a mismatch is an error).
"""

import dataclasses
import datetime
import functools
import importlib.util
import json
import math
import os
import pathlib
import platform
import shlex
import signal
import sys
import tempfile
from collections.abc import Mapping, Sequence

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
  sys.path.insert(0, str(REPO_ROOT))  # configs/ and donuseg_jax/ from a plain checkout

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402


def _load_cross_validation():
  """experiments/cross_validation.py as a module (experiments/ is not a package)."""
  name = 'donuseg_cross_validation'
  if name in sys.modules:
    return sys.modules[name]
  path = REPO_ROOT / 'experiments' / 'cross_validation.py'
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  spec.loader.exec_module(module)
  return module


cv = _load_cross_validation()

TABLE_METRICS = ('dice', 'aji', 'dq', 'sq', 'pq')  # the paper's five columns, in its order
DATASET_CONFIGS = {'tnbc': 'tnbc', 'consep': 'consep', 'cryonuseg': 'cryonuseg',
                   'monuseg': 'monuseg', 'demo': 'demo'}  # --datasets name -> configs/<name>.py


@dataclasses.dataclass(frozen=True)
class Row:
  name: str  # as in --rows
  label: str  # as in the Markdown
  overrides: Mapping[str, object]  # on top of the dataset's config (and --variant)

  @property
  def settings(self) -> dict:
    """The overrides with the paper's loss terms filled in: each row sets L_dcs and L_ccl itself,
    whatever the variant does (`plus` turns L_ccl off), so that the tables compare the paper's
    combinations."""
    return {**PAPER_LOSSES, **self.overrides}

  @property
  def dirname(self) -> str:
    """The row's dir: named by its overrides, so equal rows of different tables share one run."""
    if not self.overrides:
      return 'donuseg'
    return ','.join(arg.removeprefix('--config.')
                    for arg in sorted(cv.override_args(self.overrides)))


@dataclasses.dataclass(frozen=True)
class Table:
  title: str
  source: str  # where the paper numbers are from
  datasets: tuple[str, ...]  # the paper's, in its order (the --datasets default)
  rows: tuple[Row, ...]


DONUSEG = {}  # the full method: the configs' defaults (L_dcs and L_ccl on, dynamic CAM selection)
PAPER_LOSSES = {'loss.use_dcs': True, 'loss.use_ccl': True}  # what every row starts from
TABLES = {
    'table1': Table(
        title='Table 1: DoNuSeg, 5-fold cross-validation',
        source='Table 1 ("Performance comparison (%) with SOTA point-supervised methods"), '
               'rows "DoNuSeg (Ours)"',
        datasets=('cryonuseg', 'consep', 'tnbc'),
        rows=(Row('donuseg', 'DoNuSeg', DONUSEG),)),
    'table2': Table(
        title='Table 2: effects of L_dcs and L_ccl',
        source='Table 2 ("Effects (%) of L_dcs and L_ccl on CryoNuSeg and CoNSeP")',
        datasets=('cryonuseg', 'consep'),
        rows=(Row('base', 'base (L_det + L_seg + L_loc)',
                  {'loss.use_dcs': False, 'loss.use_ccl': False}),
              Row('dcs', '+ L_dcs', {'loss.use_ccl': False}),
              Row('ccl', '+ L_ccl', {'loss.use_dcs': False}),
              Row('both', '+ L_dcs + L_ccl (DoNuSeg)', DONUSEG))),
    'table3': Table(
        title='Table 3: CAM selection strategy',
        source='Table 3 ("Effects (%) of the CAM selection strategy on CryoNuSeg")',
        datasets=('cryonuseg',),
        rows=tuple(Row(f'block{k}', f'fixed CAM block {k}', {'loss.fixed_cam_block': k})
                   for k in (1, 2, 3, 4)) + (Row('dynamic', 'dynamic (DCS, DoNuSeg)', DONUSEG),)),
}


def _five(*values):
  return dict(zip(TABLE_METRICS, values, strict=True))


# The paper's numbers (%), typed from /work/shared/paper/DoNuSeg_MICCAI2024.txt, columns DICE, AJI,
# DQ, SQ, PQ. Table 1 gives mean +- std over the 5 folds: (mean, std) pairs; Tables 2 and 3 give
# means only: (mean, None). Table 2's text extraction lost the check-mark columns; its rows are read
# as printed: none, L_dcs only, L_ccl only, both (the last equals Table 1's DoNuSeg row, as does
# Table 3's "ours").
_T1 = {
    'cryonuseg': _five((67.22, 1.30), (44.08, 0.77), (46.41, 1.67), (65.74, 1.31), (30.58, 1.53)),
    'consep': _five((60.20, 2.10), (36.39, 1.77), (36.68, 0.74), (62.33, 1.83), (23.95, 0.99)),
    'tnbc': _five((63.99, 1.18), (50.06, 0.94), (58.77, 0.69), (68.75, 1.34), (40.64, 0.54)),
}


def _means(*values):
  return _five(*((value, None) for value in values))


PAPER = {  # table -> (dataset, row name) -> metric -> (mean, std or None), percent
    'table1': {(dataset, 'donuseg'): values for dataset, values in _T1.items()},
    'table2': {
        ('cryonuseg', 'base'): _means(60.93, 41.78, 42.68, 63.93, 27.32),
        ('cryonuseg', 'dcs'): _means(66.48, 43.82, 46.41, 64.99, 30.20),
        ('cryonuseg', 'ccl'): _means(64.02, 43.71, 45.66, 65.60, 30.06),
        ('cryonuseg', 'both'): _means(67.22, 44.08, 46.41, 65.74, 30.58),
        ('consep', 'base'): _means(53.69, 35.51, 35.77, 55.18, 22.85),
        ('consep', 'dcs'): _means(57.94, 35.75, 35.92, 60.14, 23.36),
        ('consep', 'ccl'): _means(52.98, 36.53, 36.55, 60.43, 23.12),
        ('consep', 'both'): _means(60.20, 36.39, 36.68, 62.33, 23.95),
    },
    'table3': {
        ('cryonuseg', 'block1'): _means(61.95, 40.14, 39.88, 64.81, 27.14),
        ('cryonuseg', 'block2'): _means(64.53, 40.91, 41.16, 65.35, 29.06),
        ('cryonuseg', 'block3'): _means(67.10, 41.44, 40.97, 66.02, 27.37),
        ('cryonuseg', 'block4'): _means(62.84, 41.73, 45.60, 64.38, 28.35),
        ('cryonuseg', 'dynamic'): _means(67.22, 44.08, 46.41, 65.74, 30.58),
    },
}


class Stopped(Exception):
  """SIGINT / SIGTERM while no fold was running."""


# ------------------------------------------------------------------------------- rows and configs

@dataclasses.dataclass
class Job:
  """One row of one dataset: its config and where its folds live."""
  dataset: str
  row: Row
  config_arg: str  # configs/<name>.py[:variant], as cross_validation's --config
  config: object  # locked ConfigDict with every override applied
  overrides: dict  # everything on top of config_arg (row's, then the command's)
  root: pathlib.Path  # ROOT/<dataset>[-<variant>]/<row dir>


def config_arg_for(dataset: str, variant: str) -> str:
  """configs/<name>.py[:variant], relative when run from the repository root."""
  path = REPO_ROOT / 'configs' / f'{DATASET_CONFIGS[dataset]}.py'
  if pathlib.Path.cwd().resolve() == REPO_ROOT:
    path = path.relative_to(REPO_ROOT)
  return f'{path}:{variant}' if variant else str(path)


def parse_config(config_arg: str, args: Sequence[str]):
  """(config, overrides) as cross_validation's --config flag parses `--config=config_arg *args`."""
  argv = ['reproduce', f'--config={config_arg}', *args]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'config', flag_values=values, lock_config=True,
                                  sys_argv=argv)
  values(argv)
  return values['config'].value, dict(config_flags.get_override_values(values['config']))


def dataset_dirname(dataset: str, variant: str) -> str:
  return dataset + (f"-{variant.replace(',', '+')}" if variant else '')


def make_jobs(table: Table, *, root: pathlib.Path, datasets: Sequence[str], rows: Sequence[Row],
              variant: str, config_args: Sequence[str]) -> list[Job]:
  """Every dataset x row, each with its config; --config.* arguments may not touch row settings."""
  jobs = []
  for dataset in datasets:
    config_arg = config_arg_for(dataset, variant)
    _, command_overrides = parse_config(config_arg, config_args)
    row_keys = {key for row in table.rows for key in row.settings}
    clash = sorted((row_keys | {'data.fold'}) & command_overrides.keys())
    if clash:
      raise app.UsageError(f'{", ".join(clash)}: set by the table rows or --folds, not by '
                           '--config.* arguments')
    for row in rows:
      config, overrides = parse_config(config_arg, [*cv.override_args(row.settings),
                                                    *config_args])
      jobs.append(Job(dataset=dataset, row=row, config_arg=config_arg, config=config,
                      overrides=overrides,
                      root=root / dataset_dirname(dataset, variant) / row.dirname))
  return jobs


class InProcessRunner:
  """Trains each fold in this process (one JAX start; for tests and debugging, single host)."""

  def __init__(self, config):
    self.config = config

  def __call__(self, fold: int, workdir: pathlib.Path) -> None:
    if not cv.train_and_report_fold(cv.fold_config(self.config, fold), workdir):
      raise cv.FoldError(f'fold {fold} was interrupted after a checkpoint; rerun to resume')


def _runner(job: Job, in_process: bool):
  if in_process:
    return InProcessRunner(job.config)
  return cv.SubprocessRunner(config_arg=job.config_arg, overrides=job.overrides, root=job.root)


def run_jobs(jobs: Sequence[Job], *, folds: Sequence[int], in_process: bool, keep_going: bool,
             make_runner=_runner) -> dict[tuple[str, str], dict[int, str]]:
  """Runs every job's missing folds; {(dataset, row name): {fold: status}}.

  Stops at an interrupted fold or a signal (raises Stopped), and (unless keep_going) after the
  first failed one. make_runner(job, in_process) -> run_fold(fold, workdir).
  """
  for job in jobs:  # every dir's config, before hours of training
    for fold in folds:
      cv.check_fold_config(cv.fold_workdir(job.root, fold), cv.fold_config(job.config, fold))
  statuses, done = {}, set()
  for job in jobs:
    if job.root in done:  # the same run listed twice (--rows=both,both)
      statuses[job.dataset, job.row.name] = {fold: 'reused' for fold in folds}
      continue
    job.root.mkdir(parents=True, exist_ok=True)
    logging.info('%s / %s: %s', job.dataset, job.row.name, job.root)
    status = cv.run_cross_validation(job.config, root=job.root, folds=folds,
                                     run_fold=make_runner(job, in_process))
    statuses[job.dataset, job.row.name] = status
    done.add(job.root)
    failed = [text for text in status.values() if text.startswith('failed')]
    if any('interrupted' in text for text in failed):
      raise Stopped(failed[0])
    if failed and not keep_going:
      break
  return statuses


# ---------------------------------------------------------------------------------- the table

def _percent(stats: Mapping[str, float]) -> tuple[float, float]:
  return 100 * float(stats['mean']), 100 * float(stats['std'])


def collect(table_name: str, jobs: Sequence[Job], *, folds: Sequence[int],
            statuses: Mapping[tuple[str, str], Mapping[int, str]]) -> list[dict]:
  """Each job's cv_summary (written into its dir) and paper numbers, as the table's rows."""
  entries = []
  for job in jobs:
    status = statuses.get((job.dataset, job.row.name), {})
    summary = cv.write_summary(job.root, job.config, folds=folds, status=status,
                               config_arg=job.config_arg, overrides=job.overrides)
    paper = PAPER[table_name].get((job.dataset, job.row.name))
    entry = {'dataset': job.dataset, 'row': job.row.name, 'label': job.row.label,
             'row_overrides': dict(job.row.overrides), 'overrides': job.overrides,
             'config': job.config_arg, 'workdir': str(job.root),
             'folds_requested': list(folds),
             'folds': summary['folds'] if summary else [],
             'missing_folds': summary['missing_folds'] if summary else list(folds),
             'status': {str(k): v for k, v in status.items()},
             'ours': None, 'paper': None, 'runs': []}
    if summary:
      stats = summary['across_folds']['mean']
      entry['ours'] = {n: dict(zip(('mean', 'std'), _percent(stats[n]))) for n in TABLE_METRICS}
      entry['runs'] = [{'fold': e['fold'], 'status': e['status'],
                        **{k: (e['run'] or {}).get(k)
                           for k in ('steps', 'total_steps', 'best_step', 'seconds', 'hostname',
                                     'devices')}}
                       for e in summary['per_fold']]
    if paper:
      entry['paper'] = {n: {'mean': mean, 'std': std} for n, (mean, std) in paper.items()}
    entries.append(entry)
  return entries


def _cell(value: Mapping | None, *, digits: int = 2) -> str:
  if value is None:
    return '—'
  text = f"{value['mean']:.{digits}f}"
  return text + (f" ± {value['std']:.{digits}f}" if value.get('std') is not None else '')


def format_table(result: dict) -> str:
  """The table as Markdown: ours (mean ± std over folds) beside the paper, then provenance."""
  table = TABLES[result['table']]
  headers = [h for n in TABLE_METRICS for h in (cv.HEADERS[n], f'{cv.HEADERS[n]} (paper)')]
  lines = [f"# Reproduction of the paper's {table.title}", '',
           'Ours: test-fold per-image mean of each fold (the checkpoint selected on the validation '
           'fold), mean ± population std (ddof=0) over the completed folds, in percent. Paper: '
           f'DoNuSeg (MICCAI 2024) {table.source}, as printed (Table 1: mean ± std over 5 folds; '
           'Tables 2 and 3: means only); — = not in the paper, or no completed fold here.', '',
           '| dataset | row | folds | ' + ' | '.join(headers) + ' |',
           '|---' * (3 + len(headers)) + '|']
  for entry in result['rows']:
    done, asked = len(entry['folds']), len(entry['folds_requested'])
    cells = []
    for name in TABLE_METRICS:
      cells.append(_cell(entry['ours'][name] if entry['ours'] else None))
      cells.append(_cell(entry['paper'][name] if entry['paper'] else None))
    folds = f'{done}/{asked}' + ('' if done == asked else ' (incomplete)')
    lines.append(f"| {entry['dataset']} | {entry['label']} | {folds} | " + ' | '.join(cells) + ' |')
  incomplete = [e for e in result['rows'] if e['missing_folds']]
  if incomplete:
    lines += ['', '**Incomplete**: ' + '; '.join(
        f"{e['dataset']} / {e['row']} lacks fold(s) {', '.join(map(str, e['missing_folds']))}"
        for e in incomplete) + '. Rerun the command to resume.']
  git = result.get('git') or {}
  lines += ['', '## Rows', '']
  for entry in result['rows']:
    row_args = ' '.join(cv.override_args(entry['row_overrides'])) or '(none: the full method)'
    steps = '; '.join(f"fold {r['fold']} ({r['status']}): " + (
        f"{r['steps']}/{r['total_steps']} steps, {r['seconds']:.0f} s on {r['devices']}"
        if r.get('steps') is not None else f'no {cv.RUNS_FILE} record') for r in entry['runs'])
    lines.append(f"- {entry['dataset']} / `{entry['row']}` ({entry['label']}): row overrides "
                 f"`{row_args}`; config `{entry['config']}`; dir `{entry['workdir']}`; "
                 f"{steps or 'no completed fold'}")
  machine = result.get('machine') or {}
  command_args = ' '.join(result.get('config_args') or []) or '(none)'
  lines += ['', '## Provenance', '',
            f"- command: `{result['command']}`",
            f"- variant: `{result['variant'] or '(paper settings)'}`, further overrides on every "
            f"row: `{command_args}`",
            f"- git: `{git.get('commit')}`" + (' (dirty working tree)' if git.get('dirty') else ''),
            f"- date: {result['date']}",
            f"- written on {machine.get('hostname', platform.node())}: "
            f"{machine.get('devices', '?')}",
            "- per fold: ROOT/<dataset>/<row>/fold_k (eval_test_*.json, metrics.jsonl, "
            "cv_fold_runs.jsonl); per row: cv_summary.md with every metric (AJI+ too) and the "
            "dataset aggregate"]
  return '\n'.join(lines) + '\n'


def _write_atomic(path: pathlib.Path, text: str) -> None:
  """Writes via a temp file in the same dir + rename: a reader never sees half a file."""
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
  try:
    with os.fdopen(fd, 'w') as f:
      f.write(text)
    os.replace(tmp, path)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise


def write_table(root: pathlib.Path, table_name: str, entries: list[dict], *, variant: str,
                config_args: Sequence[str]) -> dict:
  """ROOT/<table>.json and ROOT/<table>.md; returns the json's content."""
  machine = None
  if any(e['ours'] for e in entries):
    machine = cv._machine()  # noqa: SLF001 (cv's own provenance helper; JAX is loaded by now)
  result = {'table': table_name, 'source': TABLES[table_name].source,
            'metrics': list(TABLE_METRICS), 'units': 'percent', 'std_ddof': 0,
            'variant': variant, 'config_args': list(config_args),
            'command': shlex.join([pathlib.Path(sys.executable).name, *sys.argv]),
            'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
            'git': cv.git_state(), 'machine': machine, 'rows': entries}
  root.mkdir(parents=True, exist_ok=True)
  _write_atomic(root / f'{table_name}.json', json.dumps(result, indent=2, allow_nan=True) + '\n')
  _write_atomic(root / f'{table_name}.md', format_table(result))
  return result


def all_finite(result: dict) -> bool:
  return all(math.isfinite(v[k]) for e in result['rows'] if e['ours']
             for v in e['ours'].values() for k in ('mean', 'std'))


# ------------------------------------------------------------------------------------- command

def split_config_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """(argv without them, the --config.* / --noconfig.* arguments), which absl would refuse."""
  rest, config_args = [], []
  for arg in argv:
    if arg.startswith(('--config.', '--noconfig.')):
      config_args.append(arg)
    elif arg == '--config' or arg.startswith('--config='):
      raise app.UsageError('the config file comes from the table and --datasets; give field '
                           'overrides as --config.path=value')
    else:
      rest.append(arg)
  return rest, config_args


def define_flags() -> dict:
  """Defined only when run as a command, so tests can import this file."""
  return {
      'root': flags.DEFINE_string('root', 'runs/reproduce', 'Output dir: ROOT/<dataset>/<row>/'
                                  'fold_k, ROOT/<table>.md and ROOT/<table>.json.'),
      'datasets': flags.DEFINE_list('datasets', None, "Datasets (default: the paper's for the "
                                    'table): tnbc, consep, cryonuseg, monuseg, demo (synthetic).'),
      'rows': flags.DEFINE_list('rows', None, 'Rows of the table (default all): table1 donuseg; '
                                'table2 base, dcs, ccl, both; table3 block1..block4, dynamic.'),
      'folds': flags.DEFINE_list('folds', [str(k) for k in range(cv.NUM_FOLDS)], 'Folds to run.'),
      'variant': flags.DEFINE_string('variant', '', "Config variant ('' = paper settings; "
                                     'lite, cpu, smoke, plus, e.g. cpu,plus).'),
      'max_steps': flags.DEFINE_integer('max_steps', None, 'Shorthand for '
                                        '--config.train.max_steps (0 = the epochs decide).'),
      'dry_run': flags.DEFINE_bool('dry_run', False, "Print each fold's state and command; run "
                                   'nothing.'),
      'aggregate_only': flags.DEFINE_bool('aggregate_only', False, 'Run nothing; write the table '
                                          'from the completed fold dirs.'),
      'in_process': flags.DEFINE_bool('in_process', False, 'Train the folds in this process '
                                      'instead of one subprocess per fold (tests, debugging).'),
      'keep_going': flags.DEFINE_bool('keep_going', False, 'After a failed fold, go on with the '
                                      'next rows (an interrupted fold always stops the run).'),
  }


def _select(names: Sequence[str] | None, known: Sequence[str], what: str) -> list[str]:
  if names is None:
    return list(known)
  names = list(dict.fromkeys(names))
  unknown = [n for n in names if n not in known]
  if unknown or not names:
    raise app.UsageError(f'unknown {what} {unknown}; expected some of {list(known)}')
  return names


def _raise_stopped(signum, frame):
  del frame
  raise Stopped(f'signal {signum}')


def main(argv, *, holders: dict, config_args: Sequence[str]) -> None:
  if len(argv) != 2 or argv[1] not in TABLES:
    raise app.UsageError(f'usage: reproduce.py {{{",".join(TABLES)}}} [flags]; got {argv[1:]}')
  logging.set_verbosity(logging.INFO)
  table_name = argv[1]
  table = TABLES[table_name]
  datasets = (list(table.datasets) if holders['datasets'].value is None else
              _select(holders['datasets'].value, list(DATASET_CONFIGS), 'datasets'))
  rows_by_name = {row.name: row for row in table.rows}
  rows = [rows_by_name[n] for n in _select(holders['rows'].value, list(rows_by_name), 'rows')]
  folds = list(dict.fromkeys(int(k) for k in holders['folds'].value))
  if not folds or any(not 0 <= k < cv.NUM_FOLDS for k in folds):
    raise app.UsageError(f'--folds must name folds in 0..{cv.NUM_FOLDS - 1}')
  config_args = list(config_args)
  if holders['max_steps'].value is not None:
    if any(a.split('=')[0] == '--config.train.max_steps' for a in config_args):
      raise app.UsageError('give --max_steps or --config.train.max_steps, not both')
    config_args.append(f"--config.train.max_steps={holders['max_steps'].value}")
  variant = holders['variant'].value
  root = pathlib.Path(holders['root'].value).absolute()
  jobs = make_jobs(table, root=root, datasets=datasets, rows=rows, variant=variant,
                   config_args=config_args)

  if holders['dry_run'].value:
    for job in jobs:
      print(f'{job.dataset} / {job.row.name} ({job.row.label}): {job.root}')
      runner = cv.SubprocessRunner(config_arg=job.config_arg, overrides=job.overrides,
                                   root=job.root)
      for fold in folds:
        done = cv.load_fold_result(cv.fold_workdir(job.root, fold),
                                   protocol=job.config.eval.protocol, fold=fold)
        print(f"  fold {fold} ({'done' if done else 'to run'}): {shlex.join(runner.command(fold))}")
    return

  statuses, stopped = {}, None
  if not holders['aggregate_only'].value:
    previous = {sig: signal.signal(sig, _raise_stopped) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
      statuses = run_jobs(jobs, folds=folds, in_process=holders['in_process'].value,
                          keep_going=holders['keep_going'].value)
    except cv.ConfigMismatchError as error:
      sys.exit(f'error: {error}')
    except Stopped as error:
      stopped = str(error)
      logging.warning('stopped (%s): writing the table of the completed folds', stopped)
    finally:
      for sig, handler in previous.items():
        signal.signal(sig, handler)
  entries = collect(table_name, jobs, folds=folds, statuses=statuses)
  result = write_table(root, table_name, entries, variant=variant, config_args=config_args)
  print((root / f'{table_name}.md').read_text())
  incomplete = [f"{e['dataset']}/{e['row']}" for e in entries if e['missing_folds']]
  if stopped or incomplete:
    sys.exit(f'{table_name} incomplete ({stopped or "folds missing"}: {", ".join(incomplete)}); '
             'rerun the same command to resume')
  if not all_finite(result):
    sys.exit(f'{table_name}: a metric is not finite; see {root / table_name}.json')


if __name__ == '__main__':
  try:
    _argv, _config_args = split_config_args(sys.argv)
  except app.UsageError as _error:
    sys.exit(f'error: {_error}')
  app.run(functools.partial(main, holders=define_flags(), config_args=_config_args), argv=_argv)
