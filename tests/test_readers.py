"""Dataset readers against the real files in ../shared/data, and small layouts built in tmp_path."""

import io
import re
import shutil
import time
import xml.etree.ElementTree as ElementTree
import zipfile

import numpy as np
import pytest
import roifile
import skimage.draw
import tifffile

from donuseg_jax.data import datasets
from donuseg_jax.data import images
from donuseg_jax.data import synthetic
from donuseg_jax.data.readers import consep
from donuseg_jax.data.readers import cryonuseg
from donuseg_jax.data.readers import monuseg
from donuseg_jax.data.readers import tnbc


def _check_example(example):
  image, instances, pts = example['image'], example['instances'], example['points']
  assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
  assert instances.dtype == np.int32 and instances.shape == image.shape[:2]
  assert pts.dtype == np.float32 and pts.shape == (instances.max(), 2)
  ids = np.unique(instances)
  np.testing.assert_array_equal(ids[ids > 0], np.arange(1, instances.max() + 1))  # 1..K
  np.testing.assert_array_equal(instances[pts[:, 1].astype(int), pts[:, 0].astype(int)],
                                np.arange(1, len(pts) + 1))  # every point in its own nucleus
  assert isinstance(example['id'], str) and isinstance(example['group'], str)


def _independent_drops(polygons, shape, offset=0.0):
  """Degenerate / covered polygon indices, counted backwards with a union of later polygons."""
  later = np.zeros(shape, bool)  # (H, W) pixels of the polygons after the current one
  degenerate, covered = [], []
  for index in reversed(range(len(polygons))):
    polygon = polygons[index]
    rows, cols = (skimage.draw.polygon(polygon[:, 1] + offset, polygon[:, 0] + offset, shape)
                  if len(polygon) >= 3 else ((), ()))
    if len(rows) == 0:
      degenerate.append(index)
    elif later[rows, cols].all():
      covered.append(index)
    later[rows, cols] = True
  return sorted(degenerate), sorted(covered)


# TNBC ----------------------------------------------------------------------------------------------

def test_tnbc_real_counts(data_root):
  root = data_root / 'tnbc'
  ids = tnbc.list_ids(root)
  assert len(ids) == 50 and ids[0] == '01_1'
  instances = points = 0
  groups = set()
  for example in tnbc.iter_examples(root):
    _check_example(example)
    assert example['image'].shape == (512, 512, 3)
    instances += example['instances'].max()
    points += len(example['points'])
    groups.add(example['group'])
  assert (instances, points) == (4028, 4028)
  assert len(groups) == 11 and 'Slide_01' in groups


def test_tnbc_zip_equals_folder(data_root, tmp_path):
  folder = data_root / 'tnbc' / 'TNBC_NucleiSegmentation'
  archive = tmp_path / 'tnbc' / 'TNBC_NucleiSegmentation.zip'
  archive.parent.mkdir()
  with zipfile.ZipFile(archive, 'w') as out:
    for kind in ('Slide_03', 'GT_03'):
      out.write(folder / kind / '03_2.png', f'TNBC_NucleiSegmentation/{kind}/03_2.png')
    out.writestr('__MACOSX/TNBC_NucleiSegmentation/Slide_03/._03_2.png', b'junk')
  from_zip, = tnbc.iter_examples(archive.parent)
  from_folder = next(e for e in tnbc.iter_examples(data_root / 'tnbc') if e['id'] == '03_2')
  assert from_zip['id'] == '03_2' and from_zip['group'] == 'Slide_03'
  for key in ('image', 'instances', 'points'):
    np.testing.assert_array_equal(from_zip[key], from_folder[key])


# CoNSeP --------------------------------------------------------------------------------------------

def test_consep_real_counts(data_root):
  root = data_root / 'consep'
  assert len(consep.list_ids(root, subset='train')) == 27
  assert len(consep.list_ids(root, subset='test')) == 14
  instances = points = images_seen = 0
  for example in consep.iter_examples(root):
    _check_example(example)
    images_seen += 1
    instances += example['instances'].max()
    points += len(example['points'])
  assert (images_seen, instances, points) == (41, 24233, 24233)


