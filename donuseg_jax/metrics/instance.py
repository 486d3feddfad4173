"""HoVer-Net-exact instance metrics (DICE, AJI, AJI+, DQ, SQ, PQ) from one contingency table.

`instance_metrics(true, pred)` returns the values of HoVer-Net's `metrics/stats_utils.py`
(`get_dice_1`, `get_fast_aji`, `get_fast_aji_plus`, `get_fast_pq(match_iou=0.5)`, each after
`remap_label(by_size=False)` on both maps), including its quirks:
  - AJI and AJI+ rank pairs by `inter / (union + 1e-6)`; the epsilon breaks exact IoU ties in favour
    of the larger pair, and `np.argmax` takes the lowest prediction id among equal values;
  - PQ pairs are those with `inter / union > 0.5` (strict: IoU exactly 0.5 is no match; above 0.5
    the pairing is unique, so no assignment is needed); DQ = tp / (tp + 0.5 fp + 0.5 fn),
    SQ = sum(paired IoU) / (tp + 1e-6) (identical maps give SQ = 1 / (1 + 1e-6)), PQ = DQ * SQ;
  - DICE is `get_dice_1` on the binarised maps: 2 |T & P| / (|T| + |P|).

Where HoVer-Net crashes or returns NaN, the values are defined here instead:
  - both maps empty (HoVer-Net: DICE NaN, AJI and PQ raise): every metric is 1.0. Nothing was to be
    found and nothing was found, which is a perfect prediction; this is MONAI's convention for an
    empty reference (`ignore_empty=False`). Such an image adds nothing to the dataset aggregate.
  - prediction empty, ground truth not (HoVer-Net's AJI raises on an empty argmax): every metric is
    0.0, the value its own formulas give (no intersection; DQ = 0 / (0.5 fn)). The converse case
    (ground truth empty) is finite in HoVer-Net and is 0.0 too.
  - id gaps or unsorted ids: handled as `remap_label` does (ids keep their sorted order, which is
    what the argmax tie-break sees), so any labelling of the same instances gives the same values.
  - no background pixel (HoVer-Net's `remap_label` raises): every id > 0 is an instance, 0 is
    background wherever it occurs; a map without zeros simply has no background.
  - float maps holding whole numbers are read as those integers; booleans are one instance (as
    `remap_label` treats them). Non-integral or non-finite floats and negative ids raise ValueError.
AJI+ solves the assignment per connected block of overlapping instances (`linear_sum_assignment`
where a block has several trues and several predictions) instead of on the whole IoU matrix. Both
maximise the same total IoU, so the values could differ only if two different pairings reached
exactly the same floating-point total and scipy broke that tie differently on the two matrices;
thousands of tie-heavy random maps in tests and checks never showed a difference.

Speed: a bincount per map and one over the foreground overlap (the contingency table of the raw ids,
so no map is renumbered), then work proportional to the number of overlapping (true, pred) pairs:
tens of milliseconds or less for a 1000x1000 map with ~900 nuclei, against seconds for the
per-instance loops (experiments/benchmarks/metrics.py). Per-image counts add up over a dataset
(`metrics.aggregate`).
"""

import numpy as np
from scipy import optimize
from scipy.sparse import csgraph
import scipy.sparse

METRIC_NAMES = ('dice', 'aji', 'aji_plus', 'dq', 'sq', 'pq')
# Additive per-image quantities: the metrics of a dataset are the formulas applied to their sums.
COUNT_NAMES = ('dice_inter', 'dice_total', 'aji_inter', 'aji_union', 'aji_plus_inter',
               'aji_plus_union', 'tp', 'fp', 'fn', 'iou_sum')

_EPS = 1.0e-6  # HoVer-Net's epsilon in the AJI IoU denominator and in SQ
_MATCH_IOU = 0.5  # PQ matching threshold (strict >)
# Above this many (true, pred) id combinations the contingency table is built sparsely (by sorting).
_MAX_DENSE_TABLE = 1 << 22


def instance_metrics(true, pred) -> dict[str, float]:
  """HoVer-Net's dice, aji, aji_plus, dq, sq, pq of two same-shape instance maps (0 = bg)."""
  return metrics_from_counts(instance_counts(true, pred))


def metrics_from_counts(counts: dict) -> dict[str, float]:
  """The six metrics from (per-image or summed) counts, written as HoVer-Net writes them."""
  if counts['dice_total'] == 0:
    # Both maps empty: a perfect prediction (see the module docstring).
    return {name: 1.0 for name in METRIC_NAMES}
  tp, fp, fn = int(counts['tp']), int(counts['fp']), int(counts['fn'])
  dice = 2.0 * float(counts['dice_inter']) / float(counts['dice_total'])
  aji = float(counts['aji_inter']) / float(counts['aji_union'])
  aji_plus = float(counts['aji_plus_inter']) / float(counts['aji_plus_union'])
  dq = tp / (tp + 0.5 * fp + 0.5 * fn)
  sq = float(counts['iou_sum']) / (tp + _EPS)
  return {'dice': dice, 'aji': aji, 'aji_plus': aji_plus, 'dq': dq, 'sq': sq, 'pq': dq * sq}


