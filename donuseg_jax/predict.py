"""Nuclei instances for your own images, with a trained run: tiles, whole-slide images, folders.

  python -m donuseg_jax.predict --workdir runs/tnbc_fold0 --input slide1.png tiles/ --output out/
  python -m donuseg_jax.predict --workdir runs/tnbc_fold0 --input scan.svs.tif --level 1 \\
      --region 20000,12000,8192,8192 --output out/

Inputs: PNG, TIFF or JPEG files, or folders of them (not recursive), of any size. Gray, RGBA and
16-bit images are converted to 8-bit RGB (data.images.read_image); unreadable or empty files,
images with a side under 2 pixels, and unsupported channel counts or pixel types are errors.
Pyramidal or tiled TIFFs (OME-TIFF, SVS, NDPI and others tifffile reads as a pyramid) and TIFFs
over 16 megapixels are read region by region (data.slides), never a whole level at once:
  --level N        pyramid level N (0 = full resolution; the default)
  --mpp X          the coarsest level with at most 1.1 * X microns per pixel (where recorded)
  --region x,y,w,h only this rectangle, in level-0 pixels (as QuPath shows them)
Every image is predicted tile by tile (--tile, default 2752 pixels, with a --halo of 64 around
each; inference.tiles): memory is set by the tile, and a nucleus that crosses a tile border is
produced once, by the tile holding its centroid.

Per image `<stem>` the output folder gets:
  <stem>.geojson        FeatureCollection, one Polygon Feature per nucleus (QuPath: File > Import
                        objects): objectType 'detection', classification 'Nucleus', measurements
                        score, area and instance_id; a unique id (UUID) per feature. Coordinates in
                        level-0 pixels of the input with QuPath's convention (pixel (i, j) covers x
                        in [j, j + 1), y in [i, i + 1)); outer ring only, counter-clockwise in
                        (x, y), closed, simple (never self-intersecting): the exact pixel outline
                        through pixel-edge midpoints, collinear vertices dropped.
  <stem>.csv            id, centroid_x, centroid_y, area, bbox_x0, bbox_y0, bbox_x1, bbox_y1, score
                        (level-0 pixel indices; bbox x1, y1 exclusive, as in slicing; area in
                        level-0 pixels)
  <stem>.instances.tif  int32 label map of the predicted pixels (0 background, ids as in the CSV:
                        in tile order, by descending score within a tile; one tile = by score).
                        Written for images up to 16 megapixels; for larger ones only with
                        --label_map yes, then as a tiled pyramidal TIFF. --label_map no: never.
  <stem>.overlay.png    up to 16 megapixels: the image with each nucleus outline in green;
  <stem>.preview.png    larger: the same at most 2048 pixels a side. --overlay no: neither.
  <stem>.done.json      written last: the input's size and time stamp, the settings, the files.
GeoJSON and CSV are written as the nuclei are found; every file goes to a temporary name and is
renamed when complete, so a killed job leaves no truncated output. A rerun skips an image whose
done.json matches its input and settings and whose files exist (--overwrite redoes it), so a
killed batch over many slides resumes.

The output folder is checked for writing before any work. A bad file does not stop the others:
failures are listed at the end and the exit status is 1. Bad arguments, an unusable output folder,
no usable input or a work dir that is not a trained run: one-line error, exit status 2.
"""

import argparse
import contextlib
import json
import pathlib
import sys
import tempfile

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from donuseg_jax import atomic_io
from donuseg_jax import cli
from donuseg_jax.data import images as images_lib
from donuseg_jax.data import slides
from donuseg_jax.inference import outputs
from donuseg_jax.inference import predictor
from donuseg_jax.inference import tiles

IMAGE_SUFFIXES = ('.png', '.tif', '.tiff', '.jpg', '.jpeg')
OUTPUT_SUFFIXES = ('.instances.tif', '.overlay.png', '.preview.png')  # never taken as inputs
MASK_SUFFIXES = ('.mask.tif', '.mask.tiff', '.mask.png')  # a folder dataset's label maps, not images
OUTLINE_COLOR = outputs.OUTLINE_COLOR
SMALL_IMAGE_PIXELS = 1 << 24  # 16 MP (4096 x 4096): label map and full overlay by default
# A tile's region (core + 2 halos) of 2880 = 1024 + 2 * 960 pixels is covered exactly by 3 x 3
# throughput windows (1024, margin 32): 1.25 network pixels per image pixel, halos included.
TILE = 2752  # core side of the tiles (pixels)
HALO = 64  # context and room for border-crossing nuclei (up to ~128 pixels across) around a core
DONE_SUFFIX = '.done.json'


