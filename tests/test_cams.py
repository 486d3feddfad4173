"""Grad-CAMs: range, shape, no gradient through them, and known answers (hand-built and model)."""

import functools

from configs import default
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from donuseg_jax import models
from donuseg_jax.models import cams as cams_lib

# Tiny programs need no optimised code; LLVM's optimisation dominates compile time on 2 cores.
FAST_COMPILE = {'xla_backend_optimization_level': 0}


@pytest.fixture(scope='module')
def tiny():
  config = default.get_config('smoke')
  model = models.create_model(config, rngs=nnx.Rngs(0))
  return nnx.split(model, nnx.Param, nnx.BatchStat)


def _images(batch, size, seed=0):
  return jax.random.randint(jax.random.key(seed), (batch, size, size, 3), 0, 256).astype(jnp.uint8)


def _squares(red_at, green_at):
  """(16, 16, 2) features: a dim 'red' square (channel 0) and a brighter 'green' one (channel 1)."""
  features = np.zeros((16, 16, 2), np.float32)
  features[red_at[0]:red_at[0] + 4, red_at[1]:red_at[1] + 4, 0] = 0.5
  features[green_at[0]:green_at[0] + 4, green_at[1]:green_at[1] + 4, 1] = 1.0
  return features


def test_grad_cams_on_hand_built_encoder():
  """Score reads only the red channel: every block's CAM peaks on the red square, never the green.

  The green square is brighter, so a CAM that ignored the gradient weights would peak there.
  """
  red_at, green_at = [(2, 2), (10, 9)], [(10, 10), (1, 3)]  # per image, (row, col) in the 16 grid
  features = jnp.stack([_squares(r, g) for r, g in zip(red_at, green_at)])  # (2, 16, 16, 2)

  def score_fn(probes):
    block1 = features + probes[0]  # (2, 16, 16, 2)
    block2 = block1.reshape(2, 8, 2, 8, 2, 2).mean(axis=(2, 4)) + probes[1]  # (2, 8, 8, 2), 2x2 mean
    score = jnp.sum(jax.nn.relu(block2[..., 0]))
    return score, ([block1, block2], block2)

  probes = [jnp.zeros((2, 16, 16, 2)), jnp.zeros((2, 8, 8, 2))]
  run = jax.jit(functools.partial(cams_lib.grad_cams, score_fn, size=(32, 32)),
                compiler_options=FAST_COMPILE)
  cams, aux = run(probes)
  assert cams.shape == (2, 2, 32, 32) and cams.dtype == jnp.float32
  np.testing.assert_array_equal(aux, features.reshape(2, 8, 2, 8, 2, 2).mean(axis=(2, 4)))
  assert float(cams.min()) >= 0.0 and float(cams.max()) <= 1.0
  for b in range(2):
    red = np.zeros((32, 32), bool)
    red[2 * red_at[b][0]:2 * red_at[b][0] + 8, 2 * red_at[b][1]:2 * red_at[b][1] + 8] = True
    green = np.zeros((32, 32), bool)
    green[2 * green_at[b][0]:2 * green_at[b][0] + 8, 2 * green_at[b][1]:2 * green_at[b][1] + 8] = True
    unweighted = np.kron(np.asarray(features[b]).sum(-1), np.ones((2, 2)))  # (32, 32)
    assert green.flat[int(np.argmax(unweighted))]  # the trap the weights must avoid
    for k in range(2):
      cam = np.asarray(cams[b, k])
      assert red.flat[int(np.argmax(cam))], (b, k)
      assert cam[red].max() >= 0.9  # 1 at the peak cell, slightly less after bilinear resizing
      assert cam[green].max() == 0.0


def test_normalize_per_image_constant_map_is_zero():
  maps = jnp.stack([jnp.full((4, 4), 3.0), jnp.arange(16.0).reshape(4, 4)])
  out = cams_lib.normalize_per_image(maps)
  np.testing.assert_array_equal(out[0], 0.0)
  assert float(out[1].min()) == 0.0 and float(out[1].max()) == 1.0


