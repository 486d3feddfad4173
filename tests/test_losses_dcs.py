"""Dynamic CAM Selection (Eq. 3-5) against float64 NumPy references and on hand-made CAMs."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from donuseg_jax import losses

_select = jax.jit(lambda cams, label: losses.dynamic_cam_selection(cams=cams, label=label, theta=0.8))


def random_label(rng, shape, *, p_ignore=0.4):
  label = rng.integers(0, 2, shape).astype(np.int8)
  label[rng.random(shape) < p_ignore] = -1
  return label


def reference_binarize(cam, theta):
  out = np.empty(cam.shape, np.int8)
  for index, value in np.ndenumerate(cam):
    out[index] = 1 if value > theta else (0 if value <= 1. - theta else -1)
  return out


def reference_alpha(cam_label, label):
  """Eq. 4 for one image: (1/|Omega_M|) sum over Omega_M of M C + (1 - M)(1 - C), C ignored = miss."""
  valid = agree = 0
  for index, m in np.ndenumerate(label):
    if m == -1:
      continue
    valid += 1
    c = cam_label[index]
    agree += (m == 1 and c == 1) or (m == 0 and c == 0)
  return agree / valid if valid else 0.


def test_binarize_matches_eq3_with_boundaries():
  rng = np.random.default_rng(0)
  cam = rng.random((2, 3, 16, 16)).astype(np.float32)
  got = np.asarray(losses.binarize_cam(cam=cam, theta=0.8))
  assert got.dtype == np.int8
  np.testing.assert_array_equal(got, reference_binarize(cam.astype(np.float64), 0.8))
  # theta = 0.75 and 1 - theta = 0.25 are exact in binary: > theta is strict, <= 1 - theta is not.
  edges = np.array([0., 0.25, 0.5, 0.75, 0.7500001, 1.], np.float32)
  np.testing.assert_array_equal(np.asarray(losses.binarize_cam(cam=edges, theta=0.75)),
                                [0, 0, -1, -1, 1, 1])


def test_similarity_rate_matches_eq4():
  rng = np.random.default_rng(1)
  label = random_label(rng, (3, 16, 16))
  cam_label = random_label(rng, (3, 4, 16, 16), p_ignore=0.3)
  label[2] = -1  # no valid pixel in M: alpha 0
  got = np.asarray(losses.similarity_rate(cam_label=cam_label, label=label))
  assert got.shape == (3, 4)
  for b in range(3):
    for k in range(4):
      assert got[b, k] == pytest.approx(reference_alpha(cam_label[b, k], label[b]), rel=1e-6)
  # (B, H, W) cam labels work too.
  single = np.asarray(losses.similarity_rate(cam_label=cam_label[:, 1], label=label))
  np.testing.assert_allclose(single, got[:, 1])


def test_selection_picks_the_block_that_matches_m():
  label = np.full((2, 8, 8), -1, np.int8)
  label[:, :4, :4] = 1
  label[:, 6:, :] = 0
  perfect = np.where(label == 1, 1., 0.)  # agrees with M on every valid pixel
  half = perfect.copy()
  half[:, :2] = 0.5  # ignored pixels: disagreement
  inverse = 1. - perfect
  # Image 0: block 3 is perfect. Image 1: blocks 2 and 4 are perfect: the tie goes to block 2.
  cams = np.stack([np.stack([half[0], inverse[0], perfect[0], half[0]]),
                   np.stack([inverse[1], perfect[1], half[1], perfect[1]])]).astype(np.float32)
  pseudo, alpha, index = _select(cams, label)
  np.testing.assert_array_equal(np.asarray(index), [2, 1])
  # 32 valid M pixels; 'half' leaves 8 of M's foreground ignored (disagreement): alpha 24 / 32.
  np.testing.assert_allclose(np.asarray(alpha), [[0.75, 0., 1., 0.75], [0., 1., 0.75, 1.]])
  np.testing.assert_array_equal(np.asarray(pseudo), np.where(perfect > 0.5, 1, 0).astype(np.int8))
  assert pseudo.dtype == jnp.int8
  # A fixed block (Table 3) overrides the choice but keeps every alpha.
  fixed, fixed_alpha, fixed_index = losses.dynamic_cam_selection(cams=cams, label=label, theta=0.8,
                                                                 fixed_block=2)
  np.testing.assert_array_equal(np.asarray(fixed_index), [1, 1])
  np.testing.assert_array_equal(np.asarray(fixed), reference_binarize(cams[:, 1], 0.8))
  np.testing.assert_allclose(np.asarray(fixed_alpha), np.asarray(alpha))
  with pytest.raises(ValueError, match='fixed_block'):
    losses.dynamic_cam_selection(cams=cams, label=label, theta=0.8, fixed_block=5)


def test_selection_random_matches_reference():
  rng = np.random.default_rng(2)
  cams = rng.random((3, 4, 16, 16)).astype(np.float32)
  label = random_label(rng, (3, 16, 16))
  pseudo, alpha, index = _select(cams, label)
  for b in range(3):
    binary = reference_binarize(cams[b].astype(np.float64), 0.8)
    ref_alpha = [reference_alpha(binary[k], label[b]) for k in range(4)]
    np.testing.assert_allclose(np.asarray(alpha[b]), ref_alpha, rtol=1e-6)
    assert int(index[b]) == int(np.argmax(ref_alpha))
    np.testing.assert_array_equal(np.asarray(pseudo[b]), binary[int(index[b])])


def reference_dcs(logits, pseudo, alpha):
  per_image = []
  for b in range(logits.shape[0]):
    terms = []
    for index, p in np.ndenumerate(pseudo[b]):
      if p == -1:
        continue
      y = 1. / (1. + math.exp(-logits[b][index]))
      terms.append(-(p * math.log(y) + (1 - p) * math.log(1. - y)))
    per_image.append(alpha[b] * sum(terms) / len(terms) if terms else 0.)
  return float(np.mean(per_image))


def test_dcs_loss_matches_eq5():
  rng = np.random.default_rng(3)
  logits = rng.normal(0., 3., (3, 16, 16))
  pseudo = random_label(rng, (3, 16, 16))
  pseudo[1] = -1
  alpha = rng.random(3)
  with jax.enable_x64(True):
    got = losses.dcs_loss(logits=jnp.asarray(logits), pseudo=jnp.asarray(pseudo), alpha=jnp.asarray(alpha))
  np.testing.assert_allclose(float(got), reference_dcs(logits, pseudo, alpha), rtol=1e-9)


def test_dcs_gradients_zero_on_ignored_and_none_for_alpha():
  rng = np.random.default_rng(4)
  logits = rng.normal(0., 3., (2, 16, 16)).astype(np.float32)
  pseudo = random_label(rng, (2, 16, 16))
  alpha = np.array([0.3, 0.9], np.float32)
  grad_fn = jax.jit(jax.grad(lambda x, a: losses.dcs_loss(logits=x, pseudo=pseudo, alpha=a),
                             argnums=(0, 1)))
  grad_logits, grad_alpha = (np.asarray(g) for g in grad_fn(logits, alpha))
  assert np.all(grad_logits[pseudo == -1] == 0.)
  assert np.all(grad_logits[pseudo != -1] != 0.)
  assert np.all(grad_alpha == 0.)  # alpha_P is a target (stop_gradient)
  empty = np.full_like(pseudo, -1)
  value, grad = jax.value_and_grad(lambda x: losses.dcs_loss(logits=x, pseudo=empty, alpha=alpha))(logits)
  assert float(value) == 0. and not np.any(np.asarray(grad))
