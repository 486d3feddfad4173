"""Property-based checks (hypothesis) of the losses over shapes and ignore masks.

Shapes are drawn from a small set so that each jitted function compiles a few times only.
"""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from donuseg_jax import losses

SHAPES = [(1, 4, 4), (2, 8, 8), (3, 5, 7)]
PROPERTY = settings(max_examples=12, deadline=None)


@st.composite
def label_maps(draw, shape):
  """int8 label map with a drawn ignore fraction and foreground fraction (empty sets included)."""
  seed = draw(st.integers(0, 2 ** 31 - 1))
  p_ignore = draw(st.sampled_from([0., 0.3, 0.9, 1.]))
  p_foreground = draw(st.sampled_from([0., 0.5, 1.]))
  rng = np.random.default_rng(seed)
  label = (rng.random(shape) < p_foreground).astype(np.int8)
  label[rng.random(shape) < p_ignore] = -1
  return label


@st.composite
def shape_and_labels(draw, count=1):
  shape = draw(st.sampled_from(SHAPES))
  return (shape,) + tuple(draw(label_maps(shape)) for _ in range(count))


_seg = jax.jit(jax.value_and_grad(lambda x, y: losses.segmentation_loss(logits=x, label=y)))
_ccl = jax.jit(jax.value_and_grad(
    lambda z, m, p, a: losses.contrastive_loss(features=z, label=m, pseudo=p, alpha=a)))
_select = jax.jit(lambda c, m: losses.dynamic_cam_selection(cams=c, label=m, theta=0.8))


@PROPERTY
@given(shape_and_labels(), st.floats(0.1, 60.))
def test_segmentation_finite_nonnegative_and_masked(data, scale):
  shape, label = data
  logits = np.random.default_rng(0).normal(0., scale, shape).astype(np.float32)
  value, grad = _seg(logits, label)
  grad = np.asarray(grad)
  assert np.isfinite(float(value)) and float(value) >= 0.
  assert np.all(np.isfinite(grad)) and np.all(grad[label == -1] == 0.)


@PROPERTY
@given(shape_and_labels(count=2), st.integers(0, 1000))
def test_contrastive_finite_nonnegative_and_masked(data, seed):
  shape, label, pseudo = data
  rng = np.random.default_rng(seed)
  features = rng.normal(size=shape + (4,)).astype(np.float32)
  alpha = rng.random(shape[0]).astype(np.float32)
  value, grad = _ccl(features, label, pseudo, alpha)
  grad = np.asarray(grad)
  assert np.isfinite(float(value)) and float(value) >= 0.
  assert np.all(np.isfinite(grad))
  assert np.all(grad[(label == -1) & (pseudo == -1)] == 0.)


@PROPERTY
@given(shape_and_labels(), st.integers(0, 1000))
def test_selection_returns_the_best_binarised_block(data, seed):
  shape, label = data
  cams = np.random.default_rng(seed).random((shape[0], 4) + shape[1:]).astype(np.float32)
  pseudo, alpha, index = (np.asarray(x) for x in _select(cams, label))
  assert pseudo.shape == shape and alpha.shape == (shape[0], 4) and index.shape == (shape[0],)
  assert np.all((alpha >= 0.) & (alpha <= 1.))
  np.testing.assert_array_equal(index, np.argmax(alpha, axis=1))
  binary = np.asarray(losses.binarize_cam(cam=cams, theta=0.8))
  np.testing.assert_array_equal(pseudo, binary[np.arange(shape[0]), index])
  if np.all(label == -1):
    assert not np.any(alpha)


_targets = jax.jit(lambda b, v: losses.detection_targets(boxes=b, box_valid=v, image_size=64))


@PROPERTY
@given(st.integers(0, 10 ** 6), st.floats(0., 1.))
def test_detection_targets_point_inside_a_valid_box(seed, p_valid):
  rng = np.random.default_rng(seed)
  corners = np.sort(rng.uniform(0., 64., (2, 6, 2, 2)), axis=2)  # (B, N, [min, max], [x, y])
  boxes = corners.reshape(2, 6, 4).astype(np.float32)  # (x0, y0, x1, y1)
  valid = rng.random((2, 6)) < p_valid
  for stride, level in zip((4, 8, 16, 32, 64), _targets(boxes, valid)):
    labels, ltrb = np.asarray(level['labels']), np.asarray(level['ltrb'])
    centerness = np.asarray(level['centerness'])
    assert np.all(ltrb[labels] > 0.) and np.all(ltrb[~labels] == 0.)
    assert np.all((centerness[labels] > 0.) & (centerness[labels] <= 1.))
    assert not np.any(centerness[~labels])
    for b, i, j in zip(*np.nonzero(labels)):
      x, y = j * stride + stride // 2, i * stride + stride // 2
      l, t, r, bottom = ltrb[b, i, j]
      box = np.array([x - l, y - t, x + r, y + bottom])
      assert np.any(valid[b] & np.all(np.abs(boxes[b] - box) < 1e-3, axis=1))
  if not np.any(valid):
    assert not any(np.any(np.asarray(level['labels'])) for level in _targets(boxes, valid))
