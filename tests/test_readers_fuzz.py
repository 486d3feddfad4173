"""Fuzzing the readers with corrupted copies of small real files: a result or a DataError, nothing else.

Every reader that takes a user's or a dataset's file (images: PNG, LZW TIFF, JPEG, CMYK JPEG;
point files: CSV and GeoJSON; MoNuSeg XML; CoNSeP .mat; CryoNuSeg ImageJ ROI zips) gets small files
cut from the real datasets under the data root, then hypothesis-generated corruptions of them:
truncation, flipped bytes, inserted bytes, and sequences of these. Each outcome must be a well-formed
result or a `DataError` naming the file; any other exception fails the test, and so does a read that
takes longer than `HANG_S` or that kills the process (native decoders can crash on hostile bytes).
The reads therefore run in a worker process (multiprocessing, forkserver), restarted after a crash
or a hang, so that neither can take the test session down.
The sizes are kept small so that the whole file runs in well under a minute; set
DONUSEG_FUZZ_EXAMPLES (default 60 per reader) for a longer hunt.
"""

import copy
import io
import json
import pathlib
import multiprocessing
import os
import traceback
import xml.etree.ElementTree as ElementTree
import zipfile

import hypothesis
import hypothesis.strategies as st
import numpy as np
import PIL.Image
import pytest
import scipy.io
import skimage.measure
import tifffile

from donuseg_jax.data import images
from donuseg_jax.data import points as points_lib
from donuseg_jax.data.readers import consep
from donuseg_jax.data.readers import cryonuseg
from donuseg_jax.data.readers import monuseg
from donuseg_jax.data.readers import polygons

CROP = 32  # side of the image crops, in pixels
HANG_S = 10  # one read taking longer than this counts as a hang
ROI_SHAPE = (512, 512)  # the CryoNuSeg pilot tiles

FUZZ_SETTINGS = hypothesis.settings(
    max_examples=int(os.environ.get('DONUSEG_FUZZ_EXAMPLES', '60')),
    deadline=5000,  # ms per example; reads take milliseconds, but the machine may be busy
    suppress_health_check=[hypothesis.HealthCheck.too_slow, hypothesis.HealthCheck.data_too_large],
)


# Small real files ---------------------------------------------------------------------------------

def _png_bytes(array, mode=None):
  buffer = io.BytesIO()
  PIL.Image.fromarray(array, mode=mode).save(buffer, format='PNG')
  return buffer.getvalue()


def _tnbc_crop(data_root):
  slide = sorted((data_root / 'tnbc').rglob('Slide_01/*.png'))[0]
  mask = slide.parent.parent / 'GT_01' / slide.name
  image = np.asarray(PIL.Image.open(slide))[100:100 + CROP, 100:100 + CROP]  # RGBA, as shipped
  gt = np.asarray(PIL.Image.open(mask))[100:100 + CROP, 100:100 + CROP]
  return image, gt


def _monuseg_pair(data_root):
  folder = data_root / 'monuseg' / 'MoNuSeg 2018 Training Data'
  tif = sorted((folder / 'Tissue Images').glob('*.tif'))[0]
  return tif, folder / 'Annotations' / f'{tif.stem}.xml'


def _monuseg_xml_crop(xml_path, size=48, keep=4) -> bytes:
  """The real XML with only `keep` regions that fit one size x size window, moved into it."""
  tree = ElementTree.parse(xml_path)
  parents = {child: parent for parent in tree.iter() for child in parent}
  regions = list(tree.getroot().iter('Region'))

  def vertices(region):
    return np.array([(float(v.get('X')), float(v.get('Y'))) for v in region.iter('Vertex')])

  origin = vertices(regions[0]).min(axis=0) - 2
  kept = [r for r in regions
          if np.all((vertices(r) >= origin) & (vertices(r) < origin + size))][:keep]
  assert len(kept) >= 2, 'expected neighbouring regions in the MoNuSeg annotation'
  for region in regions:
    if region not in kept:
      parents[region].remove(region)
  for region in kept:
    for vertex in region.iter('Vertex'):
      vertex.set('X', f'{float(vertex.get("X")) - origin[0]:.4f}')
      vertex.set('Y', f'{float(vertex.get("Y")) - origin[1]:.4f}')
  return ElementTree.tostring(tree.getroot())


def _consep_mat_crop(data_root) -> bytes:
  mat = scipy.io.loadmat(str(data_root / 'consep' / 'CoNSeP' / 'Test' / 'Labels' / 'test_1.mat'))
  inst_map = mat['inst_map'][200:200 + CROP, 200:200 + CROP]
  ids = np.unique(inst_map)
  centroids = mat['inst_centroid'][ids[ids > 0][:8] - 1]
  buffer = io.BytesIO()
  scipy.io.savemat(buffer, {'inst_map': inst_map, 'inst_centroid': centroids})
  return buffer.getvalue()


