"""A folder of the user's own images with their point clicks: the `folder` dataset's files.

Layout of the folder (not recursive; names compared by stem, suffixes case-insensitive):

  <stem>.png | .tif | .tiff | .jpg | .jpeg   the image, any size (read by `images.read_image`)
  <stem>.geojson                             its points, as QuPath exports annotations
                                             (File > Export objects as GeoJSON): Point or MultiPoint
                                             features, any number of them, QuPath's pixel-corner
                                             coordinates (pixel (i, j) covers x in [j, j + 1));
                                             Polygon / MultiPolygon annotations are the annotated
                                             regions (see `data.regions`); detections are skipped
  or <stem>.csv                              its points as columns x, y (header required, other
                                             columns ignored) in pixel indices: x = column, y = row,
                                             x = 0 the centre of the first column (numpy's
                                             convention; QuPath's corner coordinates minus 0.5)
  <stem>.mask.tif | .mask.tiff | .mask.png   optional label map for evaluation only (0 =
                                             background, one id per nucleus; a map with a single
                                             non-zero value is a binary mask and its 8-connected
                                             components are the nuclei)
  splits.json                                optional: {"train": [stems], "val": [...], "test": [...]}

Images without a point file are listed by `scan` and left out. Every problem with a file is a
`DataError` naming it: an unreadable image, point file or mask, two images or two point files for
one stem, a mask of another size, points outside the image. Points outside every annotated region
of their image are dropped with an `OutsideRegionWarning` naming the file (a click outside the
regions has no annotated surroundings to train on).

Examples follow `batch.py`, plus `region` ((H, W) bool, or None = annotated everywhere) and
`has_mask` (False: `instances` is all zeros and holds no ground truth). id = stem, group = ''.
"""

import dataclasses
import pathlib
import warnings

import numpy as np
import PIL.Image
import skimage.measure
import skimage.segmentation
import tifffile

from donuseg_jax.data import images
from donuseg_jax.data import points as points_lib
from donuseg_jax.data import regions as regions_lib
from donuseg_jax.data.readers import common

IMAGE_SUFFIXES = ('.png', '.tif', '.tiff', '.jpg', '.jpeg')
POINT_SUFFIXES = ('.geojson', '.csv')
MASK_SUFFIXES = ('.mask.tif', '.mask.tiff', '.mask.png')
SPLITS_FILE = 'splits.json'
PREDICTION_SUFFIXES = ('.instances.tif', '.overlay.png')  # predict's outputs: never images here
LAYOUT = ('images (.png, .tif, .tiff, .jpg, .jpeg) each with a point file <stem>.geojson (QuPath '
          'export) or <stem>.csv (x,y columns), optional <stem>.mask.tif / .mask.png label maps')


class OutsideRegionWarning(UserWarning):
  """A point file holds points outside every annotated region of its image; they were dropped."""


@dataclasses.dataclass(frozen=True)
class Entry:
  """The files of one image."""
  stem: str
  image: pathlib.Path
  points: pathlib.Path | None
  mask: pathlib.Path | None


@dataclasses.dataclass(frozen=True)
class Scan:
  """What a folder holds: the usable images (with point files) and those left out."""
  root: pathlib.Path
  entries: tuple  # Entry with a point file, sorted by stem
  unannotated: tuple  # image paths without a point file, sorted


def scan(root) -> Scan:
  """Finds the images, point files and masks of `root` by file name (no decoding)."""
  root = common.require_dir(pathlib.Path(root), 'folder', LAYOUT)
  found = {'image': {}, 'points': {}, 'mask': {}}
  for path in sorted(root.iterdir()):
    if not path.is_file() or path.name.startswith('.'):
      continue
    name = path.name.lower()
    if name.endswith(PREDICTION_SUFFIXES):
      continue
    mask_suffix = next((s for s in MASK_SUFFIXES if name.endswith(s)), None)
    if mask_suffix:
      kind, stem = 'mask', path.name[:-len(mask_suffix)]
    elif path.suffix.lower() in IMAGE_SUFFIXES:
      kind, stem = 'image', path.stem
    elif path.suffix.lower() in POINT_SUFFIXES:
      kind, stem = 'points', path.stem
    else:
      continue
    if stem in found[kind]:
      raise images.DataError(f'folder {root}: {found[kind][stem].name} and {path.name} are both '
                             f'{"point files" if kind == "points" else kind + "s"} of image '
                             f'{stem!r}; keep one')
    found[kind][stem] = path
  if not found['image']:
    raise images.DataError(f'folder {root}: no images found; expected {LAYOUT}')
  for kind in ('points', 'mask'):
    orphans = sorted(set(found[kind]) - set(found['image']))
    if orphans:
      raise images.DataError(f'folder {root}: {found[kind][orphans[0]].name} has no image '
                             f'{orphans[0]}{{{",".join(IMAGE_SUFFIXES)}}} ({len(orphans)} such '
                             'file(s))')
  entries, unannotated = [], []
  for stem, image in sorted(found['image'].items()):
    if stem not in found['points']:
      unannotated.append(image)
      continue
    entries.append(Entry(stem, image, found['points'][stem], found['mask'].get(stem)))
  return Scan(root, tuple(entries), tuple(unannotated))


