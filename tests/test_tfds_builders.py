"""TFDS builders (array_record, no TensorFlow) and `datasets.load_examples` reading them back."""

import re

import numpy as np
import PIL.Image
import pytest
import scipy.io
import tifffile

from donuseg_jax.data import datasets
from donuseg_jax.data import images
from donuseg_jax.data import synthetic
from donuseg_jax.data.builders.tnbc import tnbc_dataset_builder
from donuseg_jax.data.readers import tnbc


def test_tnbc_round_trip_through_tfds(data_root, tfds_dir):
  examples = datasets.load_examples('tnbc', data_root=data_root, tfds_dir=tfds_dir)
  assert (tfds_dir / 'tnbc' / '1.0.0').is_dir()
  assert len(list((tfds_dir / 'tnbc' / '1.0.0').glob('*.array_record*'))) >= 1
  assert len(examples) == 50
  assert [e['id'] for e in examples] == sorted(e['id'] for e in examples)
  assert sum(int(e['instances'].max()) for e in examples) == 4028
  assert sum(len(e['points']) for e in examples) == 4028
  first = examples[0]
  assert first['image'].dtype == np.uint8 and first['image'].shape == (512, 512, 3)
  assert first['instances'].dtype == np.int32 and first['points'].dtype == np.float32
  assert (first['id'], first['group']) == ('01_1', 'Slide_01')  # str, not bytes
  direct = next(tnbc.iter_examples(data_root / 'tnbc'))
  for key in ('image', 'instances', 'points'):
    np.testing.assert_array_equal(first[key], direct[key])
  assert datasets.list_image_ids('tnbc', data_root=data_root) == [e['id'] for e in examples]


def test_builder_without_raw_files_names_the_folder(tmp_path):
  from donuseg_jax.data.builders.consep import consep_dataset_builder
  builder = consep_dataset_builder.Builder(data_dir=str(tmp_path / 'tfds'), raw_dir=tmp_path / 'nope',
                                           file_format='array_record')
  with pytest.raises(images.DataError, match=re.escape(str(tmp_path / 'nope')) + '.*Labels'):
    datasets.prepare(builder)
  assert tnbc_dataset_builder.Builder.name == 'tnbc'


def test_synthetic_sizes_do_not_collide(tfds_dir):
  small = datasets.load_examples('synthetic', tfds_dir=tfds_dir, synthetic_images=2, synthetic_size=96)
  other = datasets.load_examples('synthetic', tfds_dir=tfds_dir, synthetic_images=3, synthetic_size=64)
  assert [e['image'].shape for e in small] == [(96, 96, 3)] * 2
  assert [e['image'].shape for e in other] == [(64, 64, 3)] * 3
  assert {p.name for p in (tfds_dir / 'synthetic').iterdir()} >= {'n2_s96_seed0', 'n3_s64_seed0'}
  expected = synthetic.generate_example(1, size=96)
  for key in ('image', 'instances', 'points'):
    np.testing.assert_array_equal(small[1][key], expected[key])
  assert small[1]['id'] == 'synthetic_001' and small[1]['group'] == ''
  # The predefined default config (40 tiles of 512) is reachable by the same call.
  builder = datasets.create_builder('synthetic', tfds_dir=tfds_dir)
  assert builder.builder_config.name == 'n40_s512_seed0' and builder.builder_config.num_images == 40


def test_cryonuseg_pilot_through_tfds(data_root, tfds_dir):
  examples = datasets.load_examples('cryonuseg', data_root=data_root, tfds_dir=tfds_dir)
  assert [e['id'] for e in examples] == ['TCGA-DE-A4MA', 'TCGA-S4-A8RO']
  assert [int(e['instances'].max()) for e in examples] == [59, 116]
  assert (tfds_dir / 'cryonuseg' / 'pilot' / '1.0.0').is_dir()


