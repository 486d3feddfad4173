"""experiments/reproduce.py: table rows x folds as resumable work dirs, Markdown beside the paper.

One real run, smoke-sized: two rows of Table 2 (base and both) on the built-in synthetic tiles
(`--datasets=demo --variant=smoke`), folds 0 and 1, one training step each, trained in the
command's own process (`--in_process`: one JAX start, ~1 min cold on 2 busy cores). The second
invocation uses the default runner (a subprocess per fold), which must find every fold done.
"""

import importlib.util
import json
import math
import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / 'experiments' / 'reproduce.py'
_spec = importlib.util.spec_from_file_location('reproduce', SCRIPT)
reproduce = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reproduce)
cv = reproduce.cv

ROW_DIRS = {'base': 'loss.use_ccl=false,loss.use_dcs=false', 'both': 'donuseg'}
LABELS = {'base': 'base (L_det + L_seg + L_loc)', 'both': '+ L_dcs + L_ccl (DoNuSeg)'}
FOLDS = (0, 1)
COLUMNS = ['dataset', 'row', 'folds', 'DICE', 'DICE (paper)', 'AJI', 'AJI (paper)', 'DQ',
           'DQ (paper)', 'SQ', 'SQ (paper)', 'PQ', 'PQ (paper)']


def _command(root, *extra):
  return [sys.executable, str(SCRIPT), 'table2', f'--root={root}', '--datasets=demo',
          '--variant=smoke', '--rows=base,both', '--folds=0,1', '--max_steps=1',
          '--config.eval.write_overlays=0', *extra]


def _run(args, **kwargs):
  # One CPU device (not conftest's 4): the sharding is tested elsewhere, and the smoke model's
  # two train steps (with and without CAMs) compile ~30% faster unsharded.
  env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), XLA_FLAGS=' '.join(
      [flag for flag in os.environ.get('XLA_FLAGS', '').split()
       if not flag.startswith('--xla_force_host_platform_device_count')]
      + ['--xla_force_host_platform_device_count=1']))
  return subprocess.run(args, cwd=REPO_ROOT, env=env, capture_output=True, text=True, **kwargs)


def _markdown_rows(text):
  """The first Markdown table of `text` as (header cells, [row cells])."""
  lines = [line for line in text.splitlines() if line.startswith('|')]
  split = [[cell.strip() for cell in line.strip('|').split('|')] for line in lines]
  assert set(''.join(split[1])) <= {'-'}  # the |---| line
  return split[0], split[2:]


def _fold_files(root):
  """Every file under the fold dirs with its mtime (checkpoints included)."""
  return {str(p.relative_to(root)): p.stat().st_mtime_ns
          for p in sorted(root.glob('demo-smoke/*/fold_*/**/*')) if p.is_file()}


@pytest.fixture(scope='module')
def first_run(tmp_path_factory):
  root = tmp_path_factory.mktemp('reproduce') / 'root'
  done = _run(_command(root, '--in_process'), timeout=600)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  return root, done


def test_every_row_and_fold_is_a_trained_work_dir(first_run):
  root, _ = first_run
  for row, dirname in ROW_DIRS.items():
    for fold in FOLDS:
      workdir = root / 'demo-smoke' / dirname / f'fold_{fold}'
      config = json.loads((workdir / 'config.json').read_text())
      assert config['data']['fold'] == fold and config['data']['name'] == 'synthetic'
      assert config['train']['max_steps'] == 1 and config['model']['encoder'] == 'tiny'
      assert config['loss']['use_dcs'] is config['loss']['use_ccl'] is (row == 'both')
      assert cv.load_fold_result(workdir, protocol='image', fold=fold) is not None
      assert any((workdir / 'checkpoints').iterdir())
      runs = (workdir / cv.RUNS_FILE).read_text().splitlines()
      record = json.loads(runs[0])
      assert len(runs) == 1 and record['steps'] == record['total_steps'] == 1
    summary = json.loads((root / 'demo-smoke' / dirname / 'cv_summary.json').read_text())
    assert summary['folds'] == list(FOLDS) and not summary['missing_folds']


