"""Instance metrics: HoVer-Net reference values, hand-computed edge cases, a naive version.

The naive functions below follow HoVer-Net's `metrics/stats_utils.py` step by step (remap_label,
one boolean mask per instance, a dense pairwise table, argmax / linear_sum_assignment on the whole
matrix); `experiments/benchmarks/metrics.py` times them against the contingency-table version.
"""

import pathlib

import numpy as np
import pytest
from scipy import optimize

from donuseg_jax import metrics
from donuseg_jax.metrics import instance

REFERENCE = pathlib.Path(__file__).resolve().parents[2] / 'shared' / 'reference' / (
    'hovernet_metric_cases.npz')
EPS = 1e-6


# ----- naive per-instance implementation (HoVer-Net's algorithm, written with plain loops) -----

def naive_remap(labels):
  """Ids 1..K in sorted order; maps without background keep every id (where HoVer-Net raises)."""
  out = np.zeros(labels.shape, np.int32)
  for new_id, old_id in enumerate([i for i in np.unique(labels) if i != 0], start=1):
    out[labels == old_id] = new_id
  return out


def naive_pairwise(true, pred):
  """Dense (n_true, n_pred) intersections and unions, one mask pair at a time."""
  n_true, n_pred = int(true.max()), int(pred.max())
  inter = np.zeros((n_true, n_pred))
  union = np.zeros((n_true, n_pred))
  for t in range(1, n_true + 1):
    t_mask = true == t
    for p in np.unique(pred[t_mask]):
      if p == 0:
        continue
      p_mask = pred == p
      inter[t - 1, p - 1] = np.sum(t_mask & p_mask)
      union[t - 1, p - 1] = np.sum(t_mask | p_mask)
  return inter, union


def naive_jaccard(paired_t, paired_p, inter, union, true, pred):
  """Paired intersections over paired unions plus the area of every unpaired instance."""
  total_inter = inter[paired_t, paired_p].sum()
  total_union = union[paired_t, paired_p].sum()
  for t in range(1, int(true.max()) + 1):
    if t - 1 not in set(paired_t.tolist()):
      total_union += np.sum(true == t)
  for p in range(1, int(pred.max()) + 1):
    if p - 1 not in set(paired_p.tolist()):
      total_union += np.sum(pred == p)
  return total_inter / total_union


def naive_metrics(true, pred):
  """HoVer-Net's get_dice_1, get_fast_aji, get_fast_aji_plus, get_fast_pq(0.5) (finite cases)."""
  true, pred = naive_remap(np.asarray(true)), naive_remap(np.asarray(pred))
  dice = 2.0 * np.sum((true > 0) & (pred > 0)) / (np.sum(true > 0) + np.sum(pred > 0))
  inter, union = naive_pairwise(true, pred)
  iou_eps = inter / (union + EPS)
  if iou_eps.shape[0] and iou_eps.shape[1]:
    best = np.argmax(iou_eps, axis=1)
    has = np.nonzero(iou_eps.max(axis=1) > 0.0)[0]
  else:
    best = has = np.zeros(0, int)
  aji = naive_jaccard(has, best[has], inter, union, true, pred)
  pt, pp = optimize.linear_sum_assignment(-iou_eps)
  keep = iou_eps[pt, pp] > 0.0
  aji_plus = naive_jaccard(pt[keep], pp[keep], inter, union, true, pred)
  iou = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
  paired = iou[iou > 0.5]
  tp, fp, fn = len(paired), int(pred.max()) - len(paired), int(true.max()) - len(paired)
  dq = tp / (tp + 0.5 * fp + 0.5 * fn)
  sq = paired.sum() / (tp + EPS)
  return {'dice': dice, 'aji': aji, 'aji_plus': aji_plus, 'dq': dq, 'sq': sq, 'pq': dq * sq}


# ----- helpers -----

def assert_metrics(got, expected, tol=1e-12):
  assert set(got) == set(metrics.METRIC_NAMES)
  for name in metrics.METRIC_NAMES:
    assert got[name] == pytest.approx(expected[name], abs=tol, rel=0), name


def boxes_map(shape, boxes):
  """Label map from (id, row0, row1, col0, col1) rectangles, later ones on top."""
  labels = np.zeros(shape, np.int32)
  for label, r0, r1, c0, c1 in boxes:
    labels[r0:r1, c0:c1] = label
  return labels


