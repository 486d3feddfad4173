"""CryoNuSeg (Mahbod et al., 2021): 512x512 H&E tiles of frozen sections, 10 organs.

Two layouts are accepted under `root`:

1. The Kaggle release (30 tiles), folders found case-insensitively up to three levels down:
     tissue images/<id>.tif
     Annotator 1 (biologist second round of manual marks up)/[same name again/]
         label masks modify/<id>.tif | label masks/<id>.tif | imageJ_zips/<id>.zip
     Annotator 1 (biologist)/...       Annotator 2 (bioinformatician)/[same name again/]...
   `annotator` picks the folder: 'annotator1' (default; the second round of annotator 1, the usual
   ground truth), 'annotator1_round1' or 'annotator2'. An annotator folder is any folder whose
   name starts with 'Annotator 1' / 'Annotator 2' ('second round' in the name tells the two rounds
   of annotator 1 apart). Inside it the instance masks are read from 'label masks modify' (the
   release's corrected instance maps), else 'label masks'; when neither exists, the ImageJ ROI
   zips (any folder whose name contains 'zip') are rasterised. A copy without annotator folders
   (e.g. `label masks modify/` beside `tissue images/`) is read as 'annotator1'.
2. The pilot tiles (`root/*.zip`): each zip holds one ImageJ TIFF, `RoiSet.zip` (one ROI per
   nucleus) and `Centroid.txt` (ignored: one stage position in microns, not nucleus centroids).

ROIs (polygon, freehand, traced, oval, rectangle; via `roifile`) are painted in ROI-manager order,
a later ROI overwriting an earlier one; degenerate or wholly covered ROIs are dropped and counted
(`region_reports`). ImageJ puts the centre of pixel (0, 0) at (0.5, 0.5), so ROI coordinates are
shifted by -0.5 onto this project's grid. id = tile stem, group = '' (one organ per 3 tiles, but no
patient is given).
"""

import io
import pathlib
import zipfile

import numpy as np
import roifile
import tifffile

from donuseg_jax.data import images
from donuseg_jax.data.readers import common
from donuseg_jax.data.readers import polygons as polygons_lib

ANNOTATORS = ('annotator1', 'annotator1_round1', 'annotator2')
MASK_FOLDERS = ('label masks modify', 'label masks')
LAYOUT = ("the Kaggle release ('tissue images/*.tif' and 'Annotator N (...)/.../label masks modify/"
          "*.tif' or '.../imageJ_zips/*.zip'), or pilot zips ('*.zip' each holding one .tif and "
          'RoiSet.zip)')


def layout(root) -> str:
  """'release' or 'pilot', from the files under `root`; DataError naming root if neither."""
  root = common.require_dir(root, 'CryoNuSeg', LAYOUT)
  if common.find_dirs(root, 'tissue images'):
    return 'release'
  if any(_is_pilot_zip(p) for p in sorted(root.glob('*.zip'))):
    return 'pilot'
  raise images.DataError(f'CryoNuSeg: no tissue images/ folder and no pilot zips in {root}; '
                         f'expected {LAYOUT}')


def list_ids(root, *, annotator: str = 'annotator1') -> list[str]:
  """Sorted tile ids, from file names only."""
  return sorted(_index(root, annotator))


def iter_examples(root, *, annotator: str = 'annotator1'):
  """Yields one example per tile, in id order."""
  index = _index(root, annotator)
  for image_id in sorted(index):
    yield _example(index[image_id], image_id)


def find_faults(root, *, annotator: str = 'annotator1') -> list[str]:
  """Every problem with the tiles (unreadable images, labels or ROI archives), by name."""
  index = _index(root, annotator)
  return common.faults_of(index, lambda image_id: _example(index[image_id], image_id))


def _example(entry: dict, image_id: str) -> dict:
  image, instances, _ = _read(entry)
  return common.make_example(image=image, instances=instances, image_id=image_id, group='',
                             source=entry['label'])


def region_reports(root, *, annotator: str = 'annotator1') -> dict:
  """id -> RegionReport.as_dict() for tiles labelled by ROIs ({} when masks are read instead)."""
  index = _index(root, annotator)
  reports = {}
  for image_id in sorted(index):
    if index[image_id]['kind'] != 'mask':
      reports[image_id] = _read(index[image_id])[2].as_dict()
  return reports


def read_rois(data: bytes, *, source: str) -> list[np.ndarray]:
  """The ROIs of an ImageJ RoiSet zip (or one .roi file), in stored order, as (n, 2) x, y arrays."""
  try:
    if data[:2] == b'PK':
      with zipfile.ZipFile(io.BytesIO(data)) as archive:
        blobs = [archive.read(n) for n in archive.namelist() if n.lower().endswith('.roi')]
    else:
      blobs = [data]
    rois = [roifile.ImagejRoi.frombytes(blob) for blob in blobs]
  except Exception as error:  # zipfile / roifile raise several types on broken files
    raise images.DataError(
        f'{source}: cannot read ImageJ ROIs ({type(error).__name__}: {error})') from error
  return [np.asarray(roi.coordinates(), np.float64).reshape(-1, 2) for roi in rois]