def test_markdown_has_the_rows_columns_and_finite_numbers(first_run):
  root, done = first_run
  text = (root / 'table2.md').read_text()
  assert text in done.stdout  # also printed
  header, rows = _markdown_rows(text)
  assert header == COLUMNS
  assert [(r[0], r[1], r[2]) for r in rows] == [('demo', LABELS['base'], '2/2'),
                                                ('demo', LABELS['both'], '2/2')]
  for cells in rows:
    for ours, paper in zip(cells[3::2], cells[4::2], strict=True):
      match = re.fullmatch(r'(\d+\.\d\d) ± (\d+\.\d\d)', ours)
      assert match and all(math.isfinite(float(v)) for v in match.groups()), ours
      assert paper == '—'  # the synthetic tiles are in no paper table
  assert 'Incomplete' not in text and '--config.loss.use_dcs=false' in text
  assert not list(root.glob('.*tmp'))  # written via temp file + rename
  result = json.loads((root / 'table2.json').read_text())
  assert [e['row'] for e in result['rows']] == ['base', 'both'] and result['std_ddof'] == 0
  for entry, cells in zip(result['rows'], rows, strict=True):
    summary = json.loads((pathlib.Path(entry['workdir']) / 'cv_summary.json').read_text())
    for i, name in enumerate(reproduce.TABLE_METRICS):
      stats = summary['across_folds']['mean'][name]
      assert entry['ours'][name]['mean'] == pytest.approx(100 * stats['mean'])
      assert cells[3 + 2 * i] == f"{100 * stats['mean']:.2f} ± {100 * stats['std']:.2f}"


def test_a_second_invocation_resumes_without_training(first_run):
  root, _ = first_run
  before = _fold_files(root)
  table_mtime = (root / 'table2.md').stat().st_mtime_ns
  again = _run(_command(root), timeout=300)  # the default runner: it would start subprocesses
  assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
  assert 'reused' in again.stderr and 'single_fold' not in again.stderr  # no fold was started
  assert _fold_files(root) == before  # no checkpoint, result or run record touched
  assert (root / 'table2.md').stat().st_mtime_ns >= table_mtime
  result = json.loads((root / 'table2.json').read_text())
  assert all(set(e['status'].values()) == {'reused'} for e in result['rows'])
  # The dry run lists every fold as done, with the command a fold of that row would run.
  dry = _run(_command(root, '--dry_run'), timeout=120)
  assert dry.returncode == 0, dry.stderr[-3000:]
  commands = [line.split(': ', 1)[1] for line in dry.stdout.splitlines() if '(done)' in line]
  assert len(commands) == 4 and '(to run)' not in dry.stdout
  for command in commands:  # the subprocess runner's config equals what was trained in-process
    args = shlex.split(command)
    config_arg = next(a.split('=', 1)[1] for a in args if a.startswith('--config='))
    root_arg = pathlib.Path(next(a.split('=', 1)[1] for a in args if a.startswith('--root=')))
    config, _ = reproduce.parse_config(config_arg, [a for a in args if a.startswith('--config.')])
    cv.check_fold_config(cv.fold_workdir(root_arg, config.data.fold), config)
    assert '--single_fold' in args and args[1].endswith('cross_validation.py')


def test_overrides_that_change_a_row_are_refused(tmp_path):
  done = _run(_command(tmp_path, '--dry_run', '--config.loss.use_ccl=false'), timeout=120)
  assert done.returncode != 0 and 'loss.use_ccl: set by the table rows' in done.stderr
  done = _run([*_command(tmp_path, '--dry_run'), '--config=configs/tnbc.py'], timeout=120)
  assert done.returncode != 0 and '--config.path=value' in done.stderr


def test_paper_numbers_and_rows_agree_with_the_paper_text():
  for name, table in reproduce.TABLES.items():
    rows = {row.name for row in table.rows}
    assert {row for _, row in reproduce.PAPER[name]} == rows
    assert {dataset for dataset, _ in reproduce.PAPER[name]} == set(table.datasets)
    for values in reproduce.PAPER[name].values():
      assert tuple(values) == reproduce.TABLE_METRICS
  paper = reproduce.PAPER
  donuseg = {k: v[0] for k, v in paper['table1'][('cryonuseg', 'donuseg')].items()}
  # The full method's row is the same run in all three tables (as it is in the paper).
  assert {k: v[0] for k, v in paper['table2'][('cryonuseg', 'both')].items()} == donuseg
  assert {k: v[0] for k, v in paper['table3'][('cryonuseg', 'dynamic')].items()} == donuseg
  assert paper['table1'][('tnbc', 'donuseg')]['aji'] == (50.06, 0.94)
  dirs = {row.name: row.dirname for row in reproduce.TABLES['table2'].rows}
  assert dirs == {'base': ROW_DIRS['base'], 'dcs': 'loss.use_ccl=false',
                  'ccl': 'loss.use_dcs=false', 'both': 'donuseg'}
  assert reproduce.TABLES['table1'].rows[0].dirname == 'donuseg'


