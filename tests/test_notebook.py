"""The experiment notebooks run end to end as plain scripts (real data, tiny models)."""

import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import skimage.io

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_notebook(name, *, env, timeout=900):
  """Runs experiments/<name> in a subprocess; returns its stdout (fails with its output)."""
  result = subprocess.run([sys.executable, str(REPO_ROOT / 'experiments' / name)], cwd=REPO_ROOT,
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout)
  assert result.returncode == 0, f'{name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}'
  return result.stdout


def test_inspect_losses(tmp_path, data_root, tfds_dir):
  figure = tmp_path / 'inspect_losses.png'
  stdout = run_notebook('inspect_losses.py', env={
      'INSPECT_LOSSES_FIGURE': str(figure), 'DONUSEG_DATA_ROOT': str(data_root),
      'DONUSEG_TFDS_DIR': str(tfds_dir)})
  printed = {}
  for line in stdout.splitlines():
    parts = line.split()
    if len(parts) == 2 and '/' in parts[0] and not parts[0].startswith('/'):
      printed[parts[0]] = float(parts[1])
  for name in ('loss/seg', 'loss/loc', 'loss/det', 'loss/det_focal', 'loss/dcs', 'loss/ccl',
               'dcs/alpha_block1', 'dcs/chosen_block4', 'dcs/pseudo_fraction', 'quality/m_precision',
               'quality/p_recall', 'quality/pred_iou', 'quality/has_gt'):
    assert name in printed and math.isfinite(printed[name]), name
  assert printed['quality/has_gt'] == 1.  # TNBC has ground truth
  assert printed['quality/m_precision'] > 0.9  # M's disks sit at GT centroids: nearly always inside
  image = skimage.io.imread(figure)
  # 2 crops x 11 panels (image, M, 4 CAMs, 4 binarised, P) of 128 px, 4 px gaps, drawn at 2x.
  assert image.shape == (2 * (2 * 132 + 4), 2 * (11 * 132 + 4), 3)
  assert len(np.unique(image.reshape(-1, 3), axis=0)) > 50  # not blank