def test_consep_gaps_in_ids_are_closed(data_root):
  inst_map = consep.read_inst_map(data_root / 'consep' / 'CoNSeP' / 'Test' / 'Labels' / 'test_1.mat')
  example = next(consep.iter_examples(data_root / 'consep', subset='test'))
  assert example['id'] == 'test_1'
  assert example['instances'].max() == len(np.unique(inst_map)) - 1


# MoNuSeg -------------------------------------------------------------------------------------------

def _train_dir(data_root):
  return data_root / 'monuseg' / 'MoNuSeg 2018 Training Data'


def test_monuseg_region_accounting_per_image(data_root):
  """instances = <Region> count - dropped, for every image; ids 1..K in each map."""
  root = _train_dir(data_root)
  ids = monuseg.list_ids(data_root / 'monuseg')
  assert len(ids) == 13
  total_dropped = 0
  for image_id in ids:
    xml_path = root / 'Annotations' / f'{image_id}.xml'
    regions = len(re.findall(r'<Region\s', xml_path.read_text()))
    instances, report = monuseg.read_annotation(xml_path, (1000, 1000))
    assert report.regions == regions
    assert instances.max() == len(np.unique(instances)) - 1 == regions - report.dropped, image_id
    total_dropped += report.dropped
  assert total_dropped == 2  # one degenerate region in each of two images (checked below)


@pytest.mark.parametrize('image_id', ['TCGA-50-5931-01Z-00-DX1', 'TCGA-E2-A1B5-01Z-00-DX1'])
def test_monuseg_dropped_regions_match_an_independent_count(data_root, image_id):
  xml_path = _train_dir(data_root) / 'Annotations' / f'{image_id}.xml'
  polygons = [
      np.array([(float(v.get('X')), float(v.get('Y'))) for v in region.iter('Vertex')]).reshape(-1, 2)
      for region in ElementTree.parse(xml_path).getroot().iter('Region')]
  degenerate, covered = _independent_drops(polygons, (1000, 1000))
  _, report = monuseg.read_annotation(xml_path, (1000, 1000))
  assert (report.degenerate, report.covered) == (degenerate, covered)


def test_monuseg_example_and_group(data_root):
  example = next(monuseg.iter_examples(data_root / 'monuseg'))
  _check_example(example)
  assert example['id'] == 'TCGA-21-5784-01Z-00-DX1' and example['group'] == 'TCGA-21-5784'


def _region_xml(polygons):
  regions = ''.join(
      f'<Region Id="{i + 1}" Type="0"><Attributes/><Vertices>'
      + ''.join(f'<Vertex X="{x}" Y="{y}"/>' for x, y in polygon)
      + '</Vertices></Region>' for i, polygon in enumerate(polygons))
  return (f'<Annotations MicronsPerPixel="0.25"><Annotation Id="1"><Regions>'
          f'<RegionAttributeHeaders/>{regions}</Regions></Annotation></Annotations>')