def instance_counts(true, pred) -> dict:
  """Additive counts of one image: DICE and AJI(+) intersections and unions, tp/fp/fn, IoU sum."""
  true = _as_labels(true, 'true')
  pred = _as_labels(pred, 'pred')
  if true.shape != pred.shape:
    raise ValueError(f'true and pred differ in shape: {true.shape} vs {pred.shape}')
  true, rank_t, area_t = _instances(true)  # (N,) ids; (max_t + 1,) id -> 1..nt; (nt,) areas
  pred, rank_p, area_p = _instances(pred)
  rows, cols, inter = _overlaps(true, pred, rank_t, rank_p)  # (E,) each, row-major order
  union = area_t[rows] + area_p[cols] - inter  # (E,)
  counts = {'dice_inter': int(inter.sum()), 'dice_total': int(area_t.sum() + area_p.sum())}

  # AJI and AJI+ rank pairs by HoVer-Net's epsilon IoU (float64, the same expression bit for bit).
  iou_eps = inter.astype(np.float64) / (union.astype(np.float64) + _EPS)  # (E,)
  best = _first_argmax_per_row(rows, iou_eps)  # edge index of each paired true's best pred
  counts['aji_inter'], counts['aji_union'] = _aggregated_jaccard(
      rows[best], cols[best], inter[best], union[best], area_t, area_p)
  chosen = _unique_pairing(rows, cols, iou_eps, len(area_t), len(area_p))
  counts['aji_plus_inter'], counts['aji_plus_union'] = _aggregated_jaccard(
      rows[chosen], cols[chosen], inter[chosen], union[chosen], area_t, area_p)

  # PQ: IoU without epsilon; above 0.5 a pair is unique, so thresholding is the matching.
  iou = inter.astype(np.float64) / union.astype(np.float64)  # (E,)
  paired_iou = iou[iou > _MATCH_IOU]  # row-major, the order HoVer-Net sums in
  tp = len(paired_iou)
  counts.update(tp=tp, fp=len(area_p) - tp, fn=len(area_t) - tp, iou_sum=float(paired_iou.sum()))
  return counts


def _as_labels(labels, name: str) -> np.ndarray:
  """Non-negative integer label map; whole-number floats and booleans accepted."""
  labels = np.asarray(labels)
  if labels.dtype == bool:
    return labels.astype(np.int64)
  if np.issubdtype(labels.dtype, np.floating):
    if not np.all(np.isfinite(labels)) or np.any(labels != np.round(labels)):
      raise ValueError(f'{name}: a float label map must hold whole numbers only')
    labels = labels.astype(np.int64)
  elif not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f'{name}: expected an integer label map, got dtype {labels.dtype}')
  if labels.size and labels.min() < 0:
    raise ValueError(f'{name}: instance ids must be >= 0 (0 = background)')
  return labels


