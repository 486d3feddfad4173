"""CoNSeP (Graham et al., HoVer-Net, MedIA 2019): 41 H&E tiles, 1000x1000, official 27/14 split.

Accepted layout under `root` (= data_root/'consep'): `CoNSeP/{Train,Test}/Images/<split>_N.png`
with `CoNSeP/{Train,Test}/Labels/<split>_N.mat`; the `CoNSeP` level may be absent (root itself
holding Train/ and Test/). Instances come from the `inst_map` field of each .mat file, relabelled
to 1..K so that gaps in the ids vanish (K = number of distinct nonzero ids). id = file stem
('train_1', 'test_7'), group = '' (CoNSeP gives no patient).
"""


import pathlib
import struct
import zlib

import numpy as np

from donuseg_jax.data import images
from donuseg_jax.data.readers import common
from donuseg_jax.data.readers import matfile

SUBSETS = ('train', 'test')
LAYOUT = ('CoNSeP/{Train,Test}/Images/<split>_N.png with '
          'CoNSeP/{Train,Test}/Labels/<split>_N.mat (inst_map)')


def available_subsets(root) -> list[str]:
  """The official subsets present under `root`, in ('train', 'test') order."""
  return [s for s in SUBSETS if s in _split_dirs(root)]


def list_ids(root, *, subset: str | None = None) -> list[str]:
  """Sorted ids of one official subset ('train' | 'test'), or of both when subset is None."""
  return sorted(_index(root, subset))


def iter_examples(root, *, subset: str | None = None):
  """Yields one example per image of `subset` (None = both), in id order."""
  index = _index(root, subset)
  for image_id in sorted(index):
    yield _example(*index[image_id], image_id)


def find_faults(root, *, subset: str | None = None) -> list[str]:
  """Every problem with the files of `subset` (missing labels, unreadable files), by name."""
  faults = []
  index = _index(root, subset, faults=faults)
  return faults + common.faults_of(index, lambda image_id: _example(*index[image_id], image_id))


def _example(image_path, label_path, image_id: str) -> dict:
  image = images.read_image(image_path)
  return common.make_example(image=image, instances=read_inst_map(label_path), image_id=image_id,
                             group='', source=str(label_path))


def read_inst_map(path) -> np.ndarray:
  """The (H, W) int32 `inst_map` of a CoNSeP .mat file (MATLAB v5 / v7, compressed or not).

  Read with `matfile` (a checked parser) rather than scipy.io.loadmat, whose compiled reader
  crashes the process on some corrupted files instead of raising.
  """
  try:
    data = pathlib.Path(path).read_bytes()
  except OSError as error:
    raise images.DataError(f'{path}: cannot read .mat file ({error})') from error
  try:
    inst_map = matfile.read_variable(data, 'inst_map')
  except (ValueError, struct.error, zlib.error, MemoryError) as error:
    raise images.DataError(f'{path}: cannot read .mat file ({error})') from error
  if inst_map is None:
    raise images.DataError(f'{path}: no inst_map variable')
  if inst_map.ndim != 2:
    raise images.DataError(f'{path}: inst_map has shape {inst_map.shape}, expected (H, W)')
  if inst_map.dtype.kind == 'f':  # some copies store it as float
    if not np.all(np.isfinite(inst_map)):
      raise images.DataError(f'{path}: inst_map holds NaN or infinite values')
    inst_map = np.round(inst_map)
  if inst_map.size and (inst_map.min() < 0 or inst_map.max() > np.iinfo(np.int32).max):
    raise images.DataError(f'{path}: inst_map ids outside 0..{np.iinfo(np.int32).max}')
  return inst_map.astype(np.int32)


def _split_dirs(root) -> dict:
  root = common.require_dir(root, 'CoNSeP', LAYOUT)
  base = root / 'CoNSeP' if (root / 'CoNSeP').is_dir() else root
  dirs = {}
  for subset in SUBSETS:
    matches = [p for p in base.iterdir() if p.is_dir() and p.name.lower() == subset]
    if matches:
      dirs[subset] = matches[0]
  if not dirs:
    raise images.DataError(f'CoNSeP: no Train/ or Test/ folder in {base}; expected {LAYOUT}')
  return dirs


def _index(root, subset, *, faults: list | None = None) -> dict:
  """id -> (image path, label path) for `subset` (None = every subset found)."""
  if subset is not None and subset not in SUBSETS:
    raise ValueError(f'CoNSeP subset must be one of {SUBSETS} or None, got {subset!r}')
  index = {}
  for name, folder in _split_dirs(root).items():
    if subset not in (None, name):
      continue
    image_dir, label_dir = folder / 'Images', folder / 'Labels'
    if not image_dir.is_dir() or not label_dir.is_dir():
      raise images.DataError(f'CoNSeP: {folder} lacks Images/ or Labels/; expected {LAYOUT}')
    for image_path in sorted(image_dir.glob('*.png')):
      label_path = label_dir / f'{image_path.stem}.mat'
      if not label_path.is_file():
        common.fault(faults, f'CoNSeP: {image_path} has no label file {label_path}')
        continue
      index[image_path.stem.lower()] = (image_path, label_path)
  if not index and not faults:
    raise images.DataError(f'CoNSeP: no images found under {root}; expected {LAYOUT}')
  return index