def test_monuseg_official_test_layout(tmp_path):
  square = lambda x0, y0, x1, y1: [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
  polygons = [
      square(5, 5, 15, 15),  # 0: A, partly overwritten by 2
      [(1, 1), (9, 9)],  # 1: degenerate (2 vertices)
      square(10, 10, 20, 20),  # 2: B
      [(30.1, 30.1), (30.4, 30.1), (30.1, 30.4)],  # 3: degenerate (no pixel centre inside)
      square(25, 5, 35, 15),  # 4: C, wholly covered by 5
      square(24, 4, 36, 16),  # 5: C'
  ]
  folder = tmp_path / 'monuseg' / 'MoNuSegTestData'
  folder.mkdir(parents=True)
  stem = 'TCGA-AA-0000-01Z-00-DX1'
  tifffile.imwrite(folder / f'{stem}.tif', np.full((40, 40, 3), 200, np.uint8), photometric='rgb',
                   compression='lzw')
  (folder / f'{stem}.xml').write_text(_region_xml(polygons))
  root = tmp_path / 'monuseg'
  assert monuseg.available_subsets(root) == ['test']
  example, = monuseg.iter_examples(root, subset='test')
  _check_example(example)
  assert example['instances'].max() == 3 and example['group'] == 'TCGA-AA-0000'
  assert example['instances'][12, 12] == 2 and example['instances'][6, 6] == 1  # later wins
  report = monuseg.region_reports(root, subset='test')[stem]
  assert (report['degenerate'], report['covered'], report['instances']) == ([1, 3], [4], 3)
  assert datasets.list_image_ids('monuseg', data_root=tmp_path) == [stem]
  with pytest.raises(images.DataError, match='no train folder'):
    monuseg.list_ids(root, subset='train')


# CryoNuSeg -----------------------------------------------------------------------------------------

def test_cryonuseg_pilot_roi_counts(data_root):
  root = data_root / 'cryonuseg_pilot'
  assert cryonuseg.layout(root) == 'pilot'
  reports = cryonuseg.region_reports(root)
  examples = {e['id']: e for e in cryonuseg.iter_examples(root)}
  assert sorted(examples) == ['TCGA-DE-A4MA', 'TCGA-S4-A8RO']
  for image_id, example in examples.items():
    _check_example(example)
    with zipfile.ZipFile(root / f'{image_id}.zip') as outer:
      roi_zip = outer.read('RoiSet.zip')
    with zipfile.ZipFile(io.BytesIO(roi_zip)) as inner:
      names = [name for name in inner.namelist() if name.endswith('.roi')]
      rois = [np.asarray(roifile.ImagejRoi.frombytes(inner.read(n)).coordinates(), float)
              for n in names]
    roi_count = len(names)
    degenerate, covered = _independent_drops(rois, (512, 512), offset=-0.5)
    report = reports[image_id]
    assert (report['degenerate'], report['covered']) == (degenerate, covered)
    assert example['instances'].max() == roi_count - report['dropped']
  assert [examples[i]['instances'].max() for i in sorted(examples)] == [59, 116]


def _release_fixture(tmp_path):
  root = tmp_path / 'cryonuseg'
  (root / 'tissue images').mkdir(parents=True)
  tifffile.imwrite(root / 'tissue images' / 'Human_Larynx_01.tif',
                   np.full((32, 32, 3), 180, np.uint8), photometric='rgb')
  round2 = 'Annotator 1 (biologist second round of manual marks up)'
  masks = root / round2 / round2 / 'label masks modify'
  masks.mkdir(parents=True)
  labels = np.zeros((32, 32), np.uint16)
  labels[2:8, 2:8] = 5
  labels[20:30, 10:20] = 9
  tifffile.imwrite(masks / 'Human_Larynx_01.tif', labels)
  zips = root / 'Annotator 2 (bioinformatician)' / 'Annotator 2 (bioinformatician)' / 'imageJ_zips'
  zips.mkdir(parents=True)
  rois = [roifile.ImagejRoi.frompoints([[2, 2], [12, 2], [12, 12], [2, 12]], name='a'),
          roifile.ImagejRoi.frompoints([[20, 20], [21, 20]], name='b'),  # degenerate
          roifile.ImagejRoi.frompoints([[15, 15], [25, 15], [25, 25], [15, 25]], name='c')]
  roifile.roiwrite(zips / 'Human_Larynx_01.zip', rois)
  return root


def test_cryonuseg_release_layout(tmp_path):
  root = _release_fixture(tmp_path)
  assert cryonuseg.layout(root) == 'release'
  assert cryonuseg.list_ids(root) == ['Human_Larynx_01']
  example, = cryonuseg.iter_examples(root)  # annotator 1, second round: label masks
  _check_example(example)
  assert example['instances'].max() == 2 and example['instances'][25, 15] == 2
  assert cryonuseg.region_reports(root) == {}
  example, = cryonuseg.iter_examples(root, annotator='annotator2')  # ROI zips
  _check_example(example)
  assert example['instances'].max() == 2
  # ImageJ pixel centres sit at +0.5: the square [2, 12) covers pixels 2..11.
  assert example['instances'][2, 2] == 1 and example['instances'][11, 11] == 1
  assert example['instances'][12, 12] == 0 and example['instances'][1, 5] == 0
  report = cryonuseg.region_reports(root, annotator='annotator2')['Human_Larynx_01']
  assert (report['regions'], report['degenerate'], report['covered']) == (3, [1], [])
  with pytest.raises(images.DataError, match='annotator1_round1'):
    cryonuseg.list_ids(root, annotator='annotator1_round1')


# Synthetic -----------------------------------------------------------------------------------------

def test_synthetic_is_deterministic_varied_and_fast():
  first = synthetic.generate_example(3, size=256, seed=1)
  again = synthetic.generate_example(3, size=256, seed=1)
  for key in ('image', 'instances', 'points'):
    np.testing.assert_array_equal(first[key], again[key])
  other = synthetic.generate_example(4, size=256, seed=1)
  assert not np.array_equal(first['image'], other['image'])
  assert first['id'] == 'synthetic_003' and first['group'] == ''
  _check_example(first)
  start = time.process_time()
  big = [synthetic.generate_example(i, size=512) for i in range(3)]
  per_image = (time.process_time() - start) / 3
  assert per_image < 0.4, per_image  # about 0.1 s on an idle core; slack for a busy CI machine
  for example in big:
    _check_example(example)
    instances = example['instances']
    assert 40 < instances.max() < 400
    # Touching nuclei: two different instances side by side somewhere.
    left, right = instances[:, :-1], instances[:, 1:]
    assert np.any((left > 0) & (right > 0) & (left != right))
    radii = np.sqrt(np.bincount(instances.ravel())[1:] / np.pi)
    assert radii.min() < 5 and radii.max() > 10  # varied sizes


# Bad layouts ---------------------------------------------------------------------------------------

@pytest.mark.parametrize('reader, folder, layout_word', [
    (tnbc, 'tnbc', 'Slide_NN'), (consep, 'consep', 'Labels'), (monuseg, 'monuseg', 'Tissue Images'),
    (cryonuseg, 'cryonuseg', 'tissue images')])
def test_missing_or_mislaid_folder_names_path_and_layout(tmp_path, reader, folder, layout_word):
  with pytest.raises(images.DataError, match=re.escape(str(tmp_path / folder)) + '.*' + layout_word):
    reader.list_ids(tmp_path / folder)  # missing
  (tmp_path / folder / 'something else').mkdir(parents=True)
  with pytest.raises(images.DataError, match=re.escape(str(tmp_path / folder)) + '.*' + layout_word):
    reader.list_ids(tmp_path / folder)  # present but mis-laid


def test_missing_dataset_through_datasets_module(tmp_path):
  with pytest.raises(images.DataError, match=re.escape(str(tmp_path / 'tnbc')) + '.*Slide_NN'):
    datasets.list_image_ids('tnbc', data_root=tmp_path)
  with pytest.raises(images.DataError, match='cryonuseg_pilot'):
    datasets.load_examples('cryonuseg', data_root=tmp_path, tfds_dir=tmp_path / 'tfds')


def test_corrupt_image_in_a_dataset_names_the_file(data_root, tmp_path):
  root = tmp_path / 'tnbc'
  for kind in ('Slide_01', 'GT_01'):
    (root / kind).mkdir(parents=True)
    shutil.copy(data_root / 'tnbc' / 'TNBC_NucleiSegmentation' / kind / '01_1.png', root / kind)
  (root / 'Slide_01' / '01_1.png').write_bytes(b'\x89PNG\r\n\x1a\n broken')
  with pytest.raises(images.DataError, match=re.escape(str(root / 'Slide_01' / '01_1.png'))):
    list(tnbc.iter_examples(root))