def _cryonuseg_roi_zip(data_root, keep=3) -> bytes:
  pilot = sorted((data_root / 'cryonuseg_pilot').glob('*.zip'))[0]
  with zipfile.ZipFile(pilot) as outer:
    name = next(n for n in outer.namelist() if n.lower().endswith('roiset.zip'))
    with zipfile.ZipFile(io.BytesIO(outer.read(name))) as roiset:
      infos = [i for i in roiset.infolist() if i.filename.lower().endswith('.roi')][:keep]
      blobs = [(i, roiset.read(i)) for i in infos]
  buffer = io.BytesIO()
  with zipfile.ZipFile(buffer, 'w') as small:
    for info, blob in blobs:
      small.writestr(info.filename, blob, compress_type=info.compress_type)
  return buffer.getvalue()


@pytest.fixture(scope='module')
def originals(data_root):
  """name -> (file name, bytes) of every small real file fuzzed here."""
  image, gt = _tnbc_crop(data_root)
  rgb = np.ascontiguousarray(image[..., :3])
  tif_path, xml_path = _monuseg_pair(data_root)
  tif = tifffile.imread(tif_path)[300:300 + CROP, 300:300 + CROP]
  tif_buffer = io.BytesIO()
  tifffile.imwrite(tif_buffer, tif, photometric='rgb', compression='lzw')  # as MoNuSeg ships
  jpeg, cmyk = io.BytesIO(), io.BytesIO()
  PIL.Image.fromarray(rgb).save(jpeg, format='JPEG', quality=90)
  PIL.Image.fromarray(rgb).convert('CMYK').save(cmyk, format='JPEG', quality=90)
  instances = (gt[..., 0] if gt.ndim == 3 else gt) > 0
  centroids = points_lib.centroids_from_instances(skimage.measure.label(instances).astype(np.int32))
  assert len(centroids) >= 2, 'expected nuclei in the TNBC crop'
  csv_text = 'x,y,class\n' + ''.join(f'{x:g},{y:g},nucleus\n' for x, y in centroids)
  geojson = {'type': 'FeatureCollection', 'features': [
      {'type': 'Feature', 'id': f'p{k}', 'properties': {'objectType': 'annotation'},
       'geometry': {'type': 'Point', 'coordinates': [float(x) + 0.5, float(y) + 0.5]}}
      for k, (x, y) in enumerate(centroids)]}
  files = {
      'tnbc_png': ('slide.png', _png_bytes(image)),
      'tnbc_mask_png': ('mask.png', _png_bytes(gt)),
      'monuseg_tif': ('tile.tif', tif_buffer.getvalue()),
      'jpeg': ('tile.jpg', jpeg.getvalue()),
      'cmyk_jpeg': ('cmyk.jpg', cmyk.getvalue()),
      'points_csv': ('points.csv', csv_text.encode()),
      'points_geojson': ('points.geojson', json.dumps(geojson, indent=1).encode()),
      'monuseg_xml': ('annotation.xml', _monuseg_xml_crop(xml_path)),
      'consep_mat': ('labels.mat', _consep_mat_crop(data_root)),
      'cryonuseg_rois': ('RoiSet.zip', _cryonuseg_roi_zip(data_root)),
  }
  return files


# Readers and what a good result looks like ---------------------------------------------------------

def _read_image(path):
  image = images.read_image(path)
  assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3 and image.size


def _read_points(path):
  got = points_lib.read_points(path)
  assert got.dtype == np.float32 and got.ndim == 2 and got.shape[1] == 2
  assert np.all(np.isfinite(got))


def _read_xml(path):
  instances, report = monuseg.read_annotation(path, (64, 64))
  assert instances.dtype == np.int32 and instances.shape == (64, 64)
  assert report.instances == instances.max()


def _read_mat(path):
  inst_map = consep.read_inst_map(path)
  assert inst_map.dtype == np.int32 and inst_map.ndim == 2


def _read_rois(path):
  rois = cryonuseg.read_rois(path.read_bytes(), source=str(path))
  instances, _ = polygons.rasterise(rois, ROI_SHAPE, offset=-0.5)
  assert instances.dtype == np.int32 and instances.shape == ROI_SHAPE


