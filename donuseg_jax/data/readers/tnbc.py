"""TNBC (Naylor et al., IEEE TMI 2018): 50 H&E tiles, 512x512, from 11 patients (slides).

Accepted layouts under `root` (= data_root/'tnbc'):
  - the extracted Zenodo archive: `Slide_NN/NN_K.png` with masks `GT_NN/NN_K.png`, directly in
    `root` or up to two folders down (e.g. `root/TNBC_NucleiSegmentation/Slide_01/01_1.png`);
  - the Zenodo zip itself (`root/*.zip`, e.g. TNBC_NucleiSegmentation.zip), read without extracting.
The extracted folder wins when both are present.

Masks are binary (0/255); instances are the 8-connected components of mask > 0, numbered in
raster order. id = file stem ('01_1'), group = 'Slide_01'.
"""

import pathlib
import re
import zipfile

import numpy as np
import skimage.measure

from donuseg_jax.data import images
from donuseg_jax.data.readers import common

URL = 'https://zenodo.org/records/1175282/files/TNBC_NucleiSegmentation.zip'
LAYOUT = ('Slide_NN/NN_K.png images with GT_NN/NN_K.png masks (the extracted Zenodo archive '
          f'{URL}), or that zip file, inside the folder')
_MEMBER = re.compile(r'(?:^|/)(Slide|GT)_(\d+)/(\d+_\d+)\.png$', re.IGNORECASE)


def list_ids(root) -> list[str]:
  """Sorted image ids ('01_1', ...), from file names only."""
  return sorted(_index(root))


def iter_examples(root):
  """Yields one example per image, in id order."""
  index = _index(root)
  for image_id in sorted(index):
    yield _example(index[image_id], image_id)


def find_faults(root) -> list[str]:
  """Every problem with the files under `root` (unpaired files, undecodable images), by name."""
  faults = []
  index = _index(root, faults=faults)
  return faults + common.faults_of(index, lambda image_id: _example(index[image_id], image_id))


def _example(entry: dict, image_id: str) -> dict:
  image = images.decode_image(entry['Slide'].read(), source=entry['Slide'].name)
  mask = images.decode_image(entry['GT'].read(), source=entry['GT'].name)
  # The masks decode to RGB copies of one gray channel; any nonzero value is nucleus.
  instances = skimage.measure.label(mask.max(axis=-1) > 0, connectivity=2).astype(np.int32)
  return common.make_example(image=image, instances=instances, image_id=image_id,
                             group=f'Slide_{entry["slide"]}', source=entry['GT'].name)


class _File:
  """A readable file: a plain path, or a member of a zip archive."""

  def __init__(self, path: pathlib.Path, member: str | None = None):
    self.path, self.member = path, member
    self.name = f'{path}:{member}' if member else str(path)

  def read(self) -> bytes:
    if self.member is None:
      return self.path.read_bytes()
    with zipfile.ZipFile(self.path) as archive:
      return archive.read(self.member)


def _index(root, *, faults: list | None = None) -> dict:
  """id -> {'Slide': _File, 'GT': _File, 'slide': 'NN'}; raises DataError on a bad layout."""
  root = common.require_dir(root, 'TNBC', LAYOUT)
  files = _folder_files(root)
  if not files:
    for archive in sorted(root.glob('*.zip')):
      files = _zip_files(archive)
      if files:
        break
  index = {}
  for relative, file in files:
    match = _MEMBER.search(relative)
    if not match:
      continue
    kind = 'GT' if match.group(1).upper() == 'GT' else 'Slide'
    slide, stem = match.group(2), match.group(3)
    index.setdefault(stem, {'slide': slide})[kind] = file
  if not index:
    raise images.DataError(f'TNBC: no images found in {root}; expected {LAYOUT}')
  for stem, entry in sorted(index.items()):
    for kind in ('Slide', 'GT'):
      if kind not in entry:
        other = entry['GT' if kind == 'Slide' else 'Slide'].name
        common.fault(faults, f'TNBC: {other} has no matching {kind}_{entry["slide"]}/{stem}.png')
  return {stem: entry for stem, entry in index.items() if 'Slide' in entry and 'GT' in entry}


def _folder_files(root: pathlib.Path) -> list:
  files = []
  for depth in range(3):  # Slide_NN folders directly in root, or up to two levels down
    for folder in sorted(root.glob('/'.join(['*'] * depth + ['Slide_*']))) + sorted(
        root.glob('/'.join(['*'] * depth + ['GT_*']))):
      if folder.is_dir():
        files += [(p.relative_to(root).as_posix(), _File(p)) for p in sorted(folder.glob('*.png'))]
    if files:
      return files
  return files


def _zip_files(archive: pathlib.Path) -> list:
  try:
    with zipfile.ZipFile(archive) as opened:
      names = opened.namelist()
  except zipfile.BadZipFile as error:
    raise images.DataError(f'TNBC: {archive} is not a readable zip file ({error})') from error
  # Skip macOS resource forks (__MACOSX/, ._name) that some re-packed archives carry.
  return [(name, _File(archive, name)) for name in names
          if not name.startswith('__MACOSX/') and not pathlib.PurePosixPath(name).name.startswith('._')]
