"""The DoNuSeg network: parameter counts, output shapes, mixed precision, pure forward, no retracing."""

import functools

from configs import default
from flax import nnx
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from donuseg_jax import models
from donuseg_jax.models import resnet

# Tiny programs need no optimised code, and LLVM's optimisation dominates their compile time on
# this 2-core machine.
FAST_COMPILE = {'xla_backend_optimization_level': 0}


def _config(encoder='tiny', **model_fields):
  config = default.get_config('smoke')
  config.model.encoder = encoder
  for key, value in model_fields.items():
    config.model[key] = value
  return config


@pytest.fixture(scope='module')
def tiny():
  """(config, graphdef, params, batch_stats) of the smoke config's tiny model, built once."""
  config = _config()
  model = models.create_model(config, rngs=nnx.Rngs(0))
  return (config, *nnx.split(model, nnx.Param, nnx.BatchStat))


def _param_count(tree) -> int:
  return sum(int(np.prod(v.shape)) for v in jax.tree.leaves(tree))


def _expected_shapes(config, batch, height, width, *, with_cams):
  channels = resnet.feature_channels(config.model.encoder)
  shapes = {
      'features': {f'c{k}': (batch, height // 2**k, width // 2**k, channels[f'c{k}'])
                   for k in range(1, 6)},
      'segmentation': (batch, height, width),
      'localization': (batch, height // 32, width // 32),
      # ceil: P6 is a stride-2 conv on P5, so an odd P5 side (e.g. 96 / 32 = 3) gives ceil(3 / 2).
      'detection': tuple({'logits': (batch, -(-height // s), -(-width // s)),
                          'ltrb': (batch, -(-height // s), -(-width // s), 4),
                          'centerness': (batch, -(-height // s), -(-width // s))}
                         for s in models.DETECTION_STRIDES),
      'projection': (batch, height, width, config.model.projection_dim),
  }
  if with_cams:
    shapes['cams'] = (batch, 4, height, width)
  return shapes


def _abstract_forward(config, images_shape, *, train=True, with_cams=True):
  """Output and batch-stat shapes without compiling or allocating (cheap for ResNet-50)."""
  model = nnx.eval_shape(lambda: models.create_model(config, rngs=nnx.Rngs(0)))
  graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  images = jax.ShapeDtypeStruct(images_shape, jnp.uint8)
  outputs, new_stats = jax.eval_shape(
      lambda p, b, x: models.forward(graphdef, p, b, x, train=train, with_cams=with_cams),
      params, batch_stats, images)
  return params, batch_stats, outputs, new_stats


@pytest.mark.parametrize('name, expected', [
    # torchvision's parameter counts minus the fc layer (2048*1000+1000, 512*1000+1000).
    ('resnet50', 23_508_032),
    ('resnet34', 21_284_672),
    ('resnet18', 11_176_512),
])
def test_encoder_param_count_matches_torchvision(name, expected):
  encoder = nnx.eval_shape(lambda: resnet.ResNet(name, rngs=nnx.Rngs(0)))
  assert _param_count(nnx.state(encoder, nnx.Param)) == expected


@pytest.mark.parametrize('height, width, seg_stride', [(256, 256, 2), (320, 256, 4)])
def test_tiny_output_shapes(height, width, seg_stride):
  config = _config(seg_stride=seg_stride)
  _, _, outputs, _ = _abstract_forward(config, (2, height, width, 3))
  shapes = jax.tree.map(lambda a: a.shape, outputs)
  assert shapes == _expected_shapes(config, 2, height, width, with_cams=True)
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(outputs))
  # The stateful convenience call (no CAMs) gives the same outputs.
  model = nnx.eval_shape(lambda: models.create_model(config, rngs=nnx.Rngs(0)))
  direct = nnx.eval_shape(lambda m, x: m(x), model, jax.ShapeDtypeStruct((2, height, width, 3), jnp.uint8))
  assert jax.tree.map(lambda a: a.shape, direct) == _expected_shapes(config, 2, height, width,
                                                                     with_cams=False)


def test_resnet50_output_shapes_and_stats_structure():
  config = default.get_config()  # full paper model
  params, batch_stats, outputs, new_stats = _abstract_forward(config, (1, 320, 256, 3))
  assert jax.tree.map(lambda a: a.shape, outputs) == _expected_shapes(config, 1, 320, 256, with_cams=True)
  assert jax.tree.structure(new_stats) == jax.tree.structure(batch_stats)
  assert outputs['features']['c5'].shape[-1] == 2048


def test_tiny_forward_runs_on_non_square_input(tiny):
  """Executed (not only shape-checked): finite outputs, positive ltrb, CAMs in [0, 1]."""
  config, graphdef, params, batch_stats = tiny
  images = jax.random.randint(jax.random.key(1), (1, 96, 64, 3), 0, 256).astype(jnp.uint8)
  forward = jax.jit(lambda p, b, x: models.forward(graphdef, p, b, x, train=False, with_cams=True),
                    compiler_options=FAST_COMPILE)
  outputs, new_stats = forward(params, batch_stats, images)
  assert jax.tree.map(lambda a: a.shape, outputs) == _expected_shapes(config, 1, 96, 64, with_cams=True)
  assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(outputs))
  assert all(bool(jnp.all(level['ltrb'] > 0)) for level in outputs['detection'])
  assert 0.0 <= float(outputs['cams'].min()) and float(outputs['cams'].max()) <= 1.0
  # Eval mode: the running statistics come back unchanged.
  assert all(bool(jnp.array_equal(a, b)) for a, b in zip(jax.tree.leaves(new_stats),
                                                          jax.tree.leaves(batch_stats)))


def _conv_input_dtypes(config) -> set[str]:
  """Dtypes of every convolution operand in the traced forward (no compilation)."""
  model = nnx.eval_shape(lambda: models.create_model(config, rngs=nnx.Rngs(0)))
  graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  images = jnp.zeros((1, 64, 64, 3), jnp.uint8)
  jaxpr = jax.make_jaxpr(
      lambda p, b: models.forward(graphdef, p, b, images, train=True, with_cams=True))(params, batch_stats)
  dtypes = set()

  def visit(value):
    if isinstance(value, jax.extend.core.ClosedJaxpr):
      visit(value.jaxpr)
    elif isinstance(value, jax.extend.core.Jaxpr):
      for eqn in value.eqns:
        if eqn.primitive.name == 'conv_general_dilated':
          dtypes.update(str(v.aval.dtype) for v in eqn.invars)
        for param in eqn.params.values():
          visit(param)
    elif isinstance(value, (tuple, list)):
      for item in value:
        visit(item)

  visit(jaxpr)
  return dtypes


def test_bfloat16_switch():
  config = _config(dtype='bfloat16')
  params, _, outputs, _ = _abstract_forward(config, (1, 64, 64, 3))
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(outputs))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  assert _conv_input_dtypes(config) == {'bfloat16'}
  assert _conv_input_dtypes(_config()) == {'float32'}


def test_rejects_bad_sizes_and_settings():
  config = _config()
  with pytest.raises(ValueError, match='divisible by 32'):
    _abstract_forward(config, (1, 80, 64, 3))
  with pytest.raises(ValueError, match='dtype'):
    models.create_model(_config(dtype='float16'), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='seg_stride'):
    models.create_model(_config(seg_stride=8), rngs=nnx.Rngs(0))


def test_train_step_is_traced_once_and_updates_batch_stats(tiny):
  """A jitted stand-in train step (grad through forward with CAMs + SGD) compiles once."""
  _, graphdef, params, batch_stats = tiny
  traces = []

  def loss_fn(params, batch_stats, images):
    outputs, new_stats = models.forward(graphdef, params, batch_stats, images, train=True,
                                        with_cams=True)
    outputs = dict(outputs, cams=jnp.mean(outputs['cams']) * outputs['segmentation'])
    loss = sum(jnp.mean(jnp.square(a)) for a in jax.tree.leaves(outputs))
    return loss, new_stats

  @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
  def step(params, batch_stats, images):
    traces.append(1)  # runs only while tracing
    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats, images)
    params = jax.tree.map(lambda p, g: p - 1e-3 * g, params, grads)
    return params, new_stats, loss

  first_stats = batch_stats
  for seed in range(3):
    images = jax.random.randint(jax.random.key(seed), (2, 64, 64, 3), 0, 256).astype(jnp.uint8)
    params, batch_stats, loss = step(params, batch_stats, images)
    assert np.isfinite(float(loss))
  assert len(traces) == 1
  changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(batch_stats),
                                                      jax.tree.leaves(first_stats))]
  assert all(changed)  # training mode moves every running mean / variance
