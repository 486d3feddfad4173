"""total_loss (Eq. 2) on fake model outputs of the contract shapes: switches, fixed block, warm-up, jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from donuseg_jax import losses

BATCH, SIZE, POINTS = 2, 32, 16  # small: every config below is one more compilation
TERMS = {'use_det': ('loss/det', 1.), 'use_seg': ('loss/seg', 1.), 'use_loc': ('loss/loc', 1.),
         'use_dcs': ('loss/dcs', 0.5), 'use_ccl': ('loss/ccl', 2.)}


def make_config(**loss_overrides):
  config = default.get_config('smoke')
  for name, value in loss_overrides.items():
    setattr(config.loss, name, value)
  return config


def make_batch(rng, config):
  points = POINTS
  label = rng.integers(0, 2, (BATCH, SIZE, SIZE)).astype(np.int8)
  label[rng.random(label.shape) < 0.4] = -1
  centres = rng.uniform(0, SIZE, (BATCH, points, 2)).astype(np.float32)
  sides = rng.uniform(4, 24, (BATCH, points, 1)).astype(np.float32)
  boxes = np.concatenate([centres - sides / 2, centres + sides / 2], -1).clip(0, SIZE)
  valid = np.arange(points)[None] < np.array([[12], [5]])
  return {'image': rng.integers(0, 256, (BATCH, SIZE, SIZE, 3)).astype(np.uint8),
          'label_m': label, 'points': centres, 'point_valid': valid,
          'boxes': boxes.astype(np.float32), 'box_valid': valid,
          'instances': rng.integers(0, 3, (BATCH, SIZE, SIZE)).astype(np.int32)}


def make_outputs(rng, config):
  def normal(*shape):
    return rng.normal(size=shape).astype(np.float32)
  cells = [-(-SIZE // s) for s in (4, 8, 16, 32, 64)]  # P6 of a 32 crop: ceil(32 / 64) = 1
  detection = tuple({'logits': normal(BATCH, c, c),
                     'ltrb': rng.uniform(1., 30., (BATCH, c, c, 4)).astype(np.float32),
                     'centerness': normal(BATCH, c, c)} for c in cells)
  return {'segmentation': normal(BATCH, SIZE, SIZE), 'localization': normal(BATCH, SIZE // 32, SIZE // 32),
          'detection': detection, 'projection': normal(BATCH, SIZE, SIZE, config.model.projection_dim),
          'cams': rng.random((BATCH, 4, SIZE, SIZE)).astype(np.float32)}


_JITTED = {}  # one compilation per set of loss overrides, shared by the tests


def run(outputs, batch, cam_weight=1., **overrides):
  key = tuple(sorted(overrides.items()))
  if key not in _JITTED:
    config = make_config(**overrides)
    _JITTED[key] = jax.jit(lambda o, b, w: losses.total_loss(o, b, config=config, cam_weight=w))
  loss, aux = _JITTED[key](outputs, batch, cam_weight)
  return float(loss), {k: float(v) for k, v in aux.items()}


@pytest.fixture(scope='module')
def inputs():
  rng = np.random.default_rng(0)
  config = make_config()
  return make_outputs(rng, config), make_batch(rng, config)


@pytest.fixture(scope='module')
def full(inputs):
  return run(*inputs)


def test_all_terms_finite_and_summed(full, inputs):
  loss, aux = full
  expected = {'loss', 'loss/det', 'loss/det_focal', 'loss/det_iou', 'loss/det_centerness', 'loss/seg',
              'loss/loc', 'loss/dcs', 'loss/ccl', 'dcs/pseudo_fraction', 'dcs/alpha_p',
              'quality/has_gt', 'quality/true_fraction'}
  expected |= {f'quality/{m}_{q}' for m in ('m', 'p', 'pred')
               for q in ('fg_fraction', 'precision', 'recall', 'iou')}
  expected |= {f'dcs/{name}_block{k}' for name in ('alpha', 'chosen') for k in range(1, 5)}
  assert set(aux) == expected
  assert all(np.isfinite(v) for v in aux.values())
  for name in ('loss/det_focal', 'loss/det_iou', 'loss/det_centerness', 'loss/seg', 'loss/loc',
               'loss/dcs', 'loss/ccl'):
    assert aux[name] > 0., name
  assert aux['loss/det'] == pytest.approx(
      aux['loss/det_focal'] + aux['loss/det_iou'] + aux['loss/det_centerness'], rel=1e-6)
  assert loss == pytest.approx(sum(w * aux[name] for name, w in TERMS.values()), rel=1e-6)
  assert sum(aux[f'dcs/chosen_block{k}'] for k in range(1, 5)) == pytest.approx(1.)
  assert 0. < aux['dcs/pseudo_fraction'] < 1. and aux['quality/has_gt'] == 1.
  # Gradients w.r.t. every output are finite.
  outputs, batch = inputs
  grads = jax.jit(jax.grad(lambda o: losses.total_loss(o, batch, config=make_config())[0]))(outputs)
  assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads))


# use_dcs and use_ccl share the CAM selection, so each is switched off alone; the three
# independent terms are switched off together (one compilation instead of three).
@pytest.mark.parametrize('switches', [('use_dcs',), ('use_ccl',), ('use_det', 'use_seg', 'use_loc')])
def test_switches_remove_their_terms(switches, full, inputs):
  loss, aux = run(*inputs, **{switch: False for switch in switches})
  removed = [TERMS[switch] for switch in switches]
  assert all(aux[name] == 0. for name, _ in removed)
  assert loss == pytest.approx(full[0] - sum(w * full[1][name] for name, w in removed), rel=1e-5)
  for other, _ in TERMS.values():
    if other not in [name for name, _ in removed]:
      assert aux[other] == pytest.approx(full[1][other], rel=1e-5)
  if 'use_det' in switches:
    assert aux['loss/det_focal'] == aux['loss/det_iou'] == aux['loss/det_centerness'] == 0.


def test_fixed_block_and_missing_cams(inputs):
  outputs, batch = inputs
  _, aux = run(outputs, batch, fixed_cam_block=3)
  assert [aux[f'dcs/chosen_block{k}'] for k in range(1, 5)] == [0., 0., 1., 0.]
  no_cams = {k: v for k, v in outputs.items() if k != 'cams'}
  with pytest.raises(KeyError, match='cams'):
    jax.eval_shape(lambda o, b: losses.total_loss(o, b, config=make_config()), no_cams, batch)
  _, aux = jax.eval_shape(
      lambda o, b: losses.total_loss(o, b, config=make_config(use_dcs=False, use_ccl=False)),
      no_cams, batch)
  assert 'loss/dcs' in aux and 'dcs/alpha_block1' not in aux


def test_cam_weight_scales_cam_terms_without_retracing(inputs, full):
  """The warm-up's weight (train.train_step passes 0, then 1) multiplies w1 L_dcs + w2 L_ccl only;
  the terms are still computed and logged at weight 0, and flipping it never retraces."""
  outputs, batch = inputs
  config = make_config()
  traces = []

  def fn(o, b, w):
    traces.append(1)
    return losses.total_loss(o, b, config=config, cam_weight=w)

  jitted = jax.jit(fn)
  _, aux_full = full
  base = aux_full['loss/det'] + aux_full['loss/seg'] + aux_full['loss/loc']
  cam = config.loss.w_dcs * aux_full['loss/dcs'] + config.loss.w_ccl * aux_full['loss/ccl']
  assert cam > 0
  for weight in (0., 1., 0.5, 0.):
    loss, aux = jitted(outputs, batch, jnp.float32(weight))
    assert float(loss) == pytest.approx(base + weight * cam, rel=1e-5), weight
    assert float(aux['loss/dcs']) == pytest.approx(aux_full['loss/dcs'], rel=1e-5)
  assert len(traces) == 1


def test_quality_against_ground_truth(inputs):
  """Foreground precision / recall / IoU of M, P and the prediction, counted by hand."""
  outputs, batch = inputs
  perfect = dict(batch, instances=(batch['label_m'] == 1).astype(np.int32))
  _, aux = run(outputs, perfect)
  assert aux['quality/m_precision'] == aux['quality/m_recall'] == aux['quality/m_iou'] == 1.
  assert aux['quality/has_gt'] == 1.
  truth = np.asarray(perfect['instances']) > 0
  pred = np.asarray(outputs['segmentation']) > 0
  hit = np.sum(pred & truth)
  assert aux['quality/pred_precision'] == pytest.approx(hit / pred.sum(), rel=1e-6)
  assert aux['quality/pred_recall'] == pytest.approx(hit / truth.sum(), rel=1e-6)
  assert aux['quality/pred_iou'] == pytest.approx(hit / np.sum(pred | truth), rel=1e-6)
  assert aux['quality/pred_fg_fraction'] == pytest.approx(pred.mean(), rel=1e-6)
  assert 0. < aux['quality/p_recall'] < 1. and 0. < aux['quality/p_precision'] <= 1.
  # Only images with ground truth count: image 1 without masks leaves image 0's figures.
  half = np.asarray(perfect['instances']).copy()
  half[1] = 0
  _, aux_half = run(outputs, dict(batch, instances=half))
  hit0 = np.sum(pred[0] & truth[0])
  assert aux_half['quality/pred_precision'] == pytest.approx(hit0 / pred[0].sum(), rel=1e-6)
  assert aux_half['quality/has_gt'] == 0.5
  no_gt = dict(batch, instances=np.zeros_like(batch['instances']))
  _, aux = run(outputs, no_gt)
  assert aux['quality/has_gt'] == 0. and aux['quality/m_recall'] == 0.


def _reference_selection(cams, label, *, theta, alpha_form, fixed_block=0):
  """P and alpha_P from NumPy: Eq. 3 binarisation, (balanced) Eq. 4, first maximum over the
  informative (non-constant) blocks."""
  binary = np.where(cams > theta, 1, np.where(cams <= 1 - theta, 0, -1)).astype(np.int8)
  pseudo, alpha_p = [], []
  for b in range(cams.shape[0]):
    alphas = []
    for k in range(cams.shape[1]):
      if cams[b, k].max() <= 0:
        alphas.append(-1.)
        continue
      if alpha_form == 'paper':
        valid = label[b] != -1
        alphas.append(float(np.mean(binary[b, k][valid] == label[b][valid])))
      else:
        rates = [np.mean(binary[b, k][label[b] == v] == v) for v in (1, 0) if np.any(label[b] == v)]
        alphas.append(float(np.mean(rates)))
    k = fixed_block - 1 if fixed_block else int(np.argmax(alphas))
    pseudo.append(binary[b, k])
    alpha_p.append(max(alphas[k], 0.))
  return np.stack(pseudo), np.asarray(alpha_p, np.float32)


@pytest.mark.parametrize('overrides', [{}, {'fixed_cam_block': 2}, {'alpha': 'paper'},
                                       {'pseudo_background': 'm'}])
def test_eq2_wiring_by_value(inputs, overrides):
  """loss/dcs and loss/ccl equal dcs_loss and contrastive_loss evaluated on the P and alpha_P that
  an independent NumPy selection makes, and the total is Eq. 2's weighted sum."""
  outputs, batch = inputs
  config = make_config(**overrides)
  cams = np.asarray(outputs['cams']).copy()
  cams[0, 0] = 0.  # a flat block: never chosen dynamically
  outputs = dict(outputs, cams=cams)
  loss, aux = run(outputs, batch, **overrides)
  pseudo, alpha_p = _reference_selection(cams, np.asarray(batch['label_m']), theta=config.loss.theta,
                                         alpha_form=config.loss.alpha,
                                         fixed_block=config.loss.fixed_cam_block)
  if config.loss.pseudo_background == 'm':  # P's background kept only where M is background too
    label = np.asarray(batch['label_m'])
    restricted = np.where((pseudo == 0) & (label != 0), -1, pseudo).astype(np.int8)
    assert np.sum(restricted != pseudo) > 0  # the case changes P
    pseudo = restricted
  want_dcs = float(losses.dcs_loss(logits=outputs['segmentation'], pseudo=pseudo, alpha=alpha_p))
  want_ccl = float(losses.contrastive_loss(
      features=outputs['projection'], label=batch['label_m'], pseudo=pseudo, alpha=alpha_p,
      tau=config.loss.tau, keys=config.loss.contrastive_keys))
  assert want_dcs > 0. and want_ccl > 0.
  assert aux['loss/dcs'] == pytest.approx(want_dcs, rel=1e-5)
  assert aux['loss/ccl'] == pytest.approx(want_ccl, rel=1e-5)
  assert aux['dcs/alpha_p'] == pytest.approx(float(alpha_p.mean()), rel=1e-5)
  assert loss == pytest.approx(aux['loss/det'] + aux['loss/seg'] + aux['loss/loc']
                               + config.loss.w_dcs * want_dcs + config.loss.w_ccl * want_ccl, rel=1e-5)
