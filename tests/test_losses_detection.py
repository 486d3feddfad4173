"""FCOS targets on hand-made boxes and against a loop reference; FCOS losses against a NumPy reference."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from donuseg_jax import losses

STRIDES = (4, 8, 16, 32, 64)
RANGES = ((0, 16), (16, 32), (32, 64), (64, 128), (128, math.inf))


# Jitted once per shape: eager dispatch would compile every primitive separately (slow on 2 cores).
_targets_64 = jax.jit(lambda b, v: losses.detection_targets(boxes=b, box_valid=v, image_size=64))
_loss = jax.jit(lambda out, tgt: losses.detection_loss(outputs_detection=out, targets=tgt))
PAD = 4  # hand-made boxes are padded to this many rows so that they share one compilation


def targets_for(boxes, valid=None):
  """Targets of one 64x64 image from a few hand-made boxes (padding rows invalid)."""
  count = len(boxes)
  padded = np.zeros((1, PAD, 4), np.float32)
  padded[0, :count] = boxes
  valid = [True] * count if valid is None else list(valid)
  return _targets_64(padded, np.array([valid + [False] * (PAD - count)]))


def positives(targets):
  return [int(np.sum(level['labels'])) for level in targets]


def test_single_box_level_ltrb_and_centerness():
  targets = targets_for([[10., 10., 22., 22.]])
  assert [level['labels'].shape for level in targets] == [(1, 16, 16), (1, 8, 8), (1, 4, 4),
                                                          (1, 2, 2), (1, 1, 1)]
  # P2 locations x = 4j + 2; strictly inside [10, 22): x in {14, 18} (x = 10 and 22 are edges).
  assert positives(targets) == [4, 0, 0, 0, 0]
  p2 = targets[0]
  assert bool(p2['labels'][0, 3, 3]) and bool(p2['labels'][0, 4, 4])
  assert not bool(p2['labels'][0, 3, 2]) and not bool(p2['labels'][0, 3, 5])  # on the box edges
  np.testing.assert_allclose(p2['ltrb'][0, 3, 3], [4., 4., 8., 8.])  # location (14, 14)
  assert float(p2['centerness'][0, 3, 3]) == pytest.approx(0.5)  # sqrt(4/8 * 4/8)
  np.testing.assert_allclose(p2['ltrb'][0, 3, 4], [8., 4., 4., 8.])  # location (18, 14)
  # Negatives carry zero targets.
  assert float(p2['centerness'][0, 0, 0]) == 0. and not np.any(np.asarray(p2['ltrb'][0, 0, 0]))


def test_level_assignment_by_max_distance_inclusive_ranges():
  # Location (28, 28) on P3 (cell (3, 3)) inside [0, 60): l = t = 28, r = b = 32: max 32 is in
  # [16, 32] (inclusive) -> P3; the same box on P2 at (30, 30): max 30 > 16 -> not P2.
  targets = targets_for([[0., 0., 60., 60.]])
  assert bool(targets[1]['labels'][0, 3, 3])
  np.testing.assert_allclose(targets[1]['ltrb'][0, 3, 3], [28., 28., 32., 32.])
  assert not bool(targets[0]['labels'][0, 7, 7])
  assert positives(targets)[0] == 0
  # P4 location (24, 24): max 36 in [32, 64].
  assert bool(targets[2]['labels'][0, 1, 1])


def test_ties_go_to_the_smaller_box_then_the_lower_index():
  # Location (10, 10) (P2 cell (2, 2)) is inside both; max side 10 and 8, both in [0, 16].
  big, small = [0., 0., 20., 20.], [4., 4., 18., 18.]
  for boxes, expected in (([big, small], [6., 6., 8., 8.]), ([small, big], [6., 6., 8., 8.])):
    np.testing.assert_allclose(targets_for(boxes)[0]['ltrb'][0, 2, 2], expected)
  # Equal areas: the lower index wins.
  first, second = [2., 2., 14., 14.], [6., 6., 18., 18.]  # location (10, 10): ltrb 8,8,4,4 / 4,4,8,8
  np.testing.assert_allclose(targets_for([first, second])[0]['ltrb'][0, 2, 2], [8., 8., 4., 4.])
  np.testing.assert_allclose(targets_for([second, first])[0]['ltrb'][0, 2, 2], [4., 4., 8., 8.])
  # An invalid (padding) row is never assigned, even when smaller.
  np.testing.assert_allclose(targets_for([big, small], valid=[True, False])[0]['ltrb'][0, 2, 2],
                             [10., 10., 10., 10.])


def reference_targets(boxes, valid, size):
  """Loop reference: per level, per location, per box."""
  out = []
  for stride, (low, high) in zip(STRIDES, RANGES):
    cells = -(-size // stride)
    labels = np.zeros((boxes.shape[0], cells, cells), bool)
    ltrb = np.zeros(labels.shape + (4,))
    for b in range(boxes.shape[0]):
      for i in range(cells):
        for j in range(cells):
          x, y = j * stride + stride // 2, i * stride + stride // 2
          best = None
          for n in range(boxes.shape[1]):
            x0, y0, x1, y1 = boxes[b, n]
            d = (x - x0, y - y0, x1 - x, y1 - y)
            if valid[b, n] and min(d) > 0 and low <= max(d) <= high:
              area = (x1 - x0) * (y1 - y0)
              if best is None or area < best[0]:
                best = (area, d)
          if best is not None:
            labels[b, i, j] = True
            ltrb[b, i, j] = best[1]
    l, t, r, bt = (ltrb[..., k] for k in range(4))
    with np.errstate(invalid='ignore', divide='ignore'):
      centerness = np.sqrt(np.minimum(l, r) / np.maximum(l, r) * np.minimum(t, bt) / np.maximum(t, bt))
    out.append({'labels': labels, 'ltrb': ltrb, 'centerness': np.where(labels, centerness, 0.)})
  return out


def random_boxes(rng, batch, count, size):
  centres = rng.uniform(0, size, (batch, count, 2))
  sides = rng.uniform(4, 80, (batch, count, 2))
  boxes = np.concatenate([centres - sides / 2, centres + sides / 2], -1).clip(0, size)
  return np.round(boxes, 1).astype(np.float32), rng.random((batch, count)) < 0.8


def test_targets_match_loop_reference():
  rng = np.random.default_rng(0)
  boxes, valid = random_boxes(rng, 2, 12, 96)
  got = jax.jit(lambda b, v: losses.detection_targets(boxes=b, box_valid=v, image_size=96))(
      boxes, valid)
  want = reference_targets(boxes.astype(np.float64), valid, 96)
  assert sum(int(np.sum(level['labels'])) for level in want) > 20  # the test sees positives
  for g, w in zip(got, want):
    np.testing.assert_array_equal(np.asarray(g['labels']), w['labels'])
    np.testing.assert_allclose(np.asarray(g['ltrb']), w['ltrb'], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(g['centerness']), w['centerness'], rtol=1e-5, atol=1e-6)


def random_outputs(rng, targets):
  return tuple({'logits': rng.normal(0., 2., t['labels'].shape),
                'ltrb': rng.uniform(1., 40., t['ltrb'].shape),
                'centerness': rng.normal(0., 2., t['labels'].shape)} for t in targets)


def reference_loss(outputs, targets, alpha=0.25, gamma=2.):
  focal = iou = centerness = 0.
  num_pos = weight_sum = 0.
  for out, tgt in zip(outputs, targets):
    for index in np.ndindex(tgt['labels'].shape):
      p = 1. / (1. + math.exp(-out['logits'][index]))
      if tgt['labels'][index]:
        focal += -alpha * (1. - p) ** gamma * math.log(p)
        pl, pt, pr, pb = out['ltrb'][index]
        tl, tt, tr, tb = tgt['ltrb'][index]
        inter = (min(pl, tl) + min(pr, tr)) * (min(pt, tt) + min(pb, tb))
        union = (pl + pr) * (pt + pb) + (tl + tr) * (tt + tb) - inter
        c = tgt['centerness'][index]
        iou += -c * math.log((inter + 1.) / (union + 1.))
        q = 1. / (1. + math.exp(-out['centerness'][index]))
        centerness += -(c * math.log(q) + (1. - c) * math.log(1. - q))
        num_pos += 1
        weight_sum += c
      else:
        focal += -(1. - alpha) * p ** gamma * math.log(1. - p)
  return {'focal': focal / max(num_pos, 1.), 'iou': iou / weight_sum if weight_sum else 0.,
          'centerness': centerness / max(num_pos, 1.)}


def test_loss_matches_reference():
  rng = np.random.default_rng(1)
  boxes, valid = random_boxes(rng, 2, 10, 64)
  targets = reference_targets(boxes.astype(np.float64), valid, 64)
  outputs = random_outputs(rng, targets)
  want = reference_loss(outputs, targets)
  with jax.enable_x64(True):
    got = _loss(jax.tree.map(jnp.asarray, outputs), jax.tree.map(jnp.asarray, targets))
  for name in ('focal', 'iou', 'centerness'):
    np.testing.assert_allclose(float(got[name]), want[name], rtol=1e-9, err_msg=name)


def test_no_boxes_is_finite_with_finite_gradients():
  rng = np.random.default_rng(2)
  boxes, _ = random_boxes(rng, 2, 5, 64)
  valid = np.zeros((2, 5), bool)
  targets = _targets_64(boxes, valid)
  assert sum(int(np.sum(t['labels'])) for t in targets) == 0
  outputs = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), random_outputs(rng, targets))

  def total(out):
    parts = losses.detection_loss(outputs_detection=out, targets=targets)
    return parts['focal'] + parts['iou'] + parts['centerness'], parts

  (value, parts), grads = jax.jit(jax.value_and_grad(total, has_aux=True))(outputs)
  assert float(parts['iou']) == 0. and float(parts['centerness']) == 0. and float(value) > 0.
  for leaf in jax.tree.leaves(grads):
    assert np.all(np.isfinite(np.asarray(leaf)))
  # Box and centerness outputs get no gradient without positives.
  assert not any(np.any(np.asarray(g['ltrb'])) or np.any(np.asarray(g['centerness'])) for g in grads)


def test_regression_gradient_only_at_positives():
  rng = np.random.default_rng(3)
  boxes, valid = random_boxes(rng, 2, 5, 64)
  targets = _targets_64(boxes, valid)
  outputs = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), random_outputs(rng, targets))
  grads = jax.jit(jax.grad(lambda out: _loss(out, targets)['iou']))(outputs)
  for grad, target in zip(grads, targets):
    negative = ~np.asarray(target['labels'])
    assert np.all(np.asarray(grad['ltrb'])[negative] == 0.)
    assert np.all(np.isfinite(np.asarray(grad['ltrb'])))
