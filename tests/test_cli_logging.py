"""Library logging at the command line: a default run shows no absl / Orbax INFO lines (only
progress, results, warnings and errors); `--verbosity=0` (absl's INFO level) brings them back."""

import os
import pathlib
import re
import subprocess
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
# absl's format (`I1202 16:11:45.474108 ...`) and Python logging's default one (`INFO:absl:...`).
_INFO_LINE = re.compile(r'^(I\d{4} \d\d:\d\d:\d\d|INFO:)')


def _train(workdir, *extra):
  """Two smoke steps (a validation and the checkpoints of step 2), no final report."""
  env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
  return subprocess.run(
      [sys.executable, '-m', 'donuseg_jax.main', '--config=configs/demo.py:smoke',
       f'--workdir={workdir}', '--config.train.max_steps=2', '--skip_report', *extra],
      cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)


def _info_lines(stderr: str) -> list[str]:
  return [line for line in stderr.splitlines() if _INFO_LINE.match(line)]


def test_info_logs_are_hidden_by_default_and_shown_with_verbosity(tmp_path):
  quiet = _train(tmp_path / 'quiet')
  assert quiet.returncode == 0, quiet.stderr[-3000:]
  assert "'steps': 2" in quiet.stdout  # the result is still printed
  assert _info_lines(quiet.stderr) == [], quiet.stderr[-3000:]
  assert 'orbax' not in quiet.stderr.lower(), quiet.stderr[-3000:]

  verbose = _train(tmp_path / 'verbose', '--verbosity=0')
  assert verbose.returncode == 0, verbose.stderr[-3000:]
  info = _info_lines(verbose.stderr)
  # Orbax's own INFO lines (its checkpoint manager saving step 2), not only ours.
  assert any('checkpoint_manager.py' in line and 'Saving checkpoint at step 2' in line
             for line in info), verbose.stderr[-3000:]