READERS = {
    'tnbc_png': _read_image,
    'tnbc_mask_png': _read_image,
    'monuseg_tif': _read_image,
    'jpeg': _read_image,
    'cmyk_jpeg': _read_image,
    'points_csv': _read_points,
    'points_geojson': _read_points,
    'monuseg_xml': _read_xml,
    'consep_mat': _read_mat,
    'cryonuseg_rois': _read_rois,
}


# Corruptions ----------------------------------------------------------------------------------------

# Inserted bytes are random, or tokens that mean something to one of the formats (a fuzzing
# dictionary): JSON literals and brackets, CSV quotes and separators, numbers out of range, bytes
# that are not UTF-8, and the magic numbers of TIFF, PNG, JPEG and zip.
TOKENS = [b'null', b'NaN', b'-Infinity', b'true', b'"', b'[', b']', b'{', b'}', b',', b':', b'\n',
          b'\t', b'\x00', b'\xff\xfe', b'\xc3', b'1e999', b'-1', b'99999999999', b'\x7f\xff\xff\xff',
          b'\xff\xff\xff\xff', b'II*\x00', b'MM\x00*', b'\x89PNG', b'\xff\xd8\xff', b'PK\x03\x04',
          b'<Region>', b'</Vertex>', b'&', b'X="', b'"coordinates"', b'"type": "Point"']


@st.composite
def _corrupted(draw, data: bytes) -> bytes:
  """`data` after 1 to 3 corruptions: truncation, flipped bytes, inserted bytes or tokens."""
  data = bytearray(data)
  for _ in range(draw(st.integers(1, 3))):
    kind = draw(st.sampled_from(['truncate', 'flip', 'insert']))
    if kind == 'truncate':
      del data[draw(st.integers(0, max(0, len(data) - 1))):]
    elif kind == 'flip':
      for _ in range(draw(st.integers(1, 8))):
        if data:
          data[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
    else:
      at = draw(st.integers(0, len(data)))
      data[at:at] = draw(st.one_of(st.binary(min_size=1, max_size=32), st.sampled_from(TOKENS)))
  return bytes(data)


# Reads in a worker process ------------------------------------------------------------------------

def _serve(connection):
  """Worker loop: (reader name, path) in; ('ok' | 'data_error' | 'error', text) out."""
  while True:
    try:
      name, path = connection.recv()
    except EOFError:
      return
    try:
      if name != 'ping':  # 'ping': the warm-up, answered once the imports are done
        READERS[name](pathlib.Path(path))
      reply = ('ok', '')
    except images.DataError as error:
      reply = ('data_error', str(error))
    except BaseException:  # anything else is what this test looks for
      reply = ('error', traceback.format_exc(limit=-12))
    connection.send(reply)


class _Worker:
  """One reader process, restarted after it crashes or hangs."""

  def __init__(self):
    self._context = multiprocessing.get_context('forkserver')
    self._context.set_forkserver_preload(
        [__name__, 'donuseg_jax.data.images', 'donuseg_jax.data.points', 'scipy.io'])
    self._process = None

  def _start(self):
    self._connection, child = self._context.Pipe()
    self._process = self._context.Process(target=_serve, args=(child,), daemon=True)
    self._process.start()
    child.close()

  def stop(self):
    if self._process is not None:
      self._process.kill()
      self._process.join()
      self._connection.close()
      self._process = None

  def ping(self):
    self._start()
    self._connection.send(('ping', ''))
    assert self._connection.poll(120), 'the reader process did not start'
    assert self._connection.recv() == ('ok', '')

  def read(self, name: str, path) -> tuple[str, str]:
    """('ok' | 'data_error' | 'error', text), or ('crash' | 'hang', what happened)."""
    if self._process is None or not self._process.is_alive():
      self._start()
    self._connection.send((name, str(path)))
    # The first read after a start may wait for the worker's imports too.
    if self._connection.poll(HANG_S):
      try:
        return self._connection.recv()
      except EOFError:
        pass
      self._process.join(5)
      code = self._process.exitcode
      self.stop()
      self.ping()  # restart now: the next example's deadline should not pay for it
      return 'crash', f'the reader killed its process (exit code {code}; negative: signal)'
    self.stop()
    self.ping()
    return 'hang', f'no answer within {HANG_S} s'


@pytest.fixture(scope='module')
def worker():
  worker = _Worker()
  worker.ping()  # start it (and its imports) outside the examples' deadline
  yield worker
  worker.stop()


def _check_read(worker, name, path):
  status, text = worker.read(name, path)
  if status == 'data_error':
    assert path.name in text, f'DataError message does not name the file: {text}'
  else:
    assert status == 'ok', f'{name}: {status}: {text}'


@pytest.mark.parametrize('name', sorted(READERS))
def test_original_file_reads(originals, name, tmp_path):
  """The uncorrupted small files are good inputs: the fuzzing starts from a valid result."""
  file_name, data = originals[name]
  path = tmp_path / file_name
  path.write_bytes(data)
  READERS[name](path)


@pytest.mark.parametrize('name', sorted(READERS))
def test_corrupted_file_gives_result_or_data_error(originals, name, tmp_path_factory, worker):
  file_name, data = originals[name]
  path = tmp_path_factory.mktemp(name) / file_name

  @FUZZ_SETTINGS
  @hypothesis.given(st.data())
  def check(drawn):
    path.write_bytes(drawn.draw(_corrupted(data), label='corrupted file'))
    _check_read(worker, name, path)

  check()


def test_mat_with_corrupted_array_flags_is_a_data_error(originals, tmp_path, worker):
  """A flipped byte in a variable's array flags (the complex and global bits set) once killed the
  process inside scipy.io.loadmat (SIGSEGV); it must give a DataError."""
  file_name, data = originals['consep_mat']
  data = bytearray(data)
  flags_at = 128 + 8 + 8  # header, miMATRIX tag, array-flags tag: the flags word of variable 1
  assert data[128] == 14 and data[136] == 6, 'expected an uncompressed MAT v5 matrix first'
  data[flags_at + 1] = 0xFF
  path = tmp_path / file_name
  path.write_bytes(bytes(data))
  status, text = worker.read('consep_mat', path)
  assert status == 'data_error' and path.name in text, f'{status}: {text}'


# Structured corruptions of the point files ----------------------------------------------------------
# Byte-level damage mostly breaks the syntax (a clear "not valid JSON"); these keep the syntax and
# damage the content: any JSON value (strings, null, NaN, huge integers, nested lists, objects) where
# a coordinate, a geometry or a feature was, or a CSV cell replaced by odd text.

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=6)
    | st.sampled_from(['Point', 'MultiPoint', 'Feature', 'FeatureCollection', 'GeometryCollection']),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(
        st.sampled_from(['type', 'coordinates', 'geometry', 'geometries', 'features', 'id']),
        children, max_size=3),
    max_leaves=6)


