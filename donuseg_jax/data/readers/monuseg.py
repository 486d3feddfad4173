"""MoNuSeg 2018 (Kumar et al.): 1000x1000 H&E tiles from TCGA with polygon annotations.

Accepted layouts under `root` (= data_root/'monuseg'), each folder found up to three levels down:
  - training set (subset 'train'): `.../Tissue Images/*.tif` with `.../Annotations/*.xml` beside it
    (the official 'MoNuSeg 2018 Training Data' folder);
  - test set (subset 'test'): a folder `MoNuSegTestData/` holding `.tif` and `.xml` side by side.

Annotations are Aperio ImageScope XML: every `<Region>` is one nucleus, a polygon of
`<Vertex X= Y=>` in pixel coordinates (used as given: pixel (i, j) is inside when its centre
(x=j, y=i) is). Regions are painted in document order and a later region overwrites an earlier one
where they overlap; degenerate regions and regions wholly covered by later ones are dropped and
reported (`region_reports`, see `polygons.py`). id = file stem ('TCGA-21-5784-01Z-00-DX1'),
group = its first 12 characters, the TCGA patient ('TCGA-21-5784').
"""

import pathlib
import xml.etree.ElementTree as ElementTree

import numpy as np
import tifffile

from donuseg_jax.data import images
from donuseg_jax.data.readers import common
from donuseg_jax.data.readers import polygons as polygons_lib

SUBSETS = ('train', 'test')
LAYOUT = ("'MoNuSeg 2018 Training Data/Tissue Images/*.tif' with "
          "'MoNuSeg 2018 Training Data/Annotations/*.xml' (training), and/or "
          "'MoNuSegTestData/' with .tif and .xml side by side (test)")


def available_subsets(root) -> list[str]:
  """The subsets whose folders exist under `root` ('train', 'test'); DataError if neither."""
  root = common.require_dir(root, 'MoNuSeg', LAYOUT)
  found = [s for s in SUBSETS if _folders(root, s)]
  if not found:
    raise images.DataError(f'MoNuSeg: neither the training nor the test folder is in {root}; '
                           f'expected {LAYOUT}')
  return found


def list_ids(root, *, subset: str = 'train') -> list[str]:
  """Sorted image ids of `subset`, from file names only."""
  return sorted(_index(root, subset))


def iter_examples(root, *, subset: str = 'train'):
  """Yields one example per image of `subset`, in id order."""
  index = _index(root, subset)
  for image_id in sorted(index):
    yield _example(*index[image_id], image_id)


def find_faults(root, *, subset: str = 'train') -> list[str]:
  """Every problem with the files of `subset` (missing or bad XML, unreadable TIFFs), by name."""
  faults = []
  index = _index(root, subset, faults=faults)
  return faults + common.faults_of(index, lambda image_id: _example(*index[image_id], image_id))


def _example(image_path, xml_path, image_id: str) -> dict:
  image = images.read_image(image_path)
  instances, _ = read_annotation(xml_path, image.shape)
  return common.make_example(image=image, instances=instances, image_id=image_id,
                             group=image_id[:12], source=str(xml_path))


def region_reports(root, *, subset: str = 'train') -> dict:
  """id -> RegionReport.as_dict(), without decoding the images (only their TIFF headers)."""
  reports = {}
  index = _index(root, subset)
  for image_id in sorted(index):
    image_path, xml_path = index[image_id]
    try:
      with tifffile.TiffFile(image_path) as tiff:
        shape = tiff.pages[0].shape
    except Exception as error:  # tifffile raises several types on broken files
      raise images.DataError(f'{image_path}: cannot read TIFF header ({error})') from error
    reports[image_id] = read_annotation(xml_path, shape)[1].as_dict()
  return reports


def read_polygons(xml_path) -> list[np.ndarray]:
  """Every `<Region>` of an ImageScope XML file, in document order, as (n, 2) float64 x, y."""
  try:
    tree = ElementTree.parse(xml_path)
  except (ElementTree.ParseError, OSError) as error:
    raise images.DataError(f'{xml_path}: cannot parse annotation XML ({error})') from error
  regions = []
  for region in tree.getroot().iter('Region'):
    try:
      vertices = [(float(v.get('X')), float(v.get('Y'))) for v in region.iter('Vertex')]
    except (TypeError, ValueError) as error:
      raise images.DataError(
          f'{xml_path}: region Id={region.get("Id")} has a vertex without numeric X, Y') from error
    if not np.isfinite(np.asarray(vertices, np.float64)).all():
      raise images.DataError(
          f'{xml_path}: region Id={region.get("Id")} has a vertex at nan or infinity')
    regions.append(np.asarray(vertices, np.float64).reshape(-1, 2))
  return regions


def read_annotation(xml_path, shape) -> tuple[np.ndarray, polygons_lib.RegionReport]:
  """(H, W) int32 instance map (ids in document order of the surviving regions) and its report."""
  return polygons_lib.rasterise(read_polygons(xml_path), shape)


def _folders(root: pathlib.Path, subset: str) -> list[tuple[pathlib.Path, pathlib.Path]]:
  """(image folder, annotation folder) pairs for `subset`."""
  if subset == 'train':
    return [(d, d.parent / 'Annotations') for d in common.find_dirs(root, 'Tissue Images')
            if (d.parent / 'Annotations').is_dir()]
  if subset == 'test':
    return [(d, d) for d in common.find_dirs(root, 'MoNuSegTestData')]
  raise ValueError(f'MoNuSeg subset must be one of {SUBSETS}, got {subset!r}')


def _index(root, subset: str, *, faults: list | None = None) -> dict:
  """id -> (image path, xml path)."""
  root = common.require_dir(root, 'MoNuSeg', LAYOUT)
  folders = _folders(root, subset)
  if not folders:
    raise images.DataError(f'MoNuSeg: no {subset} folder in {root}; expected {LAYOUT}')
  index = {}
  for image_dir, xml_dir in folders:
    for image_path in sorted(image_dir.iterdir()):
      if image_path.suffix.lower() not in images.TIFF_SUFFIXES:
        continue
      xml_path = xml_dir / f'{image_path.stem}.xml'
      if not xml_path.is_file():
        common.fault(faults, f'MoNuSeg: {image_path} has no annotation file {xml_path}')
        continue
      index.setdefault(image_path.stem, (image_path, xml_path))
  if not index and not faults:
    raise images.DataError(f'MoNuSeg: no .tif images in {[str(f[0]) for f in folders]}; '
                           f'expected {LAYOUT}')
  return index
