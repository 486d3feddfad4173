"""Nuclei instances for your own images, with a trained run.

  python -m donuseg_jax.predict --workdir runs/tnbc_fold0 --input slide1.png tiles/ --output out/

Inputs: PNG, TIFF or JPEG files, or folders of them (not recursive), of any size. Gray, RGBA and
16-bit images are converted to 8-bit RGB (data.images.read_image); unreadable or empty files,
images with a side under 2 pixels, and unsupported channel counts or pixel types are errors. Per
image `<stem>` the output folder gets:
  <stem>.instances.tif  int32 label map (0 background, 1..N by descending detection score)
  <stem>.overlay.png    the image with each nucleus outline drawn in green
  <stem>.geojson        FeatureCollection, one Polygon Feature per nucleus (QuPath: File > Import
                        objects): objectType 'detection', classification 'Nucleus', measurements
                        score and area. Coordinates in pixels with QuPath's convention (pixel (i, j)
                        covers x in [j, j + 1), y in [i, i + 1)); outer ring only, counter-clockwise
                        in (x, y), closed, simple (never self-intersecting): the exact pixel
                        outline through pixel-edge midpoints, collinear vertices dropped.
  <stem>.csv            id, centroid_x, centroid_y, area, bbox_x0, bbox_y0, bbox_x1, bbox_y1, score
                        (pixel indices; bbox x1, y1 exclusive, as in slicing)
The output folder is checked for writing before any work. A bad file does not stop the others:
failures are listed at the end and the exit status is 1.
"""

import argparse
import csv
import json
import pathlib
import sys
import tempfile
import uuid

import numpy as np
import skimage.io
import tifffile
from scipy import ndimage
from skimage import measure
from skimage import segmentation
from tqdm import tqdm

from donuseg_jax.data import images as images_lib
from donuseg_jax.inference import predictor

IMAGE_SUFFIXES = ('.png', '.tif', '.tiff', '.jpg', '.jpeg')
OUTPUT_SUFFIXES = ('.instances.tif', '.overlay.png')  # never taken as inputs when scanning folders
MASK_SUFFIXES = ('.mask.tif', '.mask.tiff', '.mask.png')  # a folder dataset's label maps, not images
OUTLINE_COLOR = (0, 255, 0)


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


def instance_table(instances: np.ndarray, scores: np.ndarray) -> list[dict]:
  """One row per instance id present: centroid (x, y), area, bbox [x0, x1) x [y0, y1), score."""
  count = len(scores)
  flat = instances.ravel()
  area = np.bincount(flat, minlength=count + 1)  # (count + 1,)
  rows, cols = np.indices(instances.shape)
  sum_y = np.bincount(flat, weights=rows.ravel(), minlength=count + 1)
  sum_x = np.bincount(flat, weights=cols.ravel(), minlength=count + 1)
  table = []
  for index, found in enumerate(ndimage.find_objects(instances, max_label=count)):
    label = index + 1
    if found is None:
      continue
    table.append({'id': label, 'centroid_x': sum_x[label] / area[label],
                  'centroid_y': sum_y[label] / area[label], 'area': int(area[label]),
                  'bbox_x0': found[1].start, 'bbox_y0': found[0].start,
                  'bbox_x1': found[1].stop, 'bbox_y1': found[0].stop, 'score': float(scores[index])})
  return table


def ring_area(ring: np.ndarray) -> float:
  """Signed shoelace area of a closed ring (N, 2) (positive: counter-clockwise in x, y)."""
  x, y = ring[:, 0], ring[:, 1]
  return 0.5 * float(np.sum(x[:-1] * y[1:] - x[1:] * y[:-1]))


def drop_collinear(ring: np.ndarray) -> np.ndarray:
  """A closed ring without the vertices that lie on the straight line through their neighbours.

  Exact for marching-squares outlines (coordinates are multiples of 0.5, so the cross products are
  exact): the polygon is the same point set, with far fewer vertices on straight and 45-degree runs.
  """
  points = ring[:-1]  # (N, 2) distinct vertices
  before = points - np.roll(points, 1, axis=0)
  after = np.roll(points, -1, axis=0) - points
  turn = before[:, 0] * after[:, 1] - before[:, 1] * after[:, 0]
  kept = points[turn != 0]
  return np.concatenate([kept, kept[:1]])


def instance_polygon(mask: np.ndarray, offset: tuple[int, int]) -> np.ndarray | None:
  """Outer ring (N, 2) in (x, y) image pixels of one instance crop, or None if it has no pixels.

  `offset` = (row, col) of the crop in the image. Marching squares on the zero-padded crop (at
  level 0.5, diagonal pixels connected) gives a simple closed ring through pixel-edge midpoints;
  collinear vertices are dropped (exactly: no simplification that could make it self-intersect).
  """
  if not mask.any():
    return None
  contours = measure.find_contours(np.pad(mask, 1).astype(np.float32), 0.5,
                                   fully_connected='high')
  rings = [np.asarray(c[:, ::-1], np.float64) for c in contours]  # (row, col) -> (x, y)
  rings = [r for r in rings if len(r) >= 4 and np.array_equal(r[0], r[-1])]
  if not rings:
    return None
  ring = max(rings, key=lambda r: abs(ring_area(r)))  # the outer boundary; holes are dropped
  # -1 undoes the padding; +0.5 moves from pixel centres to QuPath's pixel-corner coordinates.
  ring = drop_collinear(ring + np.array([offset[1] - 1 + 0.5, offset[0] - 1 + 0.5]))
  return ring if ring_area(ring) > 0 else ring[::-1]  # counter-clockwise in (x, y)


