"""The dataset summary command: one JSON object with the counts, for users and for checks."""

import json
import pathlib
import subprocess
import sys

from donuseg_jax.data import __main__ as data_cli

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_summary_command_on_tnbc(data_root, tfds_dir):
  result = subprocess.run(
      [sys.executable, '-m', 'donuseg_jax.data', 'summary', '--dataset', 'tnbc',
       '--data_dir', str(data_root), '--tfds_dir', str(tfds_dir)],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  summary = json.loads(result.stdout)  # stdout is exactly one JSON object
  assert (summary['images'], summary['instances'], summary['points']) == (50, 4028, 4028)
  assert summary['splits'] == {'train': {'images': 50, 'instances': 4028, 'points': 4028}}
  assert summary['image_sizes'] == ['512x512']


def test_summary_reports_dropped_rois(data_root, tfds_dir, capsys):
  assert data_cli.main(['summary', '--dataset', 'cryonuseg', '--data_dir', str(data_root),
                        '--tfds_dir', str(tfds_dir)]) == 0
  summary = json.loads(capsys.readouterr().out)
  assert (summary['images'], summary['instances'], summary['points']) == (2, 175, 175)
  regions = summary['regions']['train']
  assert (regions['regions'], regions['dropped']) == (176, 1)
  assert regions['per_image']['TCGA-S4-A8RO']['covered'] == [88]


def test_summary_of_a_missing_dataset_names_the_folder(tmp_path, capsys):
  assert data_cli.main(['summary', '--dataset', 'consep', '--data_dir', str(tmp_path)]) == 2
  error = capsys.readouterr().err
  assert str(tmp_path / 'consep') in error and 'Labels' in error