def test_model_cams_range_shape_and_no_gradient(tiny):
  graphdef, params, batch_stats = tiny
  images = _images(2, 64)

  def outputs_loss(params, with_cams):
    outputs, _ = models.forward(graphdef, params, batch_stats, images, train=True, with_cams=with_cams)
    cams = outputs.pop('cams', None)
    loss = sum(jnp.mean(jnp.square(a)) for a in jax.tree.leaves(outputs))
    return loss, cams

  def loss_plus_cams(params):
    loss, cams = outputs_loss(params, True)
    return loss + jnp.sum(cams)

  @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
  def run(params):
    cams = outputs_loss(params, True)[1]
    return cams, jax.grad(loss_plus_cams)(params), jax.grad(lambda p: outputs_loss(p, False)[0])(params)

  cams, grads_with, grads_without = run(params)
  assert cams.shape == (2, 4, 64, 64) and cams.dtype == jnp.float32
  assert float(cams.min()) >= 0.0 and float(cams.max()) <= 1.0
  # Min-max normalised to a peak of 1 (0 if constant); bilinear resizing keeps the peak above 0.5.
  peaks = np.asarray(cams.max(axis=(2, 3)))  # (B, 4)
  assert np.all((peaks > 0.5) | (peaks == 0.0)) and np.any(peaks > 0.5)
  # Adding sum(cams) to the loss changes no gradient: the CAMs pass none, and the forward pass they
  # share with the other outputs still carries its own.
  for a, b in zip(jax.tree.leaves(grads_with), jax.tree.leaves(grads_without)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)
  assert all(np.any(g) for g in jax.tree.leaves(grads_with['encoder']))


def test_model_cams_equal_per_block_gradients(tiny):
  """The one-backward-pass CAMs equal Grad-CAMs from four separate gradients of the same score."""
  graphdef, params, batch_stats = tiny
  images = _images(2, 64, seed=3)

  @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
  def run(params):
    cams = models.compute_cams(graphdef, params, batch_stats, images, train=False)
    model = nnx.merge(graphdef, params, batch_stats)
    encoder = model.encoder
    features = encoder(models.normalize(images), train=False)
    stages = encoder.stages()
    reference = []
    for k in range(4):  # block k: gradient of the score w.r.t. C_{k+2} through stages k+1..4

      def score(a, k=k):
        for stage in stages[k + 1:]:
          for block in stage:
            a = block(a, train=False)
        return jnp.sum(model.localization(a))

      activation = features[f'c{k + 2}']
      reference.append(cams_lib.grad_cam(activation, jax.grad(score)(activation), size=(64, 64)))
    return cams, jnp.stack(reference, axis=1)

  cams, reference = run(params)
  np.testing.assert_allclose(cams, reference, atol=1e-5)
  assert float(reference.max()) > 0.5  # not a comparison of two all-zero maps