# ----- HoVer-Net's own values -----

def test_reference_cases_match_hovernet():
  cases = np.load(REFERENCE)
  assert len(cases['values']) == 44
  for true, pred, values, kind in zip(cases['true'], cases['pred'], cases['values'], cases['kind']):
    got = metrics.instance_metrics(true, pred)
    for name, value in zip(metrics.METRIC_NAMES, values):
      assert got[name] == pytest.approx(value, abs=1e-9, rel=0), (kind, name)


# ----- the edge-case table, values computed by hand -----

TRUE_3 = boxes_map((8, 8), [(1, 0, 2, 0, 2), (2, 4, 6, 4, 6)])  # two 4-pixel nuclei


EDGE_CASES = {
    # Two nuclei (4 and 9 pixels) predicted exactly: every IoU is 1, SQ keeps HoVer-Net's epsilon.
    'identical': (
        boxes_map((8, 8), [(1, 0, 2, 0, 2), (2, 4, 7, 4, 7)]),
        boxes_map((8, 8), [(1, 0, 2, 0, 2), (2, 4, 7, 4, 7)]),
        dict(dice=1.0, aji=1.0, aji_plus=1.0, dq=1.0, sq=2 / (2 + EPS), pq=2 / (2 + EPS))),
    # Nucleus 1 found exactly (TP), nucleus 2 missed (FN), a 4-pixel FP elsewhere:
    # dice 2*4/(8+8); AJI 4/(4 + 4 + 4); DQ 1/(1 + .5 + .5); SQ 1/(1 + eps).
    'tp_fn_fp': (
        TRUE_3,
        boxes_map((8, 8), [(1, 0, 2, 0, 2), (2, 0, 2, 5, 7)]),
        dict(dice=0.5, aji=1 / 3, aji_plus=1 / 3, dq=0.5, sq=1 / (1 + EPS), pq=0.5 / (1 + EPS))),
    # One prediction (10 px) covering nuclei A (6 px, IoU .6) and B (4 px, IoU .4). AJI pairs both
    # with it: (6 + 4) / (10 + 10). AJI+ pairs it with A only: 6 / (10 + 4). PQ: A is a TP, B a FN.
    'one_pred_two_nuclei': (
        boxes_map((4, 8), [(1, 0, 2, 0, 3), (2, 0, 2, 3, 5)]),
        boxes_map((4, 8), [(7, 0, 2, 0, 5)]),
        dict(dice=1.0, aji=0.5, aji_plus=6 / 14, dq=1 / 1.5, sq=0.6 / (1 + EPS),
             pq=(1 / 1.5) * 0.6 / (1 + EPS))),
    # Prediction = half of a 4-pixel nucleus: IoU exactly 0.5 is no PQ match (strict >).
    'iou_exactly_half': (
        boxes_map((4, 4), [(1, 0, 2, 0, 2)]),
        boxes_map((4, 4), [(1, 0, 1, 0, 2)]),
        dict(dice=2 * 2 / 6, aji=0.5, aji_plus=0.5, dq=0.0, sq=0.0, pq=0.0)),
    # HoVer-Net: DICE NaN, AJI/PQ raise. Defined: a perfect prediction of an empty image.
    'both_empty': (
        np.zeros((5, 5), np.int32), np.zeros((5, 5), np.int32),
        dict(dice=1.0, aji=1.0, aji_plus=1.0, dq=1.0, sq=1.0, pq=1.0)),
    # HoVer-Net gives 0 here (AJI = 0 / sum of predicted areas, DQ = 0 / (0.5 fp)).
    'true_empty': (
        np.zeros((8, 8), np.int32), TRUE_3,
        dict(dice=0.0, aji=0.0, aji_plus=0.0, dq=0.0, sq=0.0, pq=0.0)),
    # HoVer-Net's AJI raises (argmax of an empty row); defined as its formulas give: 0.
    'pred_empty': (
        TRUE_3, np.zeros((8, 8), np.int32),
        dict(dice=0.0, aji=0.0, aji_plus=0.0, dq=0.0, sq=0.0, pq=0.0)),
    # tp_fn_fp with ids far apart and in another order: remap_label makes it the same case.
    'id_gaps': (
        boxes_map((8, 8), [(40, 0, 2, 0, 2), (3, 4, 6, 4, 6)]),
        boxes_map((8, 8), [(1000, 0, 2, 0, 2), (17, 0, 2, 5, 7)]),
        dict(dice=0.5, aji=1 / 3, aji_plus=1 / 3, dq=0.5, sq=1 / (1 + EPS), pq=0.5 / (1 + EPS))),
    # No background: one 16-pixel nucleus fills the map, predicted as two halves with equal IoU
    # (8/16). argmax takes the lower id: AJI = 8 / (16 + 8 unpaired). IoU .5 is not a PQ match.
    'no_background': (
        np.ones((4, 4), np.int32),
        boxes_map((4, 4), [(5, 0, 4, 0, 2), (9, 0, 4, 2, 4)]),
        dict(dice=1.0, aji=1 / 3, aji_plus=1 / 3, dq=0.0, sq=0.0, pq=0.0)),
    # The AJI epsilon breaks an exact IoU tie: nucleus of 6 px; P1 covers 2 of them (IoU 2/6),
    # P2 covers 3 of them plus 3 outside (IoU 3/9). 3/(9+eps) > 2/(6+eps), so P2 is paired:
    # AJI = 3 / (9 + 2); AJI+ likewise. Neither IoU is above 0.5.
    'epsilon_tie_break': (
        boxes_map((3, 8), [(1, 0, 1, 0, 6)]),
        boxes_map((3, 8), [(1, 0, 1, 0, 2), (2, 0, 1, 2, 5), (2, 1, 2, 2, 5)]),
        dict(dice=2 * 5 / (6 + 8), aji=3 / 11, aji_plus=3 / 11, dq=0.0, sq=0.0, pq=0.0)),
}


