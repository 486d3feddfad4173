"""Benchmark (not a test): old (window 256 / stride 128) against new (throughput) inference settings.

Prints, side by side for the two settings of config.eval:
  network MP/s      the real network (a trained run, `--workdir`) on a `--crop` x `--crop` region
                    of the slide, inside its jitted forward (compiled first, not timed);
  post MP/s         stitching + decoding + NMS + instances on the same crop, with a NumPy stand-in
                    network that finds the dark H&E blobs (an image's worth of nuclei);
  slide             the whole `--size` x `--size` pyramidal RGB TIFF predicted by `predict`
                    (tile by tile, new settings; old = whole-image prediction, which cannot hold a
                    slide: it is run only when the slide is at most 4096 pixels a side), in a child
                    process whose peak resident memory (its own ru_maxrss) is reported; its GeoJSON is then
                    parsed and checked (closed counter-clockwise rings, unique ids, no two nuclei
                    within 2 pixels of each other, i.e. none produced twice at a tile border).
  --accuracy N      validation AJI of the run on N images of its validation fold, both settings.

The slide is built from the 50 real TNBC tiles (512 x 512, /work/shared/data), mirrored or not so
that neighbours differ, written tile by tile (never held whole in memory), with levels 1/2/4/8.
The slide pass uses the stand-in network by default (`--slide_network real` for the real one:
minutes per 1000 x 1000 pixels on a CPU).

  python experiments/benchmarks/inference.py --workdir /work/main/runs/tnbc_cpu_plus_fold0 \\
      --size 16384 --crop 2048 --accuracy 10
"""

import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import tifffile
from scipy import ndimage
from scipy import spatial

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

from donuseg_jax.data import images  # noqa: E402
from donuseg_jax.data import paths  # noqa: E402

