"""L_seg (Eq. 1) and L_loc against float64 NumPy references; ignored pixels; empty sets."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from donuseg_jax import losses


def random_label(rng, shape, *, p_ignore=0.4):
  """int8 label map: -1 with probability p_ignore, else 0 / 1."""
  label = rng.integers(0, 2, shape).astype(np.int8)
  label[rng.random(shape) < p_ignore] = -1
  return label


def reference_seg(logits, label, balance):
  """Eq. 1 per image by explicit loops, then the batch mean ('balanced': fg mean + bg mean)."""
  per_image = []
  for b in range(logits.shape[0]):
    fg, bg = [], []
    for i in range(logits.shape[1]):
      for j in range(logits.shape[2]):
        y = 1. / (1. + math.exp(-float(logits[b, i, j])))
        if label[b, i, j] == 1:
          fg.append(-math.log(y))
        elif label[b, i, j] == 0:
          bg.append(-math.log(1. - y))
    if balance == 'pooled':
      per_image.append(sum(fg + bg) / len(fg + bg) if fg + bg else 0.)
    else:
      per_image.append((sum(fg) / len(fg) if fg else 0.) + (sum(bg) / len(bg) if bg else 0.))
  return float(np.mean(per_image))


@pytest.mark.parametrize('balance', ['pooled', 'balanced'])
def test_segmentation_matches_reference(balance):
  rng = np.random.default_rng(1)
  logits = rng.normal(0., 3., (3, 16, 16))
  label = random_label(rng, (3, 16, 16))
  label[2] = -1  # an image without a valid pixel contributes 0 to the batch mean
  label[1][label[1] == 1] = 0  # a one-class image
  with jax.enable_x64(True):
    got = losses.segmentation_loss(logits=jnp.asarray(logits), label=jnp.asarray(label),
                                   balance=balance)
    assert got.dtype == jnp.float64
  np.testing.assert_allclose(float(got), reference_seg(logits, label, balance), rtol=1e-9)


def test_segmentation_float32_close_to_float64_reference():
  rng = np.random.default_rng(2)
  logits = rng.normal(0., 2., (2, 32, 32)).astype(np.float32)
  label = random_label(rng, (2, 32, 32))
  got = jax.jit(lambda x, y: losses.segmentation_loss(logits=x, label=y))(logits, label)
  np.testing.assert_allclose(float(got), reference_seg(logits, label, 'pooled'), rtol=1e-5)


@pytest.mark.parametrize('balance', ['pooled', 'balanced'])
def test_segmentation_gradient_zero_on_ignored_pixels(balance):
  rng = np.random.default_rng(3)
  logits = rng.normal(0., 30., (2, 32, 32)).astype(np.float32)  # saturated logits too
  label = random_label(rng, (2, 32, 32))
  grad = jax.grad(lambda x: losses.segmentation_loss(logits=x, label=label, balance=balance))(logits)
  grad = np.asarray(grad)
  assert np.all(np.isfinite(grad))
  assert np.all(grad[label == -1] == 0.)
  assert np.count_nonzero(grad[label != -1]) > 0.9 * np.count_nonzero(label != -1)


@pytest.mark.parametrize('fill', [-1, 0, 1])
@pytest.mark.parametrize('balance', ['pooled', 'balanced'])
def test_segmentation_empty_or_one_class_is_finite(fill, balance):
  logits = jnp.asarray(np.random.default_rng(4).normal(0., 50., (2, 8, 8)), jnp.float32)
  label = jnp.full((2, 8, 8), fill, jnp.int8)
  value, grad = jax.value_and_grad(
      lambda x: losses.segmentation_loss(logits=x, label=label, balance=balance))(logits)
  assert np.isfinite(float(value)) and np.all(np.isfinite(np.asarray(grad)))
  if fill == -1:
    assert float(value) == 0. and not np.any(np.asarray(grad))


def test_unknown_balance_is_an_error():
  with pytest.raises(ValueError, match='balance'):
    losses.segmentation_loss(logits=jnp.zeros((1, 4, 4)), label=jnp.zeros((1, 4, 4), jnp.int8),
                             balance='mean')


def test_localization_target_is_cell_coverage_of_m_foreground():
  rng = np.random.default_rng(5)
  label = random_label(rng, (2, 64, 96), p_ignore=0.3)
  got = np.asarray(losses.localization_target(label_m=jnp.asarray(label), stride=32))
  assert got.shape == (2, 2, 3)
  for b in range(2):
    for i in range(2):
      for j in range(3):
        cell = label[b, 32 * i:32 * (i + 1), 32 * j:32 * (j + 1)]
        assert got[b, i, j] == pytest.approx(np.sum(cell == 1) / 1024., rel=1e-6)
  with pytest.raises(ValueError, match='divisible'):
    losses.localization_target(label_m=jnp.zeros((1, 40, 32), jnp.int8), stride=32)


def test_localization_loss_is_mse():
  rng = np.random.default_rng(6)
  prediction, target = rng.normal(size=(3, 4, 4)), rng.random((3, 4, 4))
  with jax.enable_x64(True):
    got = losses.localization_loss(prediction=jnp.asarray(prediction), target=jnp.asarray(target))
  expected = np.mean([np.mean((prediction[b] - target[b]) ** 2) for b in range(3)])
  np.testing.assert_allclose(float(got), expected, rtol=1e-9)