def _instances(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Flat ids (N,), the rank of each id value (HoVer-Net's remap_label: 1..K in sorted order, 0 for
  background and unused values) and the K instance areas. The map itself is never renumbered."""
  labels = labels.ravel().astype(np.intp, copy=False)
  if labels.size == 0:
    return labels, np.zeros(1, np.intp), np.zeros(0, np.int64)
  if int(labels.max()) > 4 * labels.size + (1 << 20):
    # Huge ids (hashes, 2**31 - 1): renumber by sorting instead of a huge histogram.
    ids, labels = np.unique(labels, return_inverse=True)
    if ids[0] != 0:
      labels = labels + 1
    labels = labels.astype(np.intp).ravel()
  histogram = np.bincount(labels)  # (max + 1,) pixels per id value
  histogram[0] = 0  # background is no instance
  rank = np.cumsum(histogram > 0) * (histogram > 0)  # (max + 1,)
  return labels, rank, histogram[histogram > 0].astype(np.int64)


def _overlaps(true: np.ndarray, pred: np.ndarray, rank_t: np.ndarray, rank_p: np.ndarray):
  """Overlapping (true, pred) pairs as 0-based instance indices, sorted by (true, pred), with
  their intersection sizes, from the contingency table of the raw id values."""
  n_cols = len(rank_p)
  key = true * n_cols + pred  # (N,) cell of the (max_t + 1, max_p + 1) contingency table
  key = key[(true > 0) & (pred > 0)]  # background rows and columns are not needed
  if len(rank_t) * n_cols <= _MAX_DENSE_TABLE:
    table = np.bincount(key)  # flat dense contingency table
    pairs = np.flatnonzero(table)
    inter = table[pairs]
  else:
    pairs, inter = np.unique(key, return_counts=True)
  rows, cols = np.divmod(pairs, n_cols)
  # Ranks grow with the id value, so the pairs stay in (true, pred) order.
  return rank_t[rows] - 1, rank_p[cols] - 1, inter.astype(np.int64)


def _first_argmax_per_row(rows: np.ndarray, values: np.ndarray) -> np.ndarray:
  """Per row (edges sorted by row, then column): the edge of its maximum, lowest column on ties."""
  if len(rows) == 0:
    return np.zeros(0, np.intp)
  starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])  # (R,) first edge of each row
  row_max = np.maximum.reduceat(values, starts)  # (R,)
  is_max = values == np.repeat(row_max, np.diff(np.r_[starts, len(rows)]))
  candidates = np.flatnonzero(is_max)
  keep = np.r_[True, rows[candidates[1:]] != rows[candidates[:-1]]]  # first maximum of each row
  return candidates[keep]


def _aggregated_jaccard(rows, cols, inter, union, area_t, area_p) -> tuple[int, int]:
  """Kumar's aggregation: paired intersections over paired unions plus every unpaired instance."""
  unpaired_t = np.ones(len(area_t), bool)
  unpaired_t[rows] = False
  unpaired_p = np.ones(len(area_p), bool)
  unpaired_p[cols] = False  # a prediction paired to several trues counts in each of their unions
  total_union = union.sum() + area_t[unpaired_t].sum() + area_p[unpaired_p].sum()
  return int(inter.sum()), int(total_union)


def _unique_pairing(rows, cols, iou, n_true: int, n_pred: int) -> np.ndarray:
  """Edges of HoVer-Net's AJI+ pairing: max-total-IoU one-to-one matching, pairs with IoU > 0 kept.

  Only overlapping instances can be paired, so the assignment splits into the connected blocks of
  the overlap graph. A block with one true or one prediction (most of them) pairs its best edge;
  equal epsilon-IoUs mean equal intersections and unions, so that choice cannot change AJI+. The
  other blocks go to linear_sum_assignment, densely.
  """
  if len(rows) == 0:
    return np.zeros(0, np.intp)
  graph = scipy.sparse.coo_matrix(
      (np.ones(len(rows), np.int8), (rows, n_true + cols)), shape=(n_true + n_pred,) * 2)
  n_blocks, component = csgraph.connected_components(graph, directed=False)
  block_t, block_p = component[:n_true], component[n_true:]  # (n_true,), (n_pred,)
  trues_in = np.bincount(block_t, minlength=n_blocks)
  preds_in = np.bincount(block_p, minlength=n_blocks)
  edge_block = block_t[rows]  # (E,)
  star = (trues_in[edge_block] == 1) | (preds_in[edge_block] == 1)
  star_edges = np.flatnonzero(star)
  star_edges = star_edges[np.argsort(edge_block[star_edges], kind='stable')]
  chosen = [star_edges[_first_argmax_per_row(edge_block[star_edges], iou[star_edges])]]

  dense_edges = np.flatnonzero(~star)
  if len(dense_edges):
    local_t, local_p = _rank_in_block(block_t), _rank_in_block(block_p)
    dense_edges = dense_edges[np.argsort(edge_block[dense_edges], kind='stable')]
    bounds = np.flatnonzero(np.diff(edge_block[dense_edges])) + 1
    for edges in np.split(dense_edges, bounds):
      b = edge_block[edges[0]]
      r, c = local_t[rows[edges]], local_p[cols[edges]]
      block = np.zeros((trues_in[b], preds_in[b]))  # (nt_block, np_block) IoU, 0 = no overlap
      block[r, c] = iou[edges]
      edge_at = np.full(block.shape, -1, np.intp)
      edge_at[r, c] = edges
      pr, pc = optimize.linear_sum_assignment(-block)
      picked = edge_at[pr, pc]
      chosen.append(picked[(picked >= 0) & (block[pr, pc] > 0.0)])
  return np.sort(np.concatenate(chosen))


def _rank_in_block(block: np.ndarray) -> np.ndarray:
  """Index of each node among the nodes of its block, in id order (the dense block's row/column)."""
  order = np.argsort(block, kind='stable')
  sorted_block = block[order]
  rank = np.empty_like(order)
  rank[order] = np.arange(len(order)) - np.searchsorted(sorted_block, sorted_block)
  return rank