@pytest.mark.parametrize('case', sorted(EDGE_CASES))
def test_edge_cases_by_hand(case):
  true, pred, expected = EDGE_CASES[case]
  assert_metrics(metrics.instance_metrics(true, pred), expected)


@pytest.mark.parametrize('case', ['identical', 'tp_fn_fp', 'one_pred_two_nuclei',
                                  'iou_exactly_half', 'true_empty', 'id_gaps', 'epsilon_tie_break'])
def test_edge_cases_where_hovernet_is_finite_agree_with_naive(case):
  true, pred, expected = EDGE_CASES[case]
  assert_metrics(naive_metrics(true, pred), expected)


def test_float_and_bool_maps():
  true, pred, expected = EDGE_CASES['tp_fn_fp']
  assert_metrics(metrics.instance_metrics(true.astype(np.float32), pred.astype(np.float64)),
                 expected)
  # A boolean map is one instance, as remap_label treats it.
  assert_metrics(metrics.instance_metrics(true > 0, true > 0),
                 dict(dice=1.0, aji=1.0, aji_plus=1.0, dq=1.0, sq=1 / (1 + EPS), pq=1 / (1 + EPS)))


@pytest.mark.parametrize('bad', [np.full((4, 4), 1.5), np.full((4, 4), np.nan), -np.ones((4, 4)),
                                 np.zeros((4, 5)), np.full((4, 4), 'a')])
def test_bad_maps_raise(bad):
  with pytest.raises(ValueError):
    metrics.instance_metrics(np.zeros((4, 4), np.int32), bad)


def test_huge_ids_take_the_sorting_path():
  true, pred, expected = EDGE_CASES['one_pred_two_nuclei']
  big_true = np.where(true > 0, true.astype(np.int64) + 2**40, 0)
  assert_metrics(metrics.instance_metrics(big_true, pred), expected)


# ----- random maps against the naive implementation -----

def random_instances(rng, shape, n):
  """n random overlapping rectangles with shuffled, gapped ids (later ones on top)."""
  labels = np.zeros(shape, np.int64)
  ids = rng.choice(np.arange(1, 5 * n + 1), size=n, replace=False)
  for label in ids:
    h, w = rng.integers(2, 9, size=2)
    r, c = rng.integers(0, shape[0] - 1), rng.integers(0, shape[1] - 1)
    labels[r:r + h, c:c + w] = label
  return labels