def feature_collection(instances: np.ndarray, table: list[dict], *, name: str) -> dict:
  """GeoJSON (QuPath detections) of the instances listed in `table`."""
  features = []
  objects = ndimage.find_objects(instances)
  for row in table:
    found = objects[row['id'] - 1]
    ring = instance_polygon(instances[found] == row['id'], (found[0].start, found[1].start))
    if ring is None:
      continue
    features.append({
        'type': 'Feature',
        'id': str(uuid.uuid5(uuid.NAMESPACE_URL, f"donuseg/{name}/{row['id']}")),
        'geometry': {'type': 'Polygon', 'coordinates': [np.round(ring, 3).tolist()]},
        'properties': {'objectType': 'detection', 'isLocked': False,
                       'classification': {'name': 'Nucleus', 'color': [0, 200, 0]},
                       'measurements': {'score': row['score'], 'area': row['area'],
                                        'instance_id': row['id']}},
    })
  return {'type': 'FeatureCollection', 'features': features}


def write_outputs(image: np.ndarray, result: dict, output: pathlib.Path, stem: str) -> None:
  instances = result['instances'].astype(np.int32)
  tifffile.imwrite(output / f'{stem}.instances.tif', instances, compression='zlib')
  overlay = image.copy()
  overlay[segmentation.find_boundaries(instances, mode='inner')] = OUTLINE_COLOR
  skimage.io.imsave(output / f'{stem}.overlay.png', overlay, check_contrast=False)
  table = instance_table(instances, result['instance_scores'])
  collection = feature_collection(instances, table, name=stem)
  (output / f'{stem}.geojson').write_text(json.dumps(collection) + '\n')
  columns = ['id', 'centroid_x', 'centroid_y', 'area', 'bbox_x0', 'bbox_y0', 'bbox_x1', 'bbox_y1',
             'score']
  with open(output / f'{stem}.csv', 'w', newline='') as file:
    writer = csv.DictWriter(file, fieldnames=columns)
    writer.writeheader()
    for row in table:
      writer.writerow({k: (f'{v:.3f}' if k.startswith('centroid') else
                           f'{v:.5f}' if k == 'score' else v) for k, v in row.items()})


def predict_paths(paths, output, *, predict_windows, config, progress: bool = True) -> dict:
  """Predicts every image of `paths` into `output`. Returns dict(written=[stems],
  failed=[(path, message)]); a failing file is recorded and the others go on."""
  output = check_output_writable(output)
  files, failed = collect_inputs(paths)
  written = []
  for path in tqdm(files, desc='predict', unit='image', disable=not progress, dynamic_ncols=True):
    try:
      image = images_lib.read_image(path)
      result = predictor.predict_image(image, predict_windows=predict_windows, config=config)
      write_outputs(image, result, output, path.stem)
    except Exception as error:  # noqa: BLE001 (one bad file must not stop the others)
      message = str(error)
      if not isinstance(error, (ValueError, OSError)):  # expected: DataError (a ValueError), I/O
        message = f'{type(error).__name__}: {message}'
      failed.append((str(path), message))
      continue
    written.append(path.stem)
  return {'written': written, 'failed': failed}


def parse_args(argv):
  parser = argparse.ArgumentParser(prog='python -m donuseg_jax.predict', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--workdir', required=True, help='training work dir of the model')
  parser.add_argument('--input', required=True, nargs='+', help='image files and/or folders')
  parser.add_argument('--output', required=True, help='output folder (created if needed)')
  parser.add_argument('--which', default='best', choices=['best', 'latest'], help='checkpoint')
  parser.add_argument('--instance_method', choices=['boxes', 'watershed'], default=None,
                      help="instance assembly (default: the run's config.eval.instance_method)")
  parser.add_argument('--batch_size', type=int, default=None, help='windows per device call')
  return parser.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
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
    return 1
  if not (pathlib.Path(args.workdir) / 'config.json').is_file():
    print(f'error: {args.workdir} is not a training work dir (no config.json)', file=sys.stderr)
    return 2
  from donuseg_jax import train  # noqa: PLC0415 (imports JAX and the model)
  config, graphdef, params, batch_stats = train.load_trained_model(args.workdir, which=args.which)
  if args.instance_method:
    config.eval.instance_method = args.instance_method
  if args.batch_size:
    config.eval.batch_size = args.batch_size
  summary = predict_paths(args.input, output,
                          predict_windows=predictor.make_predict_windows(graphdef, params,
                                                                         batch_stats),
                          config=config)
  print(f"{len(summary['written'])} image(s) written to {output}")
  if summary['failed']:
    print(f"{len(summary['failed'])} input(s) failed:", file=sys.stderr)
    for path, message in summary['failed']:
      print(f'  {message}' if message.startswith(path) else f'  {path}: {message}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