def _read(entry: dict):
  """(image, instances, report) of one index entry; report is None for label masks."""
  image = images.decode_image(entry['read_image'](), source=entry['image'])
  if entry['kind'] == 'mask':
    try:
      instances = tifffile.imread(io.BytesIO(entry['read_label']()))
    except Exception as error:  # tifffile raises several types on broken files
      raise images.DataError(f'{entry["label"]}: cannot read label mask ({error})') from error
    if instances.ndim == 3:  # masks saved as RGB copies of one channel
      instances = instances[..., 0]
    return image, np.asarray(instances).astype(np.int32), None
  rois = read_rois(entry['read_label'](), source=entry['label'])
  instances, report = polygons_lib.rasterise(rois, image.shape, offset=-0.5)
  return image, instances, report


def _index(root, annotator: str) -> dict:
  """id -> {'image', 'label': names; 'read_image', 'read_label': callables; 'kind': mask | rois}."""
  if annotator not in ANNOTATORS:
    raise ValueError(f'CryoNuSeg annotator must be one of {ANNOTATORS}, got {annotator!r}')
  root = pathlib.Path(root)
  index = _release_index(root, annotator) if layout(root) == 'release' else _pilot_index(root)
  if not index:
    raise images.DataError(f'CryoNuSeg: no tiles found in {root}; expected {LAYOUT}')
  return index


def _release_index(root: pathlib.Path, annotator: str) -> dict:
  image_dir = common.find_dirs(root, 'tissue images')[0]
  label_dir, kind = _label_dir(root, annotator)
  suffix = '.tif' if kind == 'mask' else '.zip'
  index = {}
  for image_path in sorted(image_dir.iterdir()):
    if image_path.suffix.lower() not in images.TIFF_SUFFIXES:
      continue
    candidates = [label_dir / f'{image_path.stem}{s}' for s in (suffix, suffix + 'f')]
    label_path = next((p for p in candidates if p.is_file()), None)
    if label_path is None:
      raise images.DataError(f'CryoNuSeg: {image_path} has no label file in {label_dir}')
    index[image_path.stem] = {'image': str(image_path), 'label': str(label_path), 'kind': kind,
                              'read_image': image_path.read_bytes, 'read_label': label_path.read_bytes}
  return index


def _label_dir(root: pathlib.Path, annotator: str) -> tuple[pathlib.Path, str]:
  """The folder of the chosen annotator's instance masks ('mask') or ROI zips ('rois')."""
  wanted = []
  for folder in _all_dirs(root, max_depth=3):
    name = folder.name.lower()
    if annotator == 'annotator2' and name.startswith('annotator 2'):
      wanted.append(folder)
    elif annotator.startswith('annotator1') and name.startswith('annotator 1'):
      if ('second round' in name) == (annotator == 'annotator1'):
        wanted.append(folder)
  if not wanted and annotator == 'annotator1':
    wanted = [root]  # copies without annotator folders: masks straight under the root
  for folder in wanted:
    for mask_name in MASK_FOLDERS:
      found = common.find_dirs(folder, mask_name, max_depth=2)
      if found:
        return found[0], 'mask'
  for folder in wanted:
    zips = [d for d in _all_dirs(folder, max_depth=2) if 'zip' in d.name.lower()]
    if zips:
      return zips[0], 'rois'
  raise images.DataError(
      f'CryoNuSeg: no label masks or ImageJ zips for {annotator} under {root} '
      f'(annotator folders found: {[str(w) for w in wanted]}); expected {LAYOUT}')


def _all_dirs(root: pathlib.Path, *, max_depth: int) -> list[pathlib.Path]:
  found, level = [], [root]
  for _ in range(max_depth):
    level = [c for p in level for c in sorted(p.iterdir()) if c.is_dir()]
    found += level
  return found


def _is_pilot_zip(path: pathlib.Path) -> bool:
  try:
    with zipfile.ZipFile(path) as archive:
      names = [pathlib.PurePosixPath(n).name.lower() for n in archive.namelist()]
  except zipfile.BadZipFile:
    return False
  return 'roiset.zip' in names and any(n.endswith(images.TIFF_SUFFIXES) for n in names)


def _pilot_index(root: pathlib.Path) -> dict:
  index = {}
  for path in sorted(root.glob('*.zip')):
    if not _is_pilot_zip(path):
      continue
    with zipfile.ZipFile(path) as archive:
      names = archive.namelist()
    tiff = next(n for n in names if n.lower().endswith(images.TIFF_SUFFIXES))
    rois = next(n for n in names if pathlib.PurePosixPath(n).name.lower() == 'roiset.zip')
    index[path.stem] = {'image': f'{path}:{tiff}', 'label': f'{path}:{rois}', 'kind': 'rois',
                        'read_image': _member_reader(path, tiff),
                        'read_label': _member_reader(path, rois)}
  return index


def _member_reader(path: pathlib.Path, member: str):
  def read() -> bytes:
    with zipfile.ZipFile(path) as archive:
      return archive.read(member)
  return read
