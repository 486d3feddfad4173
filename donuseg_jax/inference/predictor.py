"""Whole-image prediction: the jitted network on windows (device) + stitching, NMS, instances (host).

`predict_image` works with any `predict_windows` callable, so tests use stand-in networks with
known outputs; `make_predict_windows` builds the real one from a trained model's split state.
"""

import math
import time

import jax
import ml_collections
import numpy as np

from donuseg_jax.inference import detections as detections_lib
from donuseg_jax.inference import instances as instances_lib
from donuseg_jax.inference import windows

MIN_IMAGE_SIDE = 2  # smaller images (one-pixel rows/columns) are rejected as bad input


def check_image(image: np.ndarray) -> np.ndarray:
  """The (H, W, 3) uint8 image as an array, or a ValueError that says what is wrong with it."""
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f'expected an RGB image of shape (H, W, 3), got shape {image.shape}')
  if image.dtype != np.uint8:
    raise ValueError(f'expected a uint8 image, got {image.dtype}')
  if min(image.shape[:2]) < MIN_IMAGE_SIDE:
    raise ValueError(f'image of {image.shape[0]}x{image.shape[1]} pixels is too small '
                     f'(each side needs at least {MIN_IMAGE_SIDE})')
  return image


def predict_image(image: np.ndarray, *, predict_windows, config: ml_collections.ConfigDict,
                  timer: dict | None = None) -> dict:
  """Probability map, boxes and instances of one (H, W, 3) uint8 image of any size.

  The windows follow config.eval.windows (windows.window_settings: 'throughput' by default).
  Returns dict(probability (H, W) float32, boxes (K, 4) float32 after NMS (best first),
  scores (K,), instances (H, W) int32 with ids 1..N in score order, instance_scores (N,)).
  `timer`, if given, receives seconds under 'network' (inside predict_windows), 'stitch'
  (everything else up to the stitched map and raw boxes), 'nms' and 'instances'.
  """
  image = check_image(image)
  ev = config.eval
  clock = {} if timer is None else timer
  network_before = clock.get('network', 0.0)
  start = time.perf_counter()
  settings = windows.window_settings(ev, *image.shape[:2])
  devices = getattr(predict_windows, 'device_count', 1)  # sharded batches: a multiple of it
  settings = settings._replace(batch_size=devices * math.ceil(settings.batch_size / devices))
  probability, found = windows.predict_sliding(
      image, predict_windows=predict_windows, window=settings.window, stride=settings.stride,
      batch_size=settings.batch_size, score_threshold=ev.score_threshold,
      max_detections=ev.max_detections, blend=settings.blend, timer=timer)
  after_windows = time.perf_counter()
  keep = detections_lib.nms(found.boxes, found.scores, iou_threshold=ev.nms_iou)
  found = detections_lib.select(found, keep)
  after_nms = time.perf_counter()
  instances, instance_scores = instances_lib.assemble_instances(
      probability, found.boxes, found.scores, method=ev.instance_method,
      grow=ev.grow_px, unclaimed=ev.unclaimed_min_px)
  if timer is not None:
    network = clock.get('network', 0.0) - network_before
    clock['stitch'] = clock.get('stitch', 0.0) + after_windows - start - network
    clock['nms'] = clock.get('nms', 0.0) + after_nms - after_windows
    clock['instances'] = clock.get('instances', 0.0) + time.perf_counter() - after_nms
  return dict(probability=probability, boxes=found.boxes, scores=found.scores,
              instances=instances, instance_scores=instance_scores)


def flip_views(images):
  """(b, h, w, c) -> (4b, h, w, c): the images, then flipped left-right, up-down, and both."""
  import jax.numpy as jnp  # noqa: PLC0415

  return jnp.concatenate([images, images[:, :, ::-1], images[:, ::-1], images[:, ::-1, ::-1]])


def mean_of_flips(maps):
  """(4b, h, w) maps of flip_views' images -> (b, h, w): each flipped back, then averaged."""
  b = maps.shape[0] // 4
  return (maps[:b] + maps[b:2 * b, :, ::-1] + maps[2 * b:3 * b, ::-1]
          + maps[3 * b:, ::-1, ::-1]) / 4


def make_forward_windows(graphdef, *, flips: bool = False):
  """jit((params, batch_stats, images (b, win, win, 3)) -> {'segmentation', 'detection'}), eval mode.

  `flips` (config.eval.flip_tta): the segmentation logits are the mean over the four flips of each
  window (test-time augmentation, 4x the network work); detection always comes from the window as
  it is (FCOS boxes would need their sides swapped, and NMS already merges duplicates).
  Build it once per model and reuse it (e.g. across validations): each new one compiles again.
  """
  from donuseg_jax import models  # noqa: PLC0415 (stand-in networks need no model code)

  def forward_windows(params, batch_stats, images):
    if not flips:
      outputs, _ = models.forward(graphdef, params, batch_stats, images, train=False)
      # Returning only these lets XLA drop the localization and projection heads from the program.
      return {'segmentation': outputs['segmentation'], 'detection': outputs['detection']}
    outputs, _ = models.forward(graphdef, params, batch_stats, flip_views(images), train=False)
    b = images.shape[0]
    return {'segmentation': mean_of_flips(outputs['segmentation']),
            'detection': jax.tree.map(lambda x: x[:b], outputs['detection'])}
  return jax.jit(forward_windows)


def make_predict_windows(graphdef, params, batch_stats, *, forward_windows=None, devices=None,
                         flips: bool = False):
  """The eval-mode network as `predict_windows(images (b, win, win, 3) uint8) -> outputs`.

  Returns device arrays without waiting for them, so the host can stitch one batch while the
  device computes the next. `forward_windows` (from make_forward_windows) avoids recompiling;
  without it, `flips` is make_forward_windows' test-time flip averaging.
  With several `devices` (default: this process's devices) the parameters are replicated once and
  each batch is split over them along a 1-D ('data',) mesh; a batch whose size is not a multiple of
  the device count is padded with black windows (and the padding dropped from the outputs).
  `predict_windows.device_count` tells callers which batch sizes avoid that padding.
  """
  forward_windows = forward_windows or make_forward_windows(graphdef, flips=flips)
  devices = list(jax.local_devices() if devices is None else devices)
  count = len(devices)
  batched = None
  if count > 1:
    mesh = jax.sharding.Mesh(np.asarray(devices), ('data',))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    batched = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
    params, batch_stats = jax.device_put((params, batch_stats), replicated)

  def predict_windows(images: np.ndarray) -> dict:
    if batched is None:
      return forward_windows(params, batch_stats, images)
    size = len(images)
    extra = -size % count
    if extra:
      images = np.concatenate([images, np.zeros((extra,) + images.shape[1:], images.dtype)])
    outputs = forward_windows(params, batch_stats, jax.device_put(images, batched))
    return jax.tree.map(lambda x: x[:size], outputs) if extra else outputs
  predict_windows.device_count = count
  return predict_windows
