"""Bad raw files: every one named in one pass (data summary), and nan/inf MoNuSeg vertices refused."""

import shutil

import pytest

from donuseg_jax.data import __main__ as data_cli
from donuseg_jax.data import images
from donuseg_jax.data.readers import monuseg


def _tnbc_copy(data_root, tmp_path):
  """Slide_01 and GT_01 of the real TNBC data, copied into DATA/tnbc/."""
  source = data_root / 'tnbc' / 'TNBC_NucleiSegmentation'
  target = tmp_path / 'data' / 'tnbc'
  for folder in ('Slide_01', 'GT_01'):
    shutil.copytree(source / folder, target / folder)
  return target


def test_summary_names_every_bad_file_in_one_run(data_root, tmp_path, capsys):
  tnbc = _tnbc_copy(data_root, tmp_path)
  names = sorted(p.name for p in (tnbc / 'Slide_01').glob('*.png'))
  assert len(names) >= 3
  truncated, unpaired, garbled = names[:3]
  data = (tnbc / 'Slide_01' / truncated).read_bytes()
  (tnbc / 'Slide_01' / truncated).write_bytes(data[:len(data) // 3])
  (tnbc / 'GT_01' / unpaired).unlink()
  (tnbc / 'GT_01' / garbled).write_bytes(b'not a png at all')
  status = data_cli.main(['summary', '--dataset', 'tnbc', '--data_dir', str(tmp_path / 'data'),
                          '--tfds_dir', str(tmp_path / 'tfds')])
  error = capsys.readouterr().err
  assert status == 2
  assert '3 problems' in error, error
  for path in (f'Slide_01/{truncated}', f'Slide_01/{unpaired}', f'GT_01/{garbled}'):
    assert path in error, (path, error)
  assert 'Traceback' not in error


@pytest.mark.parametrize('value', ['nan', 'inf', '-Infinity'])
def test_monuseg_vertex_at_nan_or_infinity_names_file_and_region(tmp_path, value):
  xml = tmp_path / 'TCGA-XX-0000-01Z-00-DX1.xml'
  xml.write_text(
      '<Annotations><Annotation><Regions>'
      '<Region Id="1"><Vertices><Vertex X="1" Y="1"/><Vertex X="5" Y="1"/><Vertex X="5" Y="5"/>'
      '</Vertices></Region>'
      f'<Region Id="7"><Vertices><Vertex X="1" Y="1"/><Vertex X="{value}" Y="2"/>'
      '<Vertex X="3" Y="3"/></Vertices></Region>'
      '</Regions></Annotation></Annotations>')
  with pytest.raises(images.DataError, match=r'Id=7 .*nan or infinity') as error:
    monuseg.read_polygons(xml)
  assert str(xml) in str(error.value)
