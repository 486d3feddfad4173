"""CCL (Eq. 6-7): the O(pixels) loss against the direct double loop over u and v, gradients, empty sets."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from donuseg_jax import losses


def random_label(rng, shape, *, p_ignore=0.4):
  label = rng.integers(0, 2, shape).astype(np.int8)
  label[rng.random(shape) < p_ignore] = -1
  return label


def cosine(a, b):
  return float(np.dot(a, b) / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-300))


def reference_con(q, positives, negatives, tau, minus_anchor):
  """Eq. 7 written literally: explicit loops over u in U and, inside, over v in V."""
  if not positives:
    return 0.
  key = (lambda z: z - q) if minus_anchor else (lambda z: z)
  total = 0.
  for u in positives:
    s_u = cosine(q, key(u)) / tau
    denominator = math.exp(s_u)
    for v in negatives:
      denominator += math.exp(cosine(q, key(v)) / tau)
    total += s_u - math.log(denominator)
  return -total / len(positives)


def reference_ccl(features, label, pseudo, alpha, tau, minus_anchor=False):
  """Eq. 6 per image (an empty anchor set drops that anchor's term), then the batch mean."""
  per_image = []
  for b in range(features.shape[0]):
    z = features[b].reshape(-1, features.shape[-1])
    m, p = label[b].reshape(-1), pseudo[b].reshape(-1)
    s_pos, s_neg = list(z[p == 1]), list(z[p == 0])
    loss = 0.
    if np.any(m == 1):
      loss += reference_con(z[m == 1].mean(0), s_pos, s_neg, tau, minus_anchor)
    if np.any(m == 0):
      loss += reference_con(z[m == 0].mean(0), s_neg, s_pos, tau, minus_anchor)
    per_image.append(alpha[b] * loss)
  return float(np.mean(per_image))


def make_inputs(seed, shape=(3, 8, 8), dim=5):
  rng = np.random.default_rng(seed)
  features = rng.normal(size=shape + (dim,))
  label, pseudo = random_label(rng, shape), random_label(rng, shape, p_ignore=0.3)
  alpha = rng.uniform(0.2, 1., shape[0])
  return features, label, pseudo, alpha


@pytest.mark.parametrize('keys', ['features', 'minus_anchor'])
@pytest.mark.parametrize('tau', [1.0, 0.1])
def test_matches_direct_eq7(keys, tau):
  features, label, pseudo, alpha = make_inputs(0)
  label[1][label[1] == 1] = 0  # image 1: no foreground anchor
  pseudo[2][pseudo[2] == 0] = 1  # image 2: no negatives in P
  with jax.enable_x64(True):
    got = losses.contrastive_loss(features=jnp.asarray(features), label=jnp.asarray(label),
                                  pseudo=jnp.asarray(pseudo), alpha=jnp.asarray(alpha), tau=tau,
                                  keys=keys)
  want = reference_ccl(features, label, pseudo, alpha, tau, minus_anchor=keys == 'minus_anchor')
  assert want > 0.
  np.testing.assert_allclose(float(got), want, rtol=1e-9)


def test_float32_close_to_float64_reference():
  features, label, pseudo, alpha = make_inputs(1, shape=(2, 16, 16), dim=8)
  got = jax.jit(lambda z: losses.contrastive_loss(features=z, label=label, pseudo=pseudo,
                                                  alpha=alpha.astype(np.float32)))(
                                                      features.astype(np.float32))
  np.testing.assert_allclose(float(got), reference_ccl(features, label, pseudo, alpha, 1.), rtol=1e-5)


def _grad(features, label, pseudo, alpha, **kwargs):
  fn = lambda z: losses.contrastive_loss(features=z, label=label, pseudo=pseudo, alpha=alpha, **kwargs)
  value, grad = jax.jit(jax.value_and_grad(fn))(jnp.asarray(features, jnp.float32))
  return float(value), np.asarray(grad)


@pytest.mark.parametrize('keys', ['features', 'minus_anchor'])
def test_gradients_only_reach_anchor_and_contrast_pixels(keys):
  features, label, pseudo, alpha = make_inputs(2, shape=(2, 16, 16))
  alpha = alpha.astype(np.float32)
  _, grad = _grad(features, label, pseudo, alpha, keys=keys)
  norms = np.linalg.norm(grad, axis=-1)  # (B, H, W)
  assert np.all(np.isfinite(grad))
  untouched = (label == -1) & (pseudo == -1)
  assert np.all(norms[untouched] == 0.)
  assert np.all(norms[pseudo != -1] > 0.)
  # Anchors carry gradient (our choice): M-only pixels move too; with stopped anchors they do not.
  m_only = (label != -1) & (pseudo == -1)
  assert np.all(norms[m_only] > 0.)
  _, stopped = _grad(features, label, pseudo, alpha, keys=keys, stop_anchor_gradient=True)
  assert np.all(np.linalg.norm(stopped, axis=-1)[m_only | untouched] == 0.)


@pytest.mark.parametrize('case', ['no_m_foreground', 'no_p', 'all_ignored', 'one_class', 'zero_features'])
def test_empty_sets_are_finite(case):
  features, label, pseudo, alpha = make_inputs(3, shape=(2, 8, 8))
  alpha = alpha.astype(np.float32)
  if case == 'no_m_foreground':
    label[label == 1] = 0
  elif case == 'no_p':
    pseudo[:] = -1
  elif case == 'all_ignored':
    label[:] = -1
    pseudo[:] = -1
  elif case == 'one_class':
    label[label == 0] = 1
    pseudo[pseudo == 0] = 1
  else:
    features[:] = 0.  # zero vectors: cosine guarded by eps, anchors are zero too
  value, grad = _grad(features, label, pseudo, alpha)
  assert np.isfinite(value) and np.all(np.isfinite(grad))
  want = reference_ccl(features, label, pseudo, alpha, 1.) if case != 'zero_features' else None
  if case in ('no_p', 'all_ignored', 'one_class'):
    assert value == 0.  # no U with a V: nothing to contrast
  if want is not None:
    np.testing.assert_allclose(value, want, rtol=1e-5, atol=1e-7)


def test_alpha_scales_and_is_not_differentiated():
  features, label, pseudo, alpha = make_inputs(4)
  fn = lambda a: losses.contrastive_loss(features=features.astype(np.float32), label=label,
                                         pseudo=pseudo, alpha=a)
  ones = np.ones(3, np.float32)
  assert float(fn(2. * ones)) == pytest.approx(2. * float(fn(ones)), rel=1e-6)
  assert not np.any(np.asarray(jax.grad(fn)(ones)))


def test_unknown_keys_is_an_error():
  features, label, pseudo, alpha = make_inputs(5)
  with pytest.raises(ValueError, match='keys'):
    losses.contrastive_loss(features=features.astype(np.float32), label=label, pseudo=pseudo,
                            alpha=alpha.astype(np.float32), keys='u-q')