def check_output_writable(output) -> pathlib.Path:
  """Creates the output folder if needed and proves it writable; raises OSError if it is not."""
  output = pathlib.Path(output)
  try:
    output.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=output, prefix='.write_test_'):
      pass
  except OSError as error:
    raise OSError(f'output folder {output} is not writable: {error.strerror or error}') from error
  return output


def collect_inputs(paths) -> tuple[list[pathlib.Path], list[tuple[str, str]]]:
  """Image files from files and folders; and (path, problem) for inputs that cannot be used."""
  files, failed, stems = [], [], {}
  for raw in paths:
    path = pathlib.Path(raw)
    if path.is_dir():
      found = sorted(p for p in path.iterdir() if p.is_file()
                     and p.suffix.lower() in IMAGE_SUFFIXES
                     and not p.name.lower().endswith(OUTPUT_SUFFIXES + MASK_SUFFIXES))
      if not found:
        failed.append((str(path), f'folder holds no {"/".join(IMAGE_SUFFIXES)} images'))
      candidates = found
    elif path.is_file():
      candidates = [path]
    else:
      failed.append((str(path), 'no such file or folder'))
      continue
    for candidate in candidates:
      if candidate.stem in stems:  # its outputs would overwrite those of the first one
        if stems[candidate.stem] != candidate.resolve():
          failed.append((str(candidate), f'same name as {stems[candidate.stem]}; rename one'))
        continue
      stems[candidate.stem] = candidate.resolve()
      files.append(candidate)
  return files, failed


def parse_region(text: str) -> tuple[int, int, int, int]:
  """'x,y,w,h' (level-0 pixels) -> ints; ValueError with the problem."""
  parts = text.split(',')
  try:
    x, y, w, h = (int(p) for p in parts)
  except ValueError:
    raise ValueError(f'--region must be x,y,w,h (four integers), got {text!r}') from None
  if x < 0 or y < 0 or w < 1 or h < 1:
    raise ValueError(f'--region needs x, y >= 0 and w, h >= 1, got {text!r}')
  return x, y, w, h


class RegionSource:
  """The rectangle [row, row + rows) x [col, col + cols) of another source."""

  def __init__(self, source, row: int, col: int, rows: int, cols: int):
    self.source, self.row, self.col = source, row, col
    self.shape = (rows, cols)

  def read(self, row, col, rows, cols):
    return self.source.read(self.row + row, self.col + col, rows, cols)