def _tiny_monuseg(root):
  square = '<Region Id="{0}"><Vertices><Vertex X="{1}" Y="{1}"/><Vertex X="{2}" Y="{1}"/>' \
           '<Vertex X="{2}" Y="{2}"/><Vertex X="{1}" Y="{2}"/></Vertices></Region>'
  layouts = {'train': (root / 'MoNuSeg 2018 Training Data' / 'Tissue Images',
                       root / 'MoNuSeg 2018 Training Data' / 'Annotations'),
             'test': (root / 'MoNuSegTestData',) * 2}
  for subset, (image_dir, xml_dir) in layouts.items():
    image_dir.mkdir(parents=True, exist_ok=True)
    xml_dir.mkdir(parents=True, exist_ok=True)
    for k in range(2 if subset == 'train' else 1):
      stem = f'TCGA-{subset[:2].upper()}-000{k}-01Z-00-DX1'
      tifffile.imwrite(image_dir / f'{stem}.tif', np.full((32, 32, 3), 190, np.uint8),
                       photometric='rgb', compression='lzw')
      regions = ''.join(square.format(i, 3 + 8 * i, 8 + 8 * i) for i in range(k + 2))
      (xml_dir / f'{stem}.xml').write_text(f'<Annotations><Annotation><Regions>{regions}'
                                           '</Regions></Annotation></Annotations>')


def test_monuseg_train_and_test_splits(tmp_path):
  _tiny_monuseg(tmp_path / 'monuseg')
  builder = datasets.create_builder('monuseg', data_root=tmp_path, tfds_dir=tmp_path / 'tfds')
  datasets.prepare(builder)
  assert {name: split.num_examples for name, split in builder.info.splits.items()} == {
      'train': 2, 'test': 1}
  test = datasets.load_examples('monuseg', data_root=tmp_path, tfds_dir=tmp_path / 'tfds',
                                subset='test')
  assert [e['id'] for e in test] == ['TCGA-TE-0000-01Z-00-DX1']
  assert test[0]['group'] == 'TCGA-TE-0000' and test[0]['instances'].max() == 2
  everything = datasets.load_examples('monuseg', data_root=tmp_path, tfds_dir=tmp_path / 'tfds')
  assert [int(e['instances'].max()) for e in everything] == [2, 2, 3]  # TE-0000, TR-0000, TR-0001
  with pytest.raises(ValueError, match='validation'):
    datasets.load_examples('monuseg', data_root=tmp_path, tfds_dir=tmp_path / 'tfds',
                           subset='validation')


def test_consep_official_splits_and_id_gaps(tmp_path):
  for split, count in (('Train', 2), ('Test', 1)):
    for k in range(1, count + 1):
      stem = f'{split.lower()}_{k}'
      (tmp_path / 'consep' / 'CoNSeP' / split / 'Images').mkdir(parents=True, exist_ok=True)
      (tmp_path / 'consep' / 'CoNSeP' / split / 'Labels').mkdir(parents=True, exist_ok=True)
      PIL.Image.fromarray(np.full((24, 24, 3), 150, np.uint8)).save(
          tmp_path / 'consep' / 'CoNSeP' / split / 'Images' / f'{stem}.png')
      inst_map = np.zeros((24, 24), np.int32)
      inst_map[2:6, 2:6] = 4  # ids with gaps: 4, 17
      inst_map[10:20, 10:14] = 17
      scipy.io.savemat(tmp_path / 'consep' / 'CoNSeP' / split / 'Labels' / f'{stem}.mat',
                       {'inst_map': inst_map})
  examples = datasets.load_examples('consep', data_root=tmp_path, tfds_dir=tmp_path / 'tfds')
  assert [e['id'] for e in examples] == ['test_1', 'train_1', 'train_2']
  for example in examples:
    assert sorted(np.unique(example['instances'])) == [0, 1, 2]
    np.testing.assert_array_equal(example['points'], [[4, 4], [12, 15]])
  assert datasets.list_image_ids('consep', data_root=tmp_path, subset='train') == ['train_1', 'train_2']