def read_annotations(path, shape) -> tuple[np.ndarray, np.ndarray | None]:
  """(points (K, 2) float32 on the pixel-centre grid, region (H, W) bool or None) of a point file.

  Points outside the image are a DataError; points outside the regions are dropped with an
  OutsideRegionWarning. Regions that cover no pixel of the image are a DataError.
  """
  path = pathlib.Path(path)
  if path.suffix.lower() == '.csv':
    points, polygons = points_lib.read_points_csv(path), []
  else:
    points, polygons = points_lib.read_annotations_geojson(path)
  points_lib.check_points_inside(points, shape, str(path))
  if not polygons:
    return points, None
  region = regions_lib.region_mask(polygons, shape)
  if not region.any():
    raise images.DataError(f'{path}: its {len(polygons)} region polygon(s) cover no pixel of the '
                           f'image (width {shape[1]}, height {shape[0]})')
  inside = regions_lib.points_inside(points, region)
  if not inside.all():
    k = int(np.argmax(~inside))
    warnings.warn(
        f'{path}: {int((~inside).sum())} of {len(points)} point(s) lie outside every annotated '
        f'region (e.g. point {k} at x={points[k, 0]:g}, y={points[k, 1]:g}) and were left out; '
        'draw the region around them, or delete the regions to annotate the whole image',
        OutsideRegionWarning, stacklevel=2)
    points = points[inside]
  return points, region


def read_label_map(path, shape) -> np.ndarray:
  """An instance label map (H, W) int32, 1..K, from a .mask.tif / .mask.png file."""
  path = pathlib.Path(path)
  try:
    if path.suffix.lower() in images.TIFF_SUFFIXES:
      array = tifffile.imread(path)
    else:
      with PIL.Image.open(path) as opened:
        array = np.asarray(opened)
  except Exception as error:  # noqa: BLE001 (any decoder failure is a bad file)
    raise images.DataError(f'{path}: cannot read the mask ({error})') from error
  array = np.asarray(array)
  if array.ndim == 3 and array.shape[-1] in (3, 4) and (array[..., :3] == array[..., :1]).all():
    array = array[..., 0]  # a gray map saved as RGB(A)
  array = np.squeeze(array) if array.ndim == 3 and 1 in (array.shape[0], array.shape[-1]) else array
  if array.ndim != 2:
    raise images.DataError(f'{path}: a mask must be one label map (H, W), found shape '
                           f'{array.shape}')
  if array.dtype == bool:
    array = array.astype(np.uint8)
  if not np.issubdtype(array.dtype, np.integer):
    raise images.DataError(f'{path}: mask values must be integers, found {array.dtype}')
  if array.size and array.min() < 0:
    raise images.DataError(f'{path}: negative values in the mask (0 = background, ids > 0)')
  if array.shape != tuple(shape[:2]):
    raise images.DataError(f'{path}: mask is {array.shape[1]}x{array.shape[0]} but the image is '
                           f'{shape[1]}x{shape[0]} (width x height)')
  if len(np.unique(array[array > 0])) == 1:  # binary: nuclei are its connected components
    array = skimage.measure.label(array > 0, connectivity=2)
  return skimage.segmentation.relabel_sequential(array.astype(np.int64))[0].astype(np.int32)


def read_example(entry: Entry) -> dict:
  """The example of one image: image, instances, points, id, group, region, has_mask."""
  image = images.read_image(entry.image)
  points, region = read_annotations(entry.points, image.shape)
  if entry.mask is not None:
    instances = read_label_map(entry.mask, image.shape)
  else:
    instances = np.zeros(image.shape[:2], np.int32)
  return {'image': image, 'instances': instances, 'points': points, 'id': entry.stem, 'group': '',
          'region': region, 'has_mask': entry.mask is not None}


def unannotated_message(folder: Scan) -> str:
  """The warning listing the images left out for lack of a point file."""
  names = ', '.join(p.name for p in folder.unannotated[:10])
  more = f' and {len(folder.unannotated) - 10} more' if len(folder.unannotated) > 10 else ''
  return (f'folder {folder.root}: {len(folder.unannotated)} image(s) without a point file '
          f'(<stem>.geojson or <stem>.csv) left out: {names}{more}')