def test_paper_cells_render_with_and_without_std():
  entry = {'dataset': 'cryonuseg', 'row': 'donuseg', 'label': 'DoNuSeg', 'row_overrides': {},
           'config': 'configs/cryonuseg.py', 'workdir': '/r/cryonuseg/donuseg',
           'folds_requested': [0, 1, 2], 'folds': [0, 2], 'missing_folds': [1], 'runs': [],
           'ours': {n: {'mean': 50.0, 'std': 1.234} for n in reproduce.TABLE_METRICS},
           'paper': {n: {'mean': m, 'std': s}
                     for n, (m, s) in reproduce.PAPER['table1'][('cryonuseg', 'donuseg')].items()}}
  result = {'table': 'table1', 'rows': [entry], 'command': 'x', 'variant': '', 'date': 'today',
            'git': {}, 'machine': None, 'config_args': []}
  header, rows = _markdown_rows(reproduce.format_table(result))
  assert rows[0][:5] == ['cryonuseg', 'DoNuSeg', '2/3 (incomplete)', '50.00 ± 1.23',
                         '67.22 ± 1.30']
  entry['paper'] = {n: {'mean': 60.93, 'std': None} for n in reproduce.TABLE_METRICS}
  assert _markdown_rows(reproduce.format_table(result))[1][0][4] == '60.93'
  assert 'lacks fold(s) 1' in reproduce.format_table(result)


def test_rows_set_the_loss_terms_whatever_the_variant(tmp_path, monkeypatch):
  """`plus` turns L_ccl off; the tables still compare the paper's combinations of L_dcs and L_ccl."""
  monkeypatch.chdir(REPO_ROOT)
  for variant in ('smoke', 'smoke,plus'):
    table = reproduce.TABLES['table2']
    jobs = reproduce.make_jobs(table, root=tmp_path, datasets=['demo'], rows=table.rows,
                               variant=variant, config_args=[])
    assert [(job.config.loss.use_dcs, job.config.loss.use_ccl) for job in jobs] == [
        (False, False), (True, False), (False, True), (True, True)], variant
    assert [job.root.name for job in jobs][-1] == 'donuseg'
    table = reproduce.TABLES['table3']
    jobs = reproduce.make_jobs(table, root=tmp_path, datasets=['demo'], rows=table.rows,
                               variant=variant, config_args=[])
    assert all(job.config.loss.use_ccl for job in jobs), variant


def test_failed_and_interrupted_folds_stop_the_rows(tmp_path, monkeypatch):
  monkeypatch.chdir(REPO_ROOT)
  table = reproduce.TABLES['table2']
  jobs = reproduce.make_jobs(table, root=tmp_path, datasets=['demo'], rows=table.rows[:3],
                             variant='smoke', config_args=[])
  assert [job.root.name for job in jobs] == [
      'loss.use_ccl=false,loss.use_dcs=false', 'loss.use_ccl=false', 'loss.use_dcs=false']
  assert [job.config.loss.use_dcs for job in jobs] == [False, True, False]
  calls = []

  def runners(fail):
    def make_runner(job, in_process):
      assert not in_process

      def run_fold(fold, workdir):
        calls.append((job.row.name, fold))
        if (job.row.name, fold) in fail:
          raise cv.FoldError(fail[job.row.name, fold])
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / 'config.json').write_text(
            cv.fold_config(job.config, fold).to_json_best_effort())
        mean = {n: 0.5 for n in reproduce.cv.metrics.METRIC_NAMES}
        (workdir / 'eval_test_image.json').write_text(json.dumps(
            {'fold': fold, 'mean': mean, 'aggregate': mean, 'protocol': 'image',
             'method': 'boxes'}))
      return run_fold
    return make_runner

  status = reproduce.run_jobs(jobs, folds=[0, 1], in_process=False, keep_going=False,
                              make_runner=runners({('dcs', 0): 'fold 0 exited with code 1'}))
  assert calls == [('base', 0), ('base', 1), ('dcs', 0)] and ('demo', 'ccl') not in status
  calls.clear()
  status = reproduce.run_jobs(jobs, folds=[0, 1], in_process=False, keep_going=True,
                              make_runner=runners({('dcs', 0): 'fold 0 exited with code 1'}))
  assert calls == [('dcs', 0), ('ccl', 0), ('ccl', 1)]
  assert status['demo', 'base'] == {0: 'reused', 1: 'reused'}
  assert status['demo', 'dcs'][0].startswith('failed') and status['demo', 'ccl'][1] == 'ran'
  calls.clear()
  with pytest.raises(reproduce.Stopped, match='interrupted'):
    reproduce.run_jobs(jobs, folds=[0, 1], in_process=False, keep_going=True,
                       make_runner=runners({('dcs', 0): 'fold 0 was interrupted, checkpointed'}))
  assert calls == [('dcs', 0)]