def perturb(rng, labels):
  """A prediction: shifted, with some instances dropped, merged, split, and false positives."""
  pred = np.roll(labels, tuple(rng.integers(-2, 3, size=2)), axis=(0, 1))
  ids = np.unique(pred[pred > 0])
  if len(ids) > 2:
    pred[np.isin(pred, rng.choice(ids, size=len(ids) // 5, replace=False))] = 0
    a, b = rng.choice(ids, size=2, replace=False)
    pred[pred == a] = b
  split = rng.integers(0, labels.shape[1])
  pred[:, split:] = np.where(pred[:, split:] > 0, pred[:, split:] + 777, 0)
  return np.maximum(pred, random_instances(rng, labels.shape, 3) * (rng.random() < 0.7))


def test_random_maps_match_naive():
  rng = np.random.default_rng(0)
  for trial in range(40):
    shape = tuple(rng.integers(16, 48, size=2))
    true = random_instances(rng, shape, int(rng.integers(0, 25)))
    pred = perturb(rng, true)
    if trial % 10 == 0:
      pred = true.copy()
    if not true.any():
      continue  # HoVer-Net raises on two empty maps or an empty prediction
    assert_metrics(metrics.instance_metrics(true, pred), naive_metrics(true, pred), tol=1e-12)


def test_random_tiny_maps_with_many_ties_match_naive():
  # 6x6 maps with ids 0..4 everywhere: equal IoUs, many-to-many overlaps, no background at times.
  rng = np.random.default_rng(1)
  for _ in range(200):
    true = rng.integers(0, 5, size=(6, 6))
    pred = rng.integers(0, 5, size=(6, 6))
    if rng.random() < 0.3:
      true[true == 0] = 2
    if true.max() == 0 or pred.max() == 0:
      continue
    assert_metrics(metrics.instance_metrics(true, pred), naive_metrics(true, pred), tol=1e-12)


def test_sparse_contingency_table_path(monkeypatch):
  # Above _MAX_DENSE_TABLE id combinations the table is built by sorting; same values.
  monkeypatch.setattr(instance, '_MAX_DENSE_TABLE', 0)
  rng = np.random.default_rng(2)
  for _ in range(10):
    true = random_instances(rng, (32, 32), 15)
    pred = perturb(rng, true)
    assert_metrics(metrics.instance_metrics(true, pred), naive_metrics(true, pred), tol=1e-12)


# ----- dataset aggregate and per-image summary -----

def test_aggregate_of_two_images_by_hand():
  first = EDGE_CASES['tp_fn_fp'][:2]  # tp 1, fp 1, fn 1; AJI 4/12; dice 8/16
  second = EDGE_CASES['one_pred_two_nuclei'][:2]  # tp 1, fn 1, IoU .6; AJI 10/20, AJI+ 6/14
  counts = [metrics.instance_counts(*first), metrics.instance_counts(*second)]
  expected = dict(
      dice=2.0 * (4 + 10) / (16 + 20), aji=(4 + 10) / (12 + 20), aji_plus=(4 + 6) / (12 + 14),
      dq=2 / (2 + 0.5 * 1 + 0.5 * 2), sq=(1.0 + 0.6) / (2 + EPS),
      pq=2 / (2 + 0.5 * 1 + 0.5 * 2) * (1.0 + 0.6) / (2 + EPS))
  assert_metrics(metrics.aggregate(counts), expected)
  # One image: the aggregate is the per-image value; all-empty images aggregate to 1.0.
  assert metrics.aggregate(counts[:1]) == metrics.instance_metrics(*first)
  empty = metrics.instance_counts(np.zeros((3, 3), int), np.zeros((3, 3), int))
  assert metrics.aggregate([counts[0], empty]) == metrics.aggregate(counts[:1])
  assert metrics.aggregate([empty, empty])['aji'] == 1.0


def test_summarize_mean_and_std():
  per_image = [metrics.instance_metrics(*EDGE_CASES[name][:2])
               for name in ('tp_fn_fp', 'one_pred_two_nuclei')]
  summary = metrics.summarize(per_image)
  assert summary['aji']['mean'] == pytest.approx((1 / 3 + 0.5) / 2)
  assert summary['aji']['std'] == pytest.approx(abs(1 / 3 - 0.5) / 2)
  assert summary['dq']['mean'] == pytest.approx((0.5 + 2 / 3) / 2)
  with pytest.raises(ValueError):
    metrics.summarize([])
