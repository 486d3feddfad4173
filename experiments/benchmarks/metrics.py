"""Benchmark (not a test): contingency-table `instance_metrics` against naive per-instance loops.

Ground truth: CoNSeP test_1 (1000x1000, 861 nuclei). Predictions: the ground truth shifted by a few
pixels, with nuclei dropped, touching pairs merged, nuclei split and false positives added. The
naive version is the HoVer-Net-style loop over instance masks from tests/test_metrics.py. Prints
both times, their ratio and the largest difference between the two results, in one run:

  python experiments/benchmarks/metrics.py [--repeats 5] [--image test_1]
"""

import argparse
import os
import pathlib
import sys
import time

import numpy as np
import scipy.io

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / 'tests'))

from donuseg_jax import metrics  # noqa: E402
from donuseg_jax.data import paths  # noqa: E402
import test_metrics  # noqa: E402  (the naive reference implementation)


def perturbed_predictions(true: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
  """Named predictions derived from the ground truth (each a (H, W) int32 instance map)."""
  rng = np.random.default_rng(seed)
  ids = np.unique(true[true > 0])
  shifted = np.roll(true, (2, -3), axis=(0, 1))

  dropped = shifted.copy()
  dropped[np.isin(dropped, rng.choice(ids, size=len(ids) // 10, replace=False))] = 0

  # Merge touching pairs: horizontally adjacent pixels with two different ids.
  merged = shifted.copy()
  left, right = merged[:, :-1], merged[:, 1:]
  touching = (left > 0) & (right > 0) & (left != right)
  touching = np.unique(np.stack([left[touching], right[touching]], -1), axis=0)  # (pairs, 2)
  for a, b in touching[rng.permutation(len(touching))[:len(touching) // 3]]:
    merged[merged == b] = a

  # Split every fifth nucleus along the column of its centroid.
  split = shifted.copy()
  cols = np.arange(true.shape[1])[None, :]  # (1, W)
  next_id = int(true.max()) + 1
  for label in ids[::5]:
    mask = split == label
    centre = int(np.round(np.nonzero(mask)[1].mean()))
    split[mask & (cols > centre)] = next_id
    next_id += 1

  # False positives: 100 discs of radius 6 placed at random (on top of everything).
  noisy = dropped.copy()
  rows_grid, cols_grid = np.mgrid[:true.shape[0], :true.shape[1]]
  for r, c in rng.integers(10, true.shape[0] - 10, size=(100, 2)):
    noisy[(rows_grid - r) ** 2 + (cols_grid - c) ** 2 <= 36] = next_id
    next_id += 1
  return {'shifted': shifted, 'dropped': dropped, 'merged': merged, 'split': split,
          'noisy': noisy}


def best_time(fn, repeats: int) -> tuple[float, float, dict]:
  """Fastest wall and CPU (process) seconds of `repeats` calls, and the last call's result.

  CPU time is the figure to compare on a machine shared with other jobs; wall time is inflated by
  their load.
  """
  wall = cpu = np.inf
  for _ in range(repeats):
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    result = fn()
    wall = min(wall, time.perf_counter() - start_wall)
    cpu = min(cpu, time.process_time() - start_cpu)
  return wall, cpu, result


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--image', default='test_1', help='CoNSeP test image (Labels/<image>.mat)')
  parser.add_argument('--repeats', type=int, default=20, help='timed calls of the fast version')
  args = parser.parse_args()

  label_file = paths.data_root() / 'consep' / 'CoNSeP' / 'Test' / 'Labels' / f'{args.image}.mat'
  true = np.ascontiguousarray(scipy.io.loadmat(label_file)['inst_map'], np.int32)  # (1000, 1000)
  print(f'{label_file.name}: {true.shape[0]}x{true.shape[1]}, {len(np.unique(true)) - 1} nuclei; '
        f'{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} (a shared machine)')
  print('fast: best of', args.repeats, 'calls; naive: one call. ratio = naive / fast CPU time.')
  print(f'{"prediction":<10} {"nuclei":>6} {"fast ms":>8} {"(cpu)":>6} {"naive s":>8} '
        f'{"(cpu)":>6} {"ratio":>6} {"max diff":>9}  aji    pq')
  totals = np.zeros(4)
  for name, pred in perturbed_predictions(true).items():
    fast_wall, fast_cpu, got = best_time(lambda: metrics.instance_metrics(true, pred), args.repeats)
    naive_wall, naive_cpu, expected = best_time(lambda: test_metrics.naive_metrics(true, pred), 1)
    diff = max(abs(got[key] - expected[key]) for key in metrics.METRIC_NAMES)
    totals += (fast_wall, fast_cpu, naive_wall, naive_cpu)
    n_pred = len(np.unique(pred)) - 1
    print(f'{name:<10} {n_pred:>6} {fast_wall * 1e3:>8.1f} {fast_cpu * 1e3:>6.1f} '
          f'{naive_wall:>8.2f} {naive_cpu:>6.2f} {naive_cpu / fast_cpu:>6.0f} {diff:>9.1e}  '
          f'{got["aji"]:.4f} {got["pq"]:.4f}')
  print(f'{"all 5":<10} {"":>6} {totals[0] * 1e3:>8.1f} {totals[1] * 1e3:>6.1f} '
        f'{totals[2]:>8.2f} {totals[3]:>6.2f} {totals[3] / totals[1]:>6.0f}')


if __name__ == '__main__':
  main()
