"""Dataset-level metrics: the summed per-image counts (aggregate) and the per-image mean and std.

Two ways to report a test set, both in the evaluation output:
  - `aggregate(counts_list)`: HoVer-Net's formulas applied to intersections, unions, TP/FP/FN and
    paired-IoU sums added over all images, so large and crowded images weigh more; a one-image
    aggregate equals `instance_metrics` exactly.
  - `summarize(per_image)`: mean and population (ddof=0) standard deviation of the per-image
    values, the number HoVer-Net's `compute_stats.py` and most papers report.
"""

import numpy as np

from donuseg_jax.metrics import instance


def aggregate(counts_list) -> dict[str, float]:
  """Dataset metrics from a sequence of `instance.instance_counts` dicts (all 1.0 if all empty)."""
  counts_list = list(counts_list)
  if not counts_list:
    raise ValueError('aggregate needs the counts of at least one image')
  totals = {name: sum(counts[name] for counts in counts_list) for name in instance.COUNT_NAMES}
  return instance.metrics_from_counts(totals)


def summarize(per_image) -> dict[str, dict[str, float]]:
  """{'dice': {'mean': m, 'std': s}, ...} over a sequence of per-image metric dicts."""
  per_image = list(per_image)
  if not per_image:
    raise ValueError('summarize needs the metrics of at least one image')
  summary = {}
  for name in instance.METRIC_NAMES:
    values = np.array([metrics[name] for metrics in per_image], np.float64)  # (n_images,)
    summary[name] = {'mean': float(values.mean()), 'std': float(values.std())}
  return summary
