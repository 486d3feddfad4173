# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---

# %% [markdown]
# # Inspecting the DoNuSeg losses on a real TNBC batch
#
# A freshly initialised smoke model (`configs/default.py:smoke`) on one training batch of TNBC
# crops: every term of Eq. 2 and every pseudo-label diagnostic, computed first one function at a
# time (as `donuseg_jax.losses` exposes them) and then by `total_loss`, which must agree. The figure
# shows, per crop: the image, the initial label M, the four block CAMs, their binarised maps C_k
# (Eq. 3) and the selected pseudo label P (the C_k with the largest similarity rate alpha_k, Eq. 4).
#
# Run as a script: `python experiments/inspect_losses.py`; the figure goes to
# `experiments/figures/inspect_losses.png`, or to `$INSPECT_LOSSES_FIGURE` when set. The data come
# from `$DONUSEG_DATA_ROOT` / `../shared/data` and the prepared TFDS files from `$DONUSEG_TFDS_DIR`
# (prepared on first use).

# %%
import os
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import skimage.io
from flax import nnx

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1] if '__file__' in globals() else pathlib.Path.cwd()
if str(REPO_ROOT) not in sys.path:
  sys.path.insert(0, str(REPO_ROOT))

from configs import default  # noqa: E402
from donuseg_jax import losses  # noqa: E402
from donuseg_jax import models  # noqa: E402
from donuseg_jax.data import batch as batch_lib  # noqa: E402
from donuseg_jax.data import datasets  # noqa: E402
from donuseg_jax.data import pipeline  # noqa: E402

FIGURE = pathlib.Path(os.environ.get('INSPECT_LOSSES_FIGURE',
                                     REPO_ROOT / 'experiments' / 'figures' / 'inspect_losses.png'))

# %% [markdown]
# ## One TNBC training batch
# The smoke config with 128-pixel crops and a batch of 2 (large enough to see nuclei, small enough
# for a CPU in seconds).

# %%
config = default.get_config('smoke')
config.data.name = 'tnbc'
config.data.crop_size = 128
config.data.batch_size = 2
examples = datasets.load_examples('tnbc', data_root=config.data.data_root or None,
                                  tfds_dir=config.data.tfds_dir or None)
prepared = pipeline.prepare_images(examples[:config.data.batch_size], config=config)
batch = pipeline.TrainBatches(prepared, config=config).batch_at(0)
batch_lib.check_train_batch(batch, crop_size=config.data.crop_size, max_points=config.data.max_points)
print('images:', [e['id'] for e in examples[:config.data.batch_size]],
      '| points per crop:', batch['point_valid'].sum(axis=1).tolist())

# %% [markdown]
# ## A freshly initialised smoke model, forward pass with CAMs (training mode)

# %%
model = models.create_model(config, rngs=nnx.Rngs(config.seed))
graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)


@jax.jit
def forward(params, batch_stats, images):
  outputs, _ = models.forward(graphdef, params, batch_stats, images, train=True, with_cams=True)
  return outputs


outputs = forward(params, batch_stats, batch['image'])
print({k: getattr(v, 'shape', len(v)) for k, v in outputs.items() if k != 'features'})

# %% [markdown]
# ## Every loss, one function at a time

# %%
cfg = config.loss
size = config.data.crop_size


