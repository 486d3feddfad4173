"""The pseudo-label figure written at each evaluation: does P grow into whole nuclei?

One PNG per evaluation, `WORKDIR/figures/step_<step>.png`, for one validation crop: a row of image,
initial label M, P and the prediction, over a row of the four block CAMs. M and P are drawn white
(foreground), grey (ignored) and black (background); CAMs and the prediction are grey levels of
[0, 1]. The CAMs come from the running-statistics pass, as in training (`models.forward`).
"""

import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import skimage.io

from donuseg_jax import losses
from donuseg_jax import models
from donuseg_jax.data import pseudo_labels

PANEL_TITLES = ('image', 'M', 'P', 'prediction', 'CAM 1', 'CAM 2', 'CAM 3', 'CAM 4')


def _label_to_grey(label: np.ndarray) -> np.ndarray:
  """1 / -1 / 0 -> 255 / 128 / 0 uint8."""
  return np.select([label == 1, label == -1], [255, 128], 0).astype(np.uint8)


def _grey(values: np.ndarray) -> np.ndarray:
  return np.round(np.clip(values, 0.0, 1.0) * 255).astype(np.uint8)


class PseudoLabelPanels:
  """`PseudoLabelPanels(graphdef, config=...)(params, batch_stats, example)` -> the eight panels
  (name -> (S, S, 3) uint8) for the top-left S x S crop of a whole-image example, S the largest
  multiple of 32 up to config.data.crop_size that fits the image. Compiled once, at the first call."""

  def __init__(self, graphdef, *, config: ml_collections.ConfigDict):
    self.config = config
    self.forward = jax.jit(lambda p, b, x: models.forward(graphdef, p, b, x, train=False,
                                                          with_cams=True))

  def __call__(self, params, batch_stats, example: dict) -> dict[str, np.ndarray]:
    return _panels(self.forward, params, batch_stats, example, config=self.config)


def _panels(forward, params, batch_stats, example: dict, *, config) -> dict[str, np.ndarray]:
  image = np.asarray(example['image'])
  side = min(config.data.crop_size, *image.shape[:2]) // 32 * 32
  if side < 32:
    raise ValueError(f'image {image.shape} is too small for a figure crop')
  label_m = pseudo_labels.make_initial_label(image, example['points'], labels=config.labels)
  image, label_m = image[:side, :side], label_m[:side, :side]
  outputs, _ = forward(params, batch_stats, image[None])
  pseudo, _, _ = losses.dynamic_cam_selection(
      cams=outputs['cams'], label=jnp.asarray(label_m)[None], theta=config.loss.theta,
      fixed_block=config.loss.fixed_cam_block, alpha_form=config.loss.alpha)
  cams = np.asarray(outputs['cams'][0])  # (4, S, S)
  greys = [_label_to_grey(label_m), _label_to_grey(np.asarray(pseudo[0])),
           _grey(np.asarray(jax.nn.sigmoid(outputs['segmentation'][0])))]
  greys += [_grey(cam) for cam in cams]
  panels = [image] + [np.repeat(g[..., None], 3, axis=2) for g in greys]
  return dict(zip(PANEL_TITLES, panels))


def write_pseudo_label_figure(path: str | pathlib.Path, panels: dict[str, np.ndarray]) -> pathlib.Path:
  """Tiles the panels 2 rows x 4 columns with a 4-pixel white gutter; writes the PNG atomically."""
  tiles = list(panels.values())
  side = tiles[0].shape[0]
  gutter = 4
  canvas = np.full((2 * side + gutter, 4 * side + 3 * gutter, 3), 255, np.uint8)
  for i, tile in enumerate(tiles):
    row, col = divmod(i, 4)
    canvas[row * (side + gutter):row * (side + gutter) + side,
           col * (side + gutter):col * (side + gutter) + side] = tile
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  partial = path.with_name(path.name + '.partial.png')
  skimage.io.imsave(partial, canvas, check_contrast=False)
  partial.replace(path)
  return path
