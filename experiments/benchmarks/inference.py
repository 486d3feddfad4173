"""Benchmark (not a test): whole-image prediction speed, network and post-processing separately.

Image: CoNSeP test_1 (1000x1000). Two runs of `inference.predictor.predict_image`:
  1. the real network (an untrained `--variant` model: the speed does not depend on the weights),
     compiled first; its time inside the jitted forward is the network time;
  2. a NumPy stand-in network whose outputs look like a trained model's (the dark H&E blobs as
     foreground, one box per blob), so that stitching, NMS and instance assembly see a realistic
     number of nuclei (an untrained head detects nothing).
Post-processing = window extraction, blending, decoding (stitch) + NMS + instances, from run 2.
Megapixels per second (wall clock; also process CPU time, since the machine may be shared):

  python experiments/benchmarks/inference.py [--variant smoke|lite] [--repeats 3]
"""

import argparse
import os
import pathlib
import sys
import time

import numpy as np
from scipy import ndimage

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

from configs import default  # noqa: E402
from donuseg_jax.data import images  # noqa: E402
from donuseg_jax.data import paths  # noqa: E402
from donuseg_jax.inference import predictor  # noqa: E402


def blob_network(images_batch: np.ndarray) -> dict:
  """Stand-in: dark pixels are nuclei; each dark blob of a window gets one P3 box."""
  batch, window = images_batch.shape[:2]
  gray = images_batch.astype(np.float32).mean(-1)  # (b, win, win)
  levels = []
  for s in (4, 8, 16, 32, 64):
    h = window // s
    levels.append({'logits': np.full((batch, h, h), -8.0, np.float32),
                   'ltrb': np.ones((batch, h, h, 4), np.float32),
                   'centerness': np.zeros((batch, h, h), np.float32)})
  for b in range(batch):
    blobs, _ = ndimage.label(ndimage.binary_opening(gray[b] < 150, iterations=2))
    for index, found in enumerate(ndimage.find_objects(blobs)):
      rows, cols = found
      y, x = (rows.start + rows.stop) / 2, (cols.start + cols.stop) / 2
      i, j = min(int(y // 8), window // 8 - 1), min(int(x // 8), window // 8 - 1)
      cx, cy = j * 8 + 4, i * 8 + 4
      levels[1]['logits'][b, i, j] = 4.0
      levels[1]['ltrb'][b, i, j] = np.maximum(
          [cx - cols.start, cy - rows.start, cols.stop - cx, rows.stop - cy], 1.0)
  return {'segmentation': (150.0 - gray) / 10.0, 'detection': tuple(levels)}


def timed_runs(image, predict_windows, config, repeats):
  """Best-of-`repeats` timer dict (seconds) and the last result."""
  best, result = None, None
  for _ in range(repeats):
    timer = {}
    wall, cpu = time.perf_counter(), time.process_time()
    result = predictor.predict_image(image, predict_windows=predict_windows, config=config,
                                     timer=timer)
    timer['total'] = time.perf_counter() - wall
    timer['total_cpu'] = time.process_time() - cpu
    if best is None or timer['total'] < best['total']:
      best = timer
  return best, result


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--variant', default='lite', choices=['smoke', 'lite', ''])
  parser.add_argument('--image', default='consep/CoNSeP/Test/Images/test_1.png')
  parser.add_argument('--repeats', type=int, default=3)
  args = parser.parse_args()

  import jax  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415
  from donuseg_jax import models  # noqa: PLC0415

  image = images.read_image(paths.data_root() / args.image)
  megapixels = image.shape[0] * image.shape[1] / 1e6
  config = default.get_config(args.variant)
  ev = config.eval
  print(f'image: {args.image} {image.shape[1]}x{image.shape[0]}; {os.cpu_count()} CPUs, '
        f'load average {os.getloadavg()[0]:.1f}; jax {jax.__version__} on {jax.devices()[0].platform}')
  print(f'config: {args.variant or "paper"} (encoder {config.model.encoder}, seg_stride '
        f'{config.model.seg_stride}); window {ev.window}, stride {ev.stride}, batch {ev.batch_size}; '
        f'instances by {ev.instance_method}; best of {args.repeats}')

  start = time.perf_counter()
  model = models.create_model(config, rngs=nnx.Rngs(0))
  graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  predict_windows = predictor.make_predict_windows(graphdef, params, batch_stats)
  created = time.perf_counter() - start
  start = time.perf_counter()
  jax.block_until_ready(predict_windows(np.zeros((ev.batch_size, ev.window, ev.window, 3), np.uint8)))
  print(f'model creation {created:.1f} s, forward compilation {time.perf_counter() - start:.1f} s')

  net, _ = timed_runs(image, predict_windows, config, args.repeats)
  post, result = timed_runs(image, blob_network, config, args.repeats)
  post_s = post['stitch'] + post['nms'] + post['instances']
  rows = [('network (jitted forward)', net['network']),
          ('  whole image, real network', net['total']),
          ('post: stitch + decode', post['stitch']),
          ('post: NMS', post['nms']),
          ('post: instances', post['instances']),
          ('post-processing total', post_s)]
  print(f"stand-in: {len(result['boxes'])} boxes after NMS, "
        f"{len(result['instance_scores'])} instances")
  print(f"{'stage':<30} {'seconds':>8} {'MP/s':>8}")
  for name, seconds in rows:
    print(f'{name:<30} {seconds:8.3f} {megapixels / seconds:8.3f}')
  print(f"real-network run CPU time {net['total_cpu']:.2f} s; "
        f"post-processing run CPU time {post['total_cpu']:.2f} s")


if __name__ == '__main__':
  main()
