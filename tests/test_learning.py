"""Training learns: tens of steps on the synthetic tiles make the prediction find the nuclei.

The equations are checked one by one elsewhere; this checks that, combined in the train step,
they teach the network something (a wiring fault that leaves every term finite fails here).
"""

import numpy as np

from donuseg_jax import run_log

SUPERVISED = ('loss/seg', 'loss/det', 'loss/loc')


def _train_records(workdir):
  return [r for r in run_log.read_metrics(workdir) if 'loss' in r]


def test_supervised_loss_falls_and_prediction_recall_rises(learned_run):
  workdir, _, summary = learned_run
  assert summary['steps'] == 40
  records = _train_records(workdir)
  assert [r['step'] for r in records] == list(range(1, 41))
  first, last = records[:10], records[-10:]

  def mean(rows, names):
    return float(np.mean([sum(r[n] for n in names) for r in rows]))

  assert mean(last, SUPERVISED) < 0.7 * mean(first, SUPERVISED)
  assert mean(last, ['loss/seg']) < 0.5 * mean(first, ['loss/seg'])
  # A random head marks about half of every crop (IoU ~0.03); after the first steps it marks
  # little; by the end it covers about half of the nuclei or more, and little else.
  assert mean(first, ['quality/pred_iou']) < 0.1
  early = mean(first[1:], ['quality/pred_recall'])
  assert early < 0.3
  # 0.45-0.6 by the last steps, depending on the CPU's float rounding (a model that does not learn
  # stays near 0): a margin, not a tuned figure.
  late = mean(last, ['quality/pred_recall'])
  assert late > 0.4 and late > early + 0.15, (early, late)
  assert mean(last, ['quality/pred_iou']) > 0.25


def test_validation_finds_nuclei_and_pseudo_label_figures_are_written(learned_run):
  workdir, _, _ = learned_run
  vals = {r['step']: r for r in run_log.read_metrics(workdir) if 'val/aji' in r}
  assert sorted(vals) == [18, 36, 40]
  assert vals[40]['val/aji'] > 0.1 and vals[40]['val/dice'] > 0.3 and vals[40]['val/point_f1'] > 0.2
  figures = sorted(p.name for p in (workdir / 'figures').glob('*.png'))
  assert figures == ['step_000018.png', 'step_000036.png', 'step_000040.png']