TNBC = 'tnbc/TNBC_NucleiSegmentation'
TILE = 512


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
    for found in ndimage.find_objects(blobs):
      rows, cols = found
      y, x = (rows.start + rows.stop) / 2, (cols.start + cols.stop) / 2
      i, j = min(int(y // 8), window // 8 - 1), min(int(x // 8), window // 8 - 1)
      cx, cy = j * 8 + 4, i * 8 + 4
      levels[1]['logits'][b, i, j] = 4.0
      levels[1]['ltrb'][b, i, j] = np.maximum(
          [cx - cols.start, cy - rows.start, cols.stop - cx, rows.stop - cy], 1.0)
  return {'segmentation': (150.0 - gray) / 10.0, 'detection': tuple(levels)}


def tnbc_tiles() -> list[np.ndarray]:
  root = paths.data_root() / TNBC
  return [images.read_image(p) for p in sorted(root.glob('Slide_*/*.png'))]


def mosaic_tile(sources, i: int, j: int) -> np.ndarray:
  """The (i, j) 512 x 512 tile of the mosaic: a TNBC tile, flipped by position."""
  tile = sources[(i * 7 + j * 3) % len(sources)]
  if (i + j) % 2:
    tile = tile[:, ::-1]
  if i % 3 == 1:
    tile = tile[::-1]
  return tile


def build_slide(path: pathlib.Path, size: int) -> None:
  """A size x size pyramidal RGB TIFF (levels 1, 2, 4, 8; JPEG-free, zlib), tile by tile."""
  sources = tnbc_tiles()
  count = -(-size // TILE)

  def level_tiles(step):
    side = -(-size // step)
    for r in range(0, side, TILE):
      for c in range(0, side, TILE):
        block = np.zeros((TILE, TILE, 3), np.uint8)
        # Level pixels [r, r + 512) x [c, c + 512) = level-0 pixels at step; from 512 / step tiles.
        for rr in range(r, min(r + TILE, side), TILE // step):
          for cc in range(c, min(c + TILE, side), TILE // step):
            i, j = rr * step // TILE, cc * step // TILE
            if i < count and j < count:
              part = mosaic_tile(sources, i, j)[::step, ::step]
              h, w = min(part.shape[0], side - rr), min(part.shape[1], side - cc)
              block[rr - r:rr - r + h, cc - c:cc - c + w] = part[:h, :w]
        yield block

  steps = [1, 2, 4, 8]
  with tifffile.TiffWriter(path, bigtiff=True) as tiff:
    for n, step in enumerate(steps):
      side = -(-size // step)
      options = dict(subifds=len(steps) - 1) if n == 0 else dict(subfiletype=1)
      tiff.write(level_tiles(step), shape=(side, side, 3), dtype=np.uint8, tile=(TILE, TILE),
                 photometric='rgb', compression='zlib', **options)


def eval_config(config, setting: str):
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.eval.windows = 'fixed' if setting == 'old' else 'throughput'
    for key, value in (('max_window', 1024), ('margin', 32), ('blend', 'ramp')):
      if key not in config.eval:
        config.eval[key] = value
  return config


def load_run(workdir):
  from donuseg_jax import trained_run  # noqa: PLC0415

  return trained_run.load_trained_model(workdir, which='best')


def timed_predict(image, predict_windows, config):
  from donuseg_jax.inference import predictor  # noqa: PLC0415

  timer = {}
  start = time.perf_counter()
  result = predictor.predict_image(image, predict_windows=predict_windows, config=config,
                                   timer=timer)
  timer['total'] = time.perf_counter() - start
  return timer, result


def child_slide(args) -> None:
  """In a child process: predict the slide, print timings as JSON (the parent reads ru_maxrss)."""
  from donuseg_jax import predict  # noqa: PLC0415
  from donuseg_jax.inference import predictor  # noqa: PLC0415

  if args.slide_network == 'real':
    config, graphdef, params, batch_stats = load_run(args.workdir)
    network = predictor.make_predict_windows(graphdef, params, batch_stats)
  else:  # no model: the peak memory is that of the prediction, not of a loaded network
    import ml_collections  # noqa: PLC0415
    config = ml_collections.ConfigDict(
        json.loads((pathlib.Path(args.workdir) / 'config.json').read_text()))
    network = blob_network
  config = eval_config(config, args.setting)
  timer = {}
  start = time.perf_counter()
  if args.setting == 'new':
    summary = predict.predict_paths([args.slide], args.output, predict_windows=network,
                                    config=config, progress=False, overwrite=True, timer=timer)
    failed = summary['failed']
  else:  # the whole image in memory, as predict did before tiling
    from donuseg_jax.data import slides  # noqa: PLC0415
    with slides.open_slide(args.slide) as slide:
      image = slide.read(0, 0, *slide.shape)
    predictor.predict_image(image, predict_windows=network, config=config, timer=timer)
    failed = []
  timer['total'] = time.perf_counter() - start
  peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # Linux: kilobytes
  print(json.dumps({'timer': timer, 'failed': failed, 'peak_gb': peak_gb}))


def run_child(args, setting: str, output: pathlib.Path) -> dict:
  command = [sys.executable, __file__, '--child', '--setting', setting, '--slide', str(args.slide),
             '--output', str(output), '--workdir', args.workdir,
             '--slide_network', args.slide_network]
  done = subprocess.run(command, capture_output=True, text=True, check=False)
  if done.returncode:
    raise SystemExit(f'slide child failed:\n{done.stderr[-3000:]}')
  return json.loads(done.stdout.strip().splitlines()[-1])


def check_geojson(path: pathlib.Path) -> str:
  """Parses the slide's GeoJSON and checks rings, ids and duplicates; a one-line verdict."""
  collection = json.loads(path.read_text())
  features = collection['features']
  ids = {f['id'] for f in features}
  centres, bad = [], 0
  for feature in features:
    ring = np.asarray(feature['geometry']['coordinates'][0])
    x, y = ring[:, 0], ring[:, 1]
    area = 0.5 * np.sum(x[:-1] * y[1:] - x[1:] * y[:-1])
    bad += not (len(ring) >= 4 and (ring[0] == ring[-1]).all() and area > 0)
    centres.append(ring[:-1].mean(0))
  pairs = spatial.cKDTree(np.asarray(centres)).query_pairs(2.0) if centres else set()
  return (f'{len(features)} polygons, {len(ids)} unique ids, {bad} not closed / counter-clockwise,'
          f' {len(pairs)} pairs of nuclei within 2 px (duplicates)')


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', default='/work/main/runs/tnbc_cpu_plus_fold0')
  parser.add_argument('--size', type=int, default=16384, help='slide side (pixels)')
  parser.add_argument('--crop', type=int, default=1024, help='crop side for the MP/s figures')
  parser.add_argument('--slide_network', choices=['standin', 'real'], default='standin')
  parser.add_argument('--accuracy', type=int, default=0, help='validation images for AJI (0: no)')
  parser.add_argument('--keep', default='', help='folder to keep the slide and outputs in')
  parser.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
  parser.add_argument('--setting', default='new', help=argparse.SUPPRESS)
  parser.add_argument('--slide', default='', help=argparse.SUPPRESS)
  parser.add_argument('--output', default='', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    child_slide(args)
    return

  import jax  # noqa: PLC0415
  from donuseg_jax.inference import predictor  # noqa: PLC0415
  from donuseg_jax.inference import windows  # noqa: PLC0415

  folder = pathlib.Path(args.keep or tempfile.mkdtemp(prefix='donuseg_bench_'))
  folder.mkdir(parents=True, exist_ok=True)
  args.slide = folder / f'tnbc_mosaic_{args.size}.tif'
  start = time.perf_counter()
  if not args.slide.exists():
    build_slide(args.slide, args.size)
  print(f'slide: {args.slide} {args.size}x{args.size} RGB, built in '
        f'{time.perf_counter() - start:.0f} s; {os.cpu_count()} CPUs, load average '
        f'{os.getloadavg()[0]:.1f}; jax {jax.__version__} on {jax.devices()[0].platform}')

  config, graphdef, params, batch_stats = load_run(args.workdir)
  print(f'model: {args.workdir} (encoder {config.model.encoder})')
  from donuseg_jax.data import slides  # noqa: PLC0415
  with slides.open_slide(args.slide) as slide:
    crop = slide.read(0, 0, min(args.crop, args.size), min(args.crop, args.size))
  megapixels = crop.shape[0] * crop.shape[1] / 1e6
  network = predictor.make_predict_windows(graphdef, params, batch_stats)
  rows = {}
  for setting in ('old', 'new'):
    cfg = eval_config(config, setting)
    chosen = windows.window_settings(cfg.eval, *crop.shape[:2])
    batch = network.device_count * -(-chosen.batch_size // network.device_count)
    jax.block_until_ready(network(np.zeros((batch, chosen.window, chosen.window, 3), np.uint8)))
    net, _ = timed_predict(crop, network, cfg)
    post, result = timed_predict(crop, blob_network, cfg)
    post_s = post['stitch'] + post['nms'] + post['instances']
    rows[setting] = {'windows': f'{chosen.window}/{chosen.stride} {chosen.blend}',
                     'network MP/s': megapixels / net['network'],
                     'post MP/s': megapixels / post_s,
                     'post: stitch / nms / instances s': '{stitch:.2f}/{nms:.2f}/{instances:.2f}'
                                                         .format(**post),
                     'stand-in nuclei': len(result['instance_scores'])}
  for setting in ('old', 'new'):
    if setting == 'old' and args.size > 4096:
      rows[setting]['slide peak RSS GB'] = 'n/a (whole image)'
      continue
    result = run_child(args, setting, folder / f'out_{setting}')
    rows[setting]['slide peak RSS GB'] = result['peak_gb']
    rows[setting]['slide s'] = result['timer']['total']
    if setting == 'new':
      rows[setting]['slide post MP/s'] = args.size ** 2 / 1e6 / sum(
          result['timer'].get(k, 0.0) for k in ('stitch', 'nms', 'instances'))
  if args.accuracy:
    from donuseg_jax import evaluate  # noqa: PLC0415
    from donuseg_jax.data import folds  # noqa: PLC0415
    examples = folds.load_fold_examples(config)['val'][:args.accuracy]
    for setting in ('old', 'new'):
      cfg = eval_config(config, setting)
      result = evaluate.evaluate_examples(examples, predict_windows=network, config=cfg,
                                          progress=False)
      rows[setting][f'val AJI ({len(examples)} images)'] = result['mean']['aji']
  print(f'crop {crop.shape[1]}x{crop.shape[0]} for the MP/s figures (wall clock)')
  keys = list(dict.fromkeys(k for row in rows.values() for k in row))
  print(f"{'':34} {'old':>22} {'new':>22}")
  for key in keys:
    cells = []
    for setting in ('old', 'new'):
      value = rows[setting].get(key, '')
      cells.append(f'{value:22.3f}' if isinstance(value, float) else f'{value!s:>22}')
    print(f'{key:34} ' + ' '.join(cells))
  print(f"slide GeoJSON: {check_geojson(folder / 'out_new' / f'{args.slide.stem}.geojson')}")


if __name__ == '__main__':
  main()
