"""The commands as a user runs them (child processes): an expected problem is a short message
naming it, exit status 2, no traceback, and nothing written where it should not be.

Every case fails before training or evaluation starts, so each child costs its start-up only.
"""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import skimage.io

import test_predict
import test_run_integrity
from configs import default

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
MAX_ERROR_LINES = 4  # the message, a 'did you mean' or a hint, and the --helpfull pointer
_snapshot = test_run_integrity._snapshot  # path -> SHA-256 of every file under a folder


def _command(module, *args, env_extra=None):
  env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), **(env_extra or {}))
  return subprocess.run([sys.executable, '-m', f'donuseg_jax.{module}', *map(str, args)],
                        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)


def _assert_clean_error(result, *needles):
  """Status 2, and stderr is one short message naming every needle: `error: ...` and at most a
  few indented lines under it (no log line, no progress bar: the command did no work first)."""
  err = result.stderr
  lines = err.strip().splitlines()
  assert result.returncode == 2, (result.returncode, err[-3000:])
  assert 'Traceback' not in err, err[-3000:]
  assert 1 <= len(lines) <= MAX_ERROR_LINES, err[-3000:]
  assert lines[0].startswith('error: ') and all(line.startswith('  ') for line in lines[1:]), err
  for needle in needles:
    assert str(needle) in err, (needle, err)


def _unwritable_folder(tmp_path) -> pathlib.Path:
  """A 'folder' this process cannot write into: a read-only folder where the mode binds, else
  (root ignores modes) a regular file standing where the folder should be."""
  folder = tmp_path / 'read_only'
  folder.mkdir()
  folder.chmod(0o500)
  try:
    (folder / 'probe').touch()
  except PermissionError:
    return folder
  (folder / 'probe').unlink()
  folder.chmod(0o700)
  blocker = tmp_path / 'a_file'
  blocker.write_text('not a folder')
  return blocker


def _image(path):
  skimage.io.imsave(path, np.full((64, 64, 3), 200, np.uint8), check_contrast=False)


def _points(path):
  path.write_text('x,y\n10,12\n30,40\n')


def _folder_with_points_only(root):
  _points(root / 'a.csv')
  _points(root / 'b.csv')


def _folder_with_a_point_file_missing_its_image(root):
  _image(root / 'a.png')
  _points(root / 'a.csv')
  _points(root / 'b.csv')  # b.png is missing


_SMOKE = '--config=configs/demo.py:smoke'
_FOLDER = ['--config=configs/folder.py:smoke', '--config.data.folder={tmp}/data']
# (case, main's arguments, environment, how to lay out {tmp}/data, what the message must name);
# {tmp} stands for the test's own folder.
_MAIN_CASES = [
    ('mistyped_field', [_SMOKE, '--config.train.max_stepz=3'], {}, None,
     ['max_stepz', 'Did you mean "max_steps"']),
    ('batch_not_divisible', [_SMOKE, '--config.data.batch_size=3'],
     {'XLA_FLAGS': '--xla_force_host_platform_device_count=2'}, None,
     ['batch size 3 does not divide over 2 devices', '--config.data.batch_size']),
    ('missing_data_root', ['--config=configs/tnbc.py:smoke'],
     {'DONUSEG_DATA_ROOT': '{tmp}/no_data'}, None, ['{tmp}/no_data/tnbc', 'does not exist']),
    ('folder_without_images', _FOLDER, {}, _folder_with_points_only,
     ['folder {tmp}/data', 'no images found']),
    ('folder_image_missing', _FOLDER, {}, _folder_with_a_point_file_missing_its_image,
     ['folder {tmp}/data', 'b.csv has no image b']),
]


@pytest.mark.parametrize('args, env, layout, expected', [case[1:] for case in _MAIN_CASES],
                         ids=[case[0] for case in _MAIN_CASES])
def test_main_refuses_bad_input_before_touching_the_work_dir(tmp_path, args, env, layout,
                                                             expected):
  (tmp_path / 'data').mkdir()
  if layout:
    layout(tmp_path / 'data')
  fill = lambda text: text.replace('{tmp}', str(tmp_path))  # noqa: E731
  workdir = tmp_path / 'run'
  workdir.mkdir()  # it exists, so nothing but the checks keeps main from writing into it
  result = _command('main', f'--workdir={workdir}', *map(fill, args),
                    env_extra={k: fill(v) for k, v in env.items()})
  _assert_clean_error(result, *map(fill, expected))
  assert list(workdir.iterdir()) == []  # no config.json, no checkpoints folder


@pytest.fixture(scope='module')
def smoke_run(tmp_path_factory):
  """A work dir with config.json and one (untrained) checkpoint: a run evaluate and predict load."""
  return test_predict.write_smoke_run(tmp_path_factory.mktemp('cli') / 'run',
                                      default.get_config('smoke'))


@pytest.fixture
def run_without_checkpoints(tmp_path):
  workdir = tmp_path / 'untrained'
  workdir.mkdir()
  (workdir / 'config.json').write_text(default.get_config('smoke').to_json_best_effort() + '\n')
  return workdir


def test_evaluate_on_a_missing_work_dir(tmp_path):
  workdir = tmp_path / 'no_run'
  _assert_clean_error(_command('evaluate', f'--workdir={workdir}', '--split=val'),
                      workdir, 'does not exist')
  assert not workdir.exists()


def test_evaluate_and_predict_on_a_run_without_checkpoints_create_nothing(
    run_without_checkpoints, tmp_path):
  workdir = run_without_checkpoints
  before = _snapshot(workdir)
  _assert_clean_error(_command('evaluate', f'--workdir={workdir}', '--split=val'),
                      workdir, 'holds no checkpoint')
  _image(tmp_path / 'tile.png')
  _assert_clean_error(_command('predict', '--workdir', workdir, '--input', tmp_path / 'tile.png',
                               '--output', tmp_path / 'out'), workdir, 'holds no checkpoint')
  assert _snapshot(workdir) == before
  assert sorted(p.name for p in workdir.iterdir()) == ['config.json']  # no empty folders either


def test_evaluate_with_an_unwritable_output_stops_before_evaluating(smoke_run, tmp_path):
  before = _snapshot(smoke_run)
  folder = _unwritable_folder(tmp_path)
  output = folder / 'eval.json'
  result = _command('evaluate', f'--workdir={smoke_run}', '--split=val', f'--output={output}')
  _assert_clean_error(result, f'cannot write {output}')
  assert 'evaluate (' not in result.stderr  # its progress bar: the images were evaluated first
  missing = tmp_path / 'no_such_folder' / 'eval.json'
  _assert_clean_error(_command('evaluate', f'--workdir={smoke_run}', '--split=val',
                               f'--output={missing}'), missing, 'does not exist')
  assert not missing.parent.exists()  # evaluate names a missing folder, it does not make one
  assert _snapshot(smoke_run) == before


def test_predict_with_an_unwritable_output_stops_before_loading(smoke_run, tmp_path):
  before = _snapshot(smoke_run)
  _image(tmp_path / 'tile.png')
  output = _unwritable_folder(tmp_path) / 'out'
  _assert_clean_error(_command('predict', '--workdir', smoke_run, '--input', tmp_path / 'tile.png',
                               '--output', output), output, 'not writable')
  assert not output.exists()
  assert _snapshot(smoke_run) == before