def test_model_c5_cam_peaks_where_localization_responds(tiny):
  """Localization head set to the channel sum of C5 (>= 0 after ReLU): its gradient w.r.t. C5 is
  one constant, so the C5 Grad-CAM is the min-max normalised localization map itself."""
  graphdef, params, batch_stats = tiny
  model = nnx.merge(graphdef, params, batch_stats)
  head = model.localization
  for layer in (head.fc1, head.fc2, head.fc3):
    kernel = np.zeros(layer.kernel.shape, np.float32)
    kernel[0, 0, :, 0] = 1.0 if layer is head.fc1 else 0.0
    kernel[0, 0, 0, 0] = 1.0
    layer.kernel[...] = jnp.asarray(kernel)
    layer.bias[...] = jnp.zeros(layer.bias.shape)
  _, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  images = _images(2, 128, seed=5)
  forward = jax.jit(lambda p: models.forward(graphdef, p, batch_stats, images, train=False,
                                             with_cams=True)[0], compiler_options=FAST_COMPILE)
  outputs = forward(params)
  localization, cam5 = np.asarray(outputs['localization']), np.asarray(outputs['cams'][:, 3])
  np.testing.assert_allclose(localization, outputs['features']['c5'].sum(-1), rtol=1e-5)
  for b in range(2):
    row, col = np.unravel_index(np.argmax(localization[b]), localization[b].shape)
    peak_row, peak_col = np.unravel_index(np.argmax(cam5[b]), cam5[b].shape)
    assert (peak_row // 32, peak_col // 32) == (row, col)
  expected = jax.image.resize(cams_lib.normalize_per_image(jnp.asarray(localization)), (2, 128, 128),
                              'bilinear')
  np.testing.assert_allclose(cam5, expected, atol=1e-5)


def _reference_grad_cam(activation: np.ndarray, gradient: np.ndarray) -> np.ndarray:
  """Grad-CAM in float64 NumPy, written out: per image and channel w = mean of the gradient over
  space; map = ReLU(sum_c w A_c); min-max scaled per image (constant -> 0)."""
  out = np.zeros(activation.shape[:3])
  for b in range(activation.shape[0]):
    cam = np.zeros(activation.shape[1:3])
    for c in range(activation.shape[3]):
      cam += gradient[b, :, :, c].mean() * activation[b, :, :, c]
    cam = np.maximum(cam, 0.0)
    span = cam.max() - cam.min()
    out[b] = (cam - cam.min()) / span if span > 0 else 0.0
  return out


def test_grad_cam_mixed_sign_weights_that_differ_per_image():
  """Weights of both signs that differ per image: a dropped ReLU, |gradient| or weights averaged
  across the batch each change the answer (checked: each variant differs from the reference)."""
  rng = np.random.default_rng(7)
  activation = rng.uniform(0.0, 1.0, (3, 8, 8, 4))
  weights = np.array([[1.0, -2.0, 0.5, 0.0], [-1.0, 1.5, -0.5, 2.0], [0.3, 0.3, -3.0, 1.0]])
  # Spatially varying gradients whose spatial mean is the weight.
  noise = rng.normal(0.0, 1.0, (3, 8, 8, 4))
  gradient = weights[:, None, None, :] + noise - noise.mean(axis=(1, 2), keepdims=True)
  got = np.asarray(cams_lib.grad_cam(jnp.asarray(activation, jnp.float32),
                                     jnp.asarray(gradient, jnp.float32), size=(8, 8)))
  want = _reference_grad_cam(activation, gradient)
  np.testing.assert_allclose(got, want, atol=1e-5)
  # The reference is sensitive to each classic mistake, so the comparison above has power.
  no_relu = np.einsum('bhwc,bc->bhw', activation, weights)
  assert (no_relu < 0).mean() > 0.2  # negative evidence exists and must be cut
  assert not np.allclose(_reference_grad_cam(activation, np.abs(gradient)), want, atol=1e-2)
  mixed = np.broadcast_to(gradient.mean(axis=0, keepdims=True), gradient.shape)
  assert not np.allclose(_reference_grad_cam(activation, mixed), want, atol=1e-2)


def _distinct_images(batch, size):
  """Different images (one colour gradient and noise level each), uint8."""
  rng = np.random.default_rng(11)
  images = []
  for b in range(batch):
    ramp = np.linspace(0, 255, size)[None, :, None] * (b + 1) / batch
    images.append(np.clip(ramp + rng.normal(0, 40 * (b + 1), (size, size, 3)), 0, 255))
  return jnp.asarray(np.stack(images).astype(np.uint8))


def test_eval_cam_of_an_image_does_not_depend_on_its_batch(tiny):
  graphdef, params, batch_stats = tiny
  images = _distinct_images(3, 64)
  run = jax.jit(lambda x: models.compute_cams(graphdef, params, batch_stats, x, train=False),
                compiler_options=FAST_COMPILE)
  together = np.asarray(run(images))
  assert float(together.max()) > 0.5
  for b in range(3):
    alone = np.asarray(run(images[b:b + 1]))
    np.testing.assert_allclose(together[b], alone[0], atol=1e-5)


def test_training_forward_cams_explain_the_network_as_it_predicts(tiny):
  """Decided (issue 9): the training forward's CAMs are those of the running-statistics network,
  computed per image. The 'batch' setting (the old shared pass) shows why: BatchNorm's backward
  removes each channel's batch-mean gradient, so the block 1-3 Grad-CAM weights cancel over the
  batch and the maps differ from the network's own."""
  graphdef, params, batch_stats = tiny
  images = _distinct_images(4, 64)

  @functools.partial(jax.jit, static_argnames='mode', compiler_options=FAST_COMPILE)
  def train_cams(images, mode):
    outputs, _ = models.forward(graphdef, params, batch_stats, images, train=True, with_cams=True,
                                cam_statistics=mode)
    return outputs['cams']

  reference = np.asarray(jax.jit(lambda x: models.compute_cams(graphdef, params, batch_stats, x,
                                                               train=False))(images))
  running = np.asarray(train_cams(images, 'running'))
  np.testing.assert_allclose(running, reference, atol=1e-5)
  alone = np.asarray(train_cams(images[1:2], 'running'))
  np.testing.assert_allclose(running[1], alone[0], atol=1e-5)
  batch = np.asarray(train_cams(images, 'batch'))
  assert np.abs(batch[:, :3] - reference[:, :3]).max() > 0.1
  with pytest.raises(ValueError, match='cam_statistics'):
    models.forward(graphdef, params, batch_stats, images, train=True, with_cams=True,
                   cam_statistics='mean')