@jax.jit  # one compilation for the whole cell (op-by-op dispatch would compile every primitive)
def loss_terms(outputs, batch):
  label_m = batch['label_m']
  terms = {}
  terms['loss/seg'] = losses.segmentation_loss(logits=outputs['segmentation'], label=label_m,
                                               balance=cfg.seg_balance)
  loc_target = losses.localization_target(label_m=label_m,
                                          stride=size // outputs['localization'].shape[1])
  terms['loss/loc'] = losses.localization_loss(prediction=outputs['localization'], target=loc_target)
  det_targets = losses.detection_targets(boxes=batch['boxes'], box_valid=batch['box_valid'],
                                         image_size=size)
  det = losses.detection_loss(outputs_detection=outputs['detection'], targets=det_targets,
                              alpha=cfg.focal_alpha, gamma=cfg.focal_gamma)
  terms.update({f'loss/det_{k}': v for k, v in det.items()})
  pseudo, alpha, index = losses.dynamic_cam_selection(
      cams=outputs['cams'], label=label_m, theta=cfg.theta, fixed_block=cfg.fixed_cam_block,
      alpha_form=cfg.alpha)
  alpha_p = jnp.take_along_axis(alpha, index[:, None], axis=1)[:, 0]  # (B,) alpha of P
  terms['loss/dcs'] = losses.dcs_loss(logits=outputs['segmentation'], pseudo=pseudo, alpha=alpha_p)
  terms['loss/ccl'] = losses.contrastive_loss(features=outputs['projection'], label=label_m,
                                              pseudo=pseudo, alpha=alpha_p, tau=cfg.tau,
                                              keys=cfg.contrastive_keys)
  positives = [jnp.sum(t['labels']) for t in det_targets]
  return terms, pseudo, alpha, index, positives


terms, pseudo, alpha, index, positives = loss_terms(outputs, batch)
label_m = batch['label_m']
print('positive locations per level P2..P6:', [int(p) for p in positives])
print('alpha per image and block:\n', np.round(np.asarray(alpha), 3), '\nchosen block:',
      (np.asarray(index) + 1).tolist())
for name, value in terms.items():
  print(f'{name:24s} {float(value):.6f}')

# %% [markdown]
# ## total_loss (Eq. 2) and the diagnostics it logs; its terms must equal the ones above

# %%
loss, aux = jax.jit(lambda o, b: losses.total_loss(o, b, config=config))(outputs, batch)
for name in sorted(aux):
  print(f'{name:24s} {float(aux[name]):.6f}')
for name, value in terms.items():
  np.testing.assert_allclose(float(aux[name]), float(value), rtol=1e-5, err_msg=name)
assert all(np.isfinite(float(v)) for v in aux.values()), 'non-finite loss term'

# %% [markdown]
# ## Figure: image | M | CAM 1-4 | C 1-4 | P
# Labels as in the paper's Fig. 1: red = nucleus, dark gray = background, light gray = ignored.
# The column of C_k chosen as P is framed in green.

# %%
LABEL_COLOURS = {1: (220, 40, 40), 0: (70, 70, 70), -1: (200, 200, 200)}


def colour_label(label):
  out = np.zeros(label.shape + (3,), np.uint8)
  for value, rgb in LABEL_COLOURS.items():
    out[label == value] = rgb
  return out


def gray(cam):
  return np.repeat((np.clip(cam, 0., 1.) * 255).astype(np.uint8)[..., None], 3, axis=-1)


def frame(panel, rgb, width=3):
  panel = panel.copy()
  panel[:width], panel[-width:], panel[:, :width], panel[:, -width:] = rgb, rgb, rgb, rgb
  return panel


def montage(rows, gap=4):
  """rows: list of lists of equally sized (S, S, 3) uint8 panels -> one white-separated image."""
  side = rows[0][0].shape[0]
  height = len(rows) * (side + gap) + gap
  width = len(rows[0]) * (side + gap) + gap
  out = np.full((height, width, 3), 255, np.uint8)
  for r, row in enumerate(rows):
    for c, panel in enumerate(row):
      y, x = gap + r * (side + gap), gap + c * (side + gap)
      out[y:y + side, x:x + side] = panel
  return out


cams = np.asarray(outputs['cams'])
binary = np.asarray(losses.binarize_cam(cam=cams, theta=cfg.theta))
rows = []
for b in range(cams.shape[0]):
  chosen = int(index[b])
  row = [batch['image'][b], colour_label(label_m[b])]
  row += [gray(cams[b, k]) for k in range(cams.shape[1])]
  row += [frame(colour_label(binary[b, k]), (40, 200, 40)) if k == chosen else colour_label(binary[b, k])
          for k in range(cams.shape[1])]
  row.append(colour_label(np.asarray(pseudo[b])))
  rows.append(row)
figure = montage(rows)
figure = np.repeat(np.repeat(figure, 2, axis=0), 2, axis=1)  # 2x for legibility
FIGURE.parent.mkdir(parents=True, exist_ok=True)
skimage.io.imsave(FIGURE, figure, check_contrast=False)
print('figure:', FIGURE, figure.shape)
