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


def reference_balanced_alpha(cam_label, label):
  """Balanced Eq. 4 for one image: mean over the classes present in M of the agreement rate."""
  rates = []
  for value in (1, 0):
    where = label == value
    if where.any():
      rates.append(float(np.mean(cam_label[where] == value)))
  return sum(rates) / len(rates) if rates else 0.


def test_balanced_similarity_rate_matches_reference():
  rng = np.random.default_rng(5)
  label = random_label(rng, (4, 16, 16))
  cam_label = random_label(rng, (4, 3, 16, 16), p_ignore=0.3)
  label[2] = -1  # no valid pixel: 0
  label[3][label[3] == 1] = 0  # background only: the background rate alone
  got = np.asarray(losses.similarity_rate(cam_label=cam_label, label=label, form='balanced'))
  for b in range(4):
    for k in range(3):
      assert got[b, k] == pytest.approx(reference_balanced_alpha(cam_label[b, k], label[b]), rel=1e-6)
  with pytest.raises(ValueError, match='alpha form'):
    losses.similarity_rate(cam_label=cam_label, label=label, form='mean')


def _nuclei_scene():
  """A 256 x 256 field of 16 round nuclei (radius 7) 64 pixels apart, clicked at their centres, as
  sparse as TNBC's tissue: the paper's M (r = 4, d = 20) and the true mask."""
  from donuseg_jax.data import pseudo_labels  # noqa: PLC0415
  centres = np.array([(32 + 64 * i, 32 + 64 * j) for i in range(4) for j in range(4)], np.float32)
  rows, cols = np.mgrid[:256, :256]
  truth = np.zeros((256, 256), bool)
  for x, y in centres:
    truth |= (rows - y) ** 2 + (cols - x) ** 2 <= 49
  label = pseudo_labels.initial_label(centres, (256, 256), r=4., d=20.)
  return label, truth


def test_alpha_orders_hand_made_maps():
  """The true mask must outscore an empty map and the true mask with 5% scattered false
  positives. The paper's form ranks the empty map above the noisy true mask (why selection
  rewarded sparse maps); the balanced form ranks them as a user would."""
  label, truth = _nuclei_scene()
  rng = np.random.default_rng(0)
  noisy = truth | (rng.random(truth.shape) < 0.05)
  maps = {'truth': truth, 'empty': np.zeros_like(truth), 'noisy': noisy}
  cam_labels = np.stack([m.astype(np.int8) for m in maps.values()])[None]  # (1, 3, H, W)
  alphas = {}
  for form in ('paper', 'balanced'):
    values = np.asarray(losses.similarity_rate(cam_label=cam_labels, label=label[None], form=form))[0]
    alphas[form] = dict(zip(maps, values))
  assert alphas['paper']['empty'] > alphas['paper']['noisy']  # the flaw, measured on TNBC too
  balanced = alphas['balanced']
  assert balanced['truth'] > balanced['noisy'] > balanced['empty']
  assert balanced['truth'] == pytest.approx(1.) and balanced['empty'] == pytest.approx(0.5)


@pytest.mark.parametrize('form', ['paper', 'balanced'])
def test_constant_cam_never_wins(form):
  """A flat CAM (normalised to 0) binarises to all background, which M (mostly background) would
  rate highly under the paper's form; it must never be selected, and an image whose CAMs are all
  flat gets an all-ignored P with alpha 0."""
  label, truth = _nuclei_scene()
  rng = np.random.default_rng(1)
  # A blurry but informative CAM: half the nucleus pixels above theta, 10% of the rest in between.
  draw = rng.random(truth.shape)
  weak = np.where(truth, np.where(draw < 0.5, 0.9, 0.5), np.where(draw < 0.1, 0.5, 0.1))
  cams = np.stack([np.zeros_like(weak), weak, np.zeros_like(weak), weak])[None].astype(np.float32)
  cams = np.concatenate([cams, np.zeros_like(cams)])  # image 1: every CAM flat
  labels = np.stack([label, label])
  pseudo, alpha, index = losses.dynamic_cam_selection(cams=cams, label=labels, theta=0.8,
                                                      alpha_form=form)
  assert int(index[0]) == 1
  assert float(alpha[0, 0]) == 0. and float(alpha[0, 2]) == 0.
  np.testing.assert_array_equal(np.asarray(pseudo[1]), -1)
  np.testing.assert_array_equal(np.asarray(alpha[1]), 0.)
  # What the paper's form would have said of the flat map, had it been scored: it would have won.
  flat = np.zeros((1, 1) + label.shape, np.int8)
  weak_binary = np.asarray(losses.binarize_cam(cam=weak, theta=0.8))[None, None]
  if form == 'paper':
    assert (float(losses.similarity_rate(cam_label=flat, label=label[None])[0, 0])
            > float(losses.similarity_rate(cam_label=weak_binary, label=label[None])[0, 0]))