def open_source(path: pathlib.Path, *, level=None, mpp=None, region=None, stack=None):
  """(source with .shape and .read, outputs.Placement) for one input file.

  Pyramidal, tiled or large TIFFs (or any TIFF with a level or pixel size asked for) are opened by
  region (data.slides; closed by `stack`, an ExitStack); others are decoded whole.
  """
  wants_level = level is not None or mpp is not None
  if slides.is_slide(path, max_pixels=SMALL_IMAGE_PIXELS) or (
      wants_level and path.suffix.lower() in images_lib.TIFF_SUFFIXES):
    slide = stack.enter_context(slides.open_slide(path, level=level, mpp=mpp))
    source, (dy, dx) = slide, slide.downsample
  elif mpp is not None:
    raise images_lib.DataError(f'{path}: not a TIFF, so it records no pixel size; drop --mpp')
  elif level not in (None, 0):
    raise images_lib.DataError(f'{path}: not a pyramidal TIFF; --level {level} does not apply')
  else:
    source, dy, dx = tiles.ArraySource(images_lib.read_image(path)), 1.0, 1.0
  if min(source.shape) < predictor.MIN_IMAGE_SIDE:
    raise images_lib.DataError(f'{path}: image of {source.shape[0]}x{source.shape[1]} pixels is '
                               f'too small (each side needs at least {predictor.MIN_IMAGE_SIDE})')
  if region is None:
    return source, outputs.Placement(0, 0, dy, dx)
  x, y, w, h = region
  full_h, full_w = round(source.shape[0] * dy), round(source.shape[1] * dx)
  col0, row0 = int(x // dx), int(y // dy)  # level pixels holding the region's corners
  col1 = min(source.shape[1], int(-(-(x + w) // dx)))
  row1 = min(source.shape[0], int(-(-(y + h) // dy)))
  if col0 >= source.shape[1] or row0 >= source.shape[0] or col1 - col0 < 2 or row1 - row0 < 2:
    raise images_lib.DataError(f'{path}: --region {x},{y},{w},{h} lies outside the '
                               f'{full_w}x{full_h} image (level-0 pixels)')
  return (RegionSource(source, row0, col0, row1 - row0, col1 - col0),
          outputs.Placement(row0, col0, dy, dx))


def input_signature(path: pathlib.Path, settings: dict) -> dict:
  stat = path.stat()
  return {'input': str(path.resolve()), 'size': stat.st_size, 'mtime_ns': stat.st_mtime_ns,
          'settings': settings}


def is_complete(output: pathlib.Path, stem: str, signature: dict) -> bool:
  """Whether `stem`'s outputs were all written for this very input and these settings."""
  try:
    done = json.loads((output / f'{stem}{DONE_SUFFIX}').read_text())
  except (OSError, ValueError):
    return False
  return ({k: done.get(k) for k in signature} == signature
          and all((output / name).is_file() for name in done.get('files', [])))


def predict_file(path: pathlib.Path, output: pathlib.Path, *, predict_windows, config,
                 level=None, mpp=None, region=None, tile: int = TILE, halo: int = HALO,
                 label_map: str = 'auto', overlay: str = 'auto', progress: bool = False,
                 timer: dict | None = None) -> dict:
  """Predicts one file into `output` (module docstring). Returns dict(instances, cut, shape,
  tiles, files)."""
  with contextlib.ExitStack() as stack:
    source, placement = open_source(path, level=level, mpp=mpp, region=region, stack=stack)
    height, width = source.shape
    small = height * width <= SMALL_IMAGE_PIXELS
    writer = outputs.OutputWriter(
        output, path.stem, shape=source.shape, placement=placement,
        labels=label_map == 'yes' or (label_map == 'auto' and small),
        overlay=overlay == 'yes' or (overlay == 'auto'), small=small)
    count = len(tiles.tile_grid(height, width, tile=tile, halo=halo))
    with writer:
      results = tiles.predict_tiles(source, predict_windows=predict_windows, config=config,
                                    tile=tile, halo=halo, timer=timer)
      for result in tqdm(results, total=count, desc=path.name, unit='tile', leave=False,
                         disable=not progress or count == 1, dynamic_ncols=True):
        r0, r1, c0, c1 = result.tile.core
        g0, _, h0, _ = result.tile.region
        writer.add_image(result.image[r0 - g0:r1 - g0, c0 - h0:c1 - h0], r0, c0)
        writer.add(result.instances)
        writer.cut += result.cut
  return {'instances': writer.count, 'cut': writer.cut, 'shape': (height, width), 'tiles': count,
          'files': [f.name for f in writer.files]}


def write_outputs(image: np.ndarray, result: dict, output, stem: str) -> None:
  """The files of one in-memory image from `predictor.predict_image`'s result (training reports)."""
  labels = result['instances']
  objects = ndimage.find_objects(labels, max_label=len(result['instance_scores']))
  found = [tiles.Instance(s[0].start, s[1].start, labels[s] == k + 1,
                          float(result['instance_scores'][k]))
           for k, s in enumerate(objects) if s is not None]
  with outputs.OutputWriter(output, stem, shape=labels.shape) as writer:
    writer.add_image(image, 0, 0)
    writer.add(found)


def predict_paths(paths, output, *, predict_windows, config, progress: bool = True,
                  overwrite: bool = False, run: str = '', **options) -> dict:
  """Predicts every image of `paths` into `output` (`options`: predict_file's keywords; `run`
  names the model, so that outputs of another model are not taken as complete). Returns
  dict(written=[stems], skipped=[stems already complete], failed=[(path, message)], cut=int);
  a failing file is recorded and the others go on."""
  output = check_output_writable(output)
  files, failed = collect_inputs(paths)
  written, skipped, cut = [], [], 0
  settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in sorted(options.items())
              if k != 'timer'}
  settings['run'] = run
  settings['eval'] = config.eval.to_dict()  # windows and instance settings change the results
  for path in tqdm(files, desc='predict', unit='image', disable=not progress, dynamic_ncols=True):
    try:
      signature = input_signature(path, settings)
      done = output / f'{path.stem}{DONE_SUFFIX}'
      if not overwrite and is_complete(output, path.stem, signature):
        skipped.append(path.stem)
        continue
      done.unlink(missing_ok=True)  # from here until the new one, the image counts as not done
      summary = predict_file(path, output, predict_windows=predict_windows, config=config,
                             progress=progress, **options)
      atomic_io.write_json(done, {**signature, 'files': summary['files'],
                                  'instances': summary['instances'], 'cut': summary['cut']})
      cut += summary['cut']
    except Exception as error:  # noqa: BLE001 (one bad file must not stop the others)
      message = str(error)
      if not isinstance(error, (ValueError, OSError)):  # expected: DataError (a ValueError), I/O
        message = f'{type(error).__name__}: {message}'
      failed.append((str(path), message))
      continue
    written.append(path.stem)
  return {'written': written, 'skipped': skipped, 'failed': failed, 'cut': cut}


def parse_args(argv):
  parser = argparse.ArgumentParser(prog='python -m donuseg_jax.predict', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--workdir', required=True, help='training work dir of the model')
  parser.add_argument('--input', required=True, nargs='+', help='image files and/or folders')
  parser.add_argument('--output', required=True, help='output folder (created if needed)')
  parser.add_argument('--which', default='best', choices=['best', 'latest'], help='checkpoint')
  parser.add_argument('--instance_method', choices=['boxes', 'cells', 'watershed'], default=None,
                      help="instance assembly (default: the run's config.eval.instance_method)")
  parser.add_argument('--batch_size', type=positive_int, default=None,
                      help='windows per device call')
  parser.add_argument('--level', type=non_negative_int, default=None, help='pyramid level')
  parser.add_argument('--mpp', type=positive_float, default=None,
                      help='target microns per pixel (picks the pyramid level)')
  parser.add_argument('--region', type=region_argument, default=None,
                      help='x,y,w,h in level-0 pixels: predict only this rectangle')
  parser.add_argument('--tile', type=positive_int, default=TILE, help='tile core side (pixels)')
  parser.add_argument('--halo', type=non_negative_int, default=HALO,
                      help='context around each tile (pixels)')
  parser.add_argument('--label_map', choices=['auto', 'yes', 'no'], default='auto',
                      help='write <stem>.instances.tif (auto: for images up to 16 MP)')
  parser.add_argument('--overlay', choices=['auto', 'no'], default='auto',
                      help='write the overlay (small images) or preview (large ones)')
  parser.add_argument('--overwrite', action='store_true',
                      help='predict again images whose outputs are complete')
  args = parser.parse_args(argv)
  if args.level is not None and args.mpp is not None:
    parser.error('give --level or --mpp, not both')
  return args


def positive_int(text: str) -> int:
  value = int(text)
  if value < 1:
    raise argparse.ArgumentTypeError(f'must be a positive integer, got {text}')
  return value


def non_negative_int(text: str) -> int:
  value = int(text)
  if value < 0:
    raise argparse.ArgumentTypeError(f'must be 0 or more, got {text}')
  return value


def positive_float(text: str) -> float:
  value = float(text)
  if not value > 0:
    raise argparse.ArgumentTypeError(f'must be a positive number, got {text}')
  return value


def region_argument(text: str):
  try:
    return parse_region(text)
  except ValueError as error:
    raise argparse.ArgumentTypeError(str(error).removeprefix('--region ')) from None


def main(argv=None) -> int:
  try:
    args = parse_args(sys.argv[1:] if argv is None else argv)
  except SystemExit as exit_:  # argparse printed its one-line error
    return int(exit_.code or 0)
  try:  # problems with the output or the inputs are reported before the model is loaded
    output = check_output_writable(args.output)
  except OSError as error:
    print(f'error: {error}', file=sys.stderr)
    return 2
  files, problems = collect_inputs(args.input)
  if not files:
    print('error: no usable input images', file=sys.stderr)
    for path, message in problems:
      print(f'  {path}: {message}', file=sys.stderr)
    return 2
  if not (pathlib.Path(args.workdir) / 'config.json').is_file():
    print(f'error: {args.workdir} is not a training work dir (no config.json)', file=sys.stderr)
    return 2
  from donuseg_jax import trained_run  # noqa: PLC0415 (imports JAX and the model)
  try:
    config, graphdef, params, batch_stats = trained_run.load_trained_model(args.workdir, which=args.which)
  except Exception as error:  # a damaged or foreign run: one line, not a traceback
    if not cli.is_expected(error):
      raise
    print(f'error: cannot load the trained run in {args.workdir}: {error}', file=sys.stderr)
    return 2
  if args.instance_method:
    config.eval.instance_method = args.instance_method
  if args.batch_size:
    config.eval.batch_size = args.batch_size
  summary = predict_paths(
      args.input, output,
      predict_windows=predictor.make_predict_windows(graphdef, params, batch_stats,
                                                     flips=config.eval.flip_tta),
      config=config, overwrite=args.overwrite, run=f'{pathlib.Path(args.workdir).resolve()}:{args.which}',
      level=args.level, mpp=args.mpp,
      region=args.region, tile=args.tile, halo=args.halo, label_map=args.label_map,
      overlay=args.overlay)
  print(f"{len(summary['written'])} image(s) written to {output}"
        + (f", {len(summary['skipped'])} already complete (--overwrite to redo)"
           if summary['skipped'] else ''))
  if summary['cut']:
    print(f"warning: {summary['cut']} nucleus(es) larger than the halo were cut at tile borders; "
          f'use a larger --halo', file=sys.stderr)
  if summary['failed']:
    print(f"{len(summary['failed'])} input(s) failed:", file=sys.stderr)
    for path, message in summary['failed']:
      print(f'  {message}' if message.startswith(path) else f'  {path}: {message}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(cli.run(main))  # an unexpected error: its traceback and a request to report it