def _json_slots(node):
  """(container, key) of every value inside a JSON document."""
  items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
  for key, value in list(items):
    yield node, key
    yield from _json_slots(value)


@st.composite
def _json_mutated(draw, document) -> bytes:
  document = copy.deepcopy(document)
  for _ in range(draw(st.integers(1, 3))):
    slots = list(_json_slots(document))
    if not slots:
      break
    container, key = draw(st.sampled_from(slots))
    if draw(st.booleans()):
      container[key] = draw(JSON_VALUES)
    else:
      del container[key]
  return json.dumps(document, allow_nan=True).encode()


CSV_CELLS = st.text(max_size=8) | st.sampled_from(
    ['nan', 'inf', '-inf', '1e999', '', ' ', '"', '"1,2"', '1e-999', '0x10', '1_0', 'x', 'y',
     '9' * 200_000])


@st.composite
def _csv_mutated(draw, text: str) -> bytes:
  rows = [line.split(',') for line in text.splitlines()]
  for _ in range(draw(st.integers(1, 3))):
    row = draw(st.integers(0, len(rows) - 1))
    kind = draw(st.sampled_from(['replace', 'drop', 'add']))
    if kind == 'drop' and rows[row]:
      del rows[row][draw(st.integers(0, len(rows[row]) - 1))]
    elif kind == 'add' or not rows[row]:
      rows[row].insert(draw(st.integers(0, len(rows[row]))), draw(CSV_CELLS))
    else:
      rows[row][draw(st.integers(0, len(rows[row]) - 1))] = draw(CSV_CELLS)
  return '\n'.join(','.join(row) for row in rows).encode('utf-8', 'surrogatepass')


def test_mutated_geojson_gives_result_or_data_error(originals, tmp_path, worker):
  file_name, data = originals['points_geojson']
  document = json.loads(data)
  path = tmp_path / file_name

  @FUZZ_SETTINGS
  @hypothesis.given(_json_mutated(document))
  def check(mutated):
    path.write_bytes(mutated)
    _check_read(worker, 'points_geojson', path)

  check()


def test_mutated_csv_gives_result_or_data_error(originals, tmp_path, worker):
  file_name, data = originals['points_csv']
  path = tmp_path / file_name

  @FUZZ_SETTINGS
  @hypothesis.given(_csv_mutated(data.decode()))
  def check(mutated):
    path.write_bytes(mutated)
    _check_read(worker, 'points_csv', path)

  check()
