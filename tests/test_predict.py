"""The predict command: outputs on a real TNBC image, GeoJSON validity, bad inputs, the CLI."""

import csv
import json

import numpy as np
import pytest
import skimage.io
import tifffile
from scipy import ndimage

from configs import default
from donuseg_jax import predict

TNBC_IMAGE = 'tnbc/TNBC_NucleiSegmentation/Slide_01/01_1.png'
STRIDE = 8  # the stand-in detects on P3
DARK = 175.0  # TNBC nuclei are darker than this (grey level), most background is lighter


def dark_mask(images):
  """Nuclei (haematoxylin) are the dark pixels of an H&E image."""
  return np.asarray(images, np.float32).mean(-1) < DARK


class DarknessNet:
  """A stand-in network for H&E: segmentation = darkness; one P3 box per dark blob of a window."""

  def __init__(self):
    self.calls = 0

  def __call__(self, images):
    self.calls += 1
    batch, window = images.shape[:2]
    gray = np.asarray(images, np.float32).mean(-1)
    levels = []
    for s in (4, 8, 16, 32, 64):
      h = window // s
      levels.append({'logits': np.full((batch, h, h), -8.0, np.float32),
                     'ltrb': np.ones((batch, h, h, 4), np.float32),
                     'centerness': np.zeros((batch, h, h), np.float32)})
    p3 = levels[1]
    for b in range(batch):
      blobs, count = ndimage.label(ndimage.binary_opening(dark_mask(images[b]), iterations=2))
      for index, found in enumerate(ndimage.find_objects(blobs)):
        cy, cx = ndimage.center_of_mass(blobs[found] == index + 1)
        cy, cx = cy + found[0].start, cx + found[1].start
        i = int(np.clip(round((cy - STRIDE // 2) / STRIDE), 0, window // STRIDE - 1))
        j = int(np.clip(round((cx - STRIDE // 2) / STRIDE), 0, window // STRIDE - 1))
        x, y = j * STRIDE + STRIDE // 2, i * STRIDE + STRIDE // 2
        x0, x1 = found[1].start - 0.5, found[1].stop - 0.5
        y0, y1 = found[0].start - 0.5, found[0].stop - 0.5
        p3['logits'][b, i, j] = 6.0
        p3['ltrb'][b, i, j] = np.maximum([x - x0, y - y0, x1 - x, y1 - y], 1.0)
    return {'segmentation': (DARK - gray) / 8.0, 'detection': tuple(levels)}


def segments_intersect(p1, p2, p3, p4):
  """Closed segments p1p2 and p3p4 share a point (orientation test with collinear cases)."""
  def orient(a, b, c):
    value = (b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0])
    return 0 if abs(value) < 1e-12 else (1 if value > 0 else -1)

  def on_segment(a, b, c):
    return min(a[0], b[0]) <= c[0] <= max(a[0], b[0]) and min(a[1], b[1]) <= c[1] <= max(a[1], b[1])

  o1, o2, o3, o4 = orient(p1, p2, p3), orient(p1, p2, p4), orient(p3, p4, p1), orient(p3, p4, p2)
  if o1 != o2 and o3 != o4:
    return True
  return ((o1 == 0 and on_segment(p1, p2, p3)) or (o2 == 0 and on_segment(p1, p2, p4))
          or (o3 == 0 and on_segment(p3, p4, p1)) or (o4 == 0 and on_segment(p3, p4, p2)))


def assert_valid_ring(ring):
  assert len(ring) >= 4 and ring[0] == ring[-1], 'ring not closed or too short'
  edges = list(zip(ring[:-1], ring[1:]))
  n = len(edges)
  for a in range(n):
    for b in range(a + 1, n):
      if b == a + 1 or (a == 0 and b == n - 1):
        continue  # neighbours share a vertex
      assert not segments_intersect(*edges[a], *edges[b]), f'edges {a} and {b} intersect'
  x, y = np.array(ring).T
  assert abs(np.sum(x[:-1] * y[1:] - x[1:] * y[:-1])) > 0


def check_outputs(output, stem, shape, *, min_instances=1):
  labels = tifffile.imread(output / f'{stem}.instances.tif')
  assert labels.dtype == np.int32 and labels.shape == shape
  ids = np.unique(labels[labels > 0])
  assert len(ids) >= min_instances
  overlay = skimage.io.imread(output / f'{stem}.overlay.png')
  assert overlay.shape == shape + (3,)
  if len(ids):
    assert (overlay == np.array(predict.OUTLINE_COLOR, np.uint8)).all(-1).any()
  collection = json.loads((output / f'{stem}.geojson').read_text())
  assert collection['type'] == 'FeatureCollection'
  assert len(collection['features']) == len(ids)
  objects = ndimage.find_objects(labels)
  for feature in collection['features']:
    props = feature['properties']
    assert feature['geometry']['type'] == 'Polygon'
    assert props['objectType'] == 'detection' and props['classification']['name'] == 'Nucleus'
    assert 0 < props['measurements']['score'] <= 1
    rings = feature['geometry']['coordinates']
    assert len(rings) == 1
    assert_valid_ring([tuple(p) for p in rings[0]])
    # The outline hugs its instance: pixel (i, j) covers [j, j + 1) x [i, i + 1) in QuPath.
    found = objects[props['measurements']['instance_id'] - 1]
    x, y = np.array(rings[0]).T
    assert found[1].start - 1e-6 <= x.min() <= found[1].start + 0.5
    assert found[1].stop - 0.5 <= x.max() <= found[1].stop + 1e-6
    assert found[0].start - 1e-6 <= y.min() <= found[0].start + 0.5
    assert found[0].stop - 0.5 <= y.max() <= found[0].stop + 1e-6
  with open(output / f'{stem}.csv', newline='') as file:
    rows = list(csv.DictReader(file))
  assert [int(r['id']) for r in rows] == list(ids)
  for row in rows[:20]:
    mask = labels == int(row['id'])
    assert int(row['area']) == mask.sum()
    rr, cc = np.nonzero(mask)
    assert abs(float(row['centroid_x']) - cc.mean()) < 1e-3
    assert (int(row['bbox_x0']), int(row['bbox_x1'])) == (cc.min(), cc.max() + 1)
  return labels


@pytest.fixture(scope='module')
def tnbc_image(data_root):
  return skimage.io.imread(data_root / TNBC_IMAGE)[..., :3]


def test_predict_paths_on_a_real_tnbc_image(data_root, tmp_path):
  net = DarknessNet()
  summary = predict.predict_paths([data_root / TNBC_IMAGE], tmp_path / 'out', predict_windows=net,
                                  config=default.get_config(), progress=False)
  assert summary == {'written': ['01_1'], 'failed': []}
  check_outputs(tmp_path / 'out', '01_1', (512, 512), min_instances=20)
  assert net.calls == 1  # one 576 x 576 window (throughput windows; 256 / 128 took 16)


def test_bad_files_in_a_folder_do_not_stop_the_others(tnbc_image, tmp_path):
  folder = tmp_path / 'in'
  folder.mkdir()
  crop = tnbc_image[:96, :120]
  skimage.io.imsave(folder / 'good.png', crop, check_contrast=False)
  tifffile.imwrite(folder / 'deep.tif', crop.astype(np.uint16) * 257)  # 16-bit: converted
  skimage.io.imsave(folder / 'gray.jpg', crop.mean(-1).astype(np.uint8), check_contrast=False)
  (folder / 'empty.png').write_bytes(b'')
  (folder / 'junk.tif').write_text('not an image')
  skimage.io.imsave(folder / 'dot.png', crop[:1, :1], check_contrast=False)
  (folder / 'notes.txt').write_text('ignored: not an image suffix')
  summary = predict.predict_paths([folder, tmp_path / 'missing.png'], tmp_path / 'out',
                                  predict_windows=DarknessNet(), config=default.get_config(),
                                  progress=False)
  assert sorted(summary['written']) == ['deep', 'good', 'gray']
  failed = {name.split('/')[-1]: message for name, message in summary['failed']}
  assert set(failed) == {'empty.png', 'junk.tif', 'dot.png', 'missing.png'}
  assert 'empty' in failed['empty.png'] and 'too small' in failed['dot.png']
  assert 'cannot decode' in failed['junk.tif'] and 'no such' in failed['missing.png']
  good = check_outputs(tmp_path / 'out', 'good', (96, 120))
  np.testing.assert_array_equal(check_outputs(tmp_path / 'out', 'deep', (96, 120)), good)


def test_unwritable_output_is_reported_before_any_work(tmp_path, capsys):
  blocker = tmp_path / 'a_file'
  blocker.write_text('x')
  net = DarknessNet()
  with pytest.raises(OSError, match='not writable'):
    predict.predict_paths([tmp_path], blocker / 'out', predict_windows=net,
                          config=default.get_config(), progress=False)
  assert net.calls == 0
  # The command stops before loading the model (this work dir does not even exist).
  code = predict.main(['--workdir', str(tmp_path / 'no_run'), '--input', str(tmp_path),
                       '--output', str(blocker / 'out')])
  assert code == 2 and 'not writable' in capsys.readouterr().err
  tile = tmp_path / 'tile.png'
  skimage.io.imsave(tile, np.zeros((40, 40, 3), np.uint8), check_contrast=False)
  code = predict.main(['--workdir', str(tmp_path / 'no_run'), '--input', str(tile),
                       '--output', str(tmp_path / 'out')])
  assert code == 2 and 'not a training work dir' in capsys.readouterr().err


def write_smoke_run(workdir, config):
  """A training work dir as train.py leaves it (config.json + an Orbax checkpoint), untrained."""
  from donuseg_jax import checkpoints  # noqa: PLC0415 (imports JAX and the model)
  from donuseg_jax import train  # noqa: PLC0415

  workdir.mkdir(parents=True)
  (workdir / 'config.json').write_text(config.to_json_best_effort(indent=2) + '\n')
  _, state, _, _ = train.create_train_state(config, total_steps=1)
  ckpts = checkpoints.RunCheckpoints(workdir, async_save=False)
  ckpts.save_latest(1, state, {'step': 1})
  ckpts.wait()
  ckpts.close()
  return workdir


@pytest.mark.slow
def test_predict_command_with_a_smoke_checkpoint(tnbc_image, tmp_path, capsys):
  config = default.get_config('smoke')
  # An untrained head's class probabilities are ~0.01: a zero threshold makes it find "nuclei".
  config.eval.score_threshold = 0.0
  workdir = write_smoke_run(tmp_path / 'run', config)
  skimage.io.imsave(tmp_path / 'tile.png', tnbc_image[:100, :140], check_contrast=False)
  (tmp_path / 'broken.png').write_bytes(b'\x89PNG broken')
  code = predict.main(['--workdir', str(workdir), '--input', str(tmp_path / 'tile.png'),
                       str(tmp_path / 'broken.png'), '--output', str(tmp_path / 'out')])
  assert code == 1  # one input failed; the other was written
  err = capsys.readouterr().err
  assert 'broken.png' in err and 'tile.png' not in err
  check_outputs(tmp_path / 'out', 'tile', (100, 140))


def test_polygons_of_awkward_shapes():
  ring = predict.instance_polygon(np.ones((1, 1), bool), (10, 20))  # one pixel: a diamond
  assert_valid_ring([tuple(p) for p in ring.tolist()])
  np.testing.assert_allclose(ring.min(0), [20, 10])
  np.testing.assert_allclose(ring.max(0), [21, 11])
  donut = np.ones((9, 9), bool)
  donut[3:6, 3:6] = False
  ring = predict.instance_polygon(donut, (0, 0))  # the outer ring, not the hole
  np.testing.assert_allclose([ring[:, 0].min(), ring[:, 0].max()], [0, 9], atol=0.5)
  diagonal = np.eye(4, dtype=bool) | np.eye(4, k=1, dtype=bool)  # a staircase
  assert_valid_ring([tuple(p) for p in predict.instance_polygon(diagonal, (0, 0)).tolist()])
  checker = np.zeros((4, 4), bool)
  checker[0, 0] = checker[1, 1] = True  # touching at a corner only: still one outline
  assert_valid_ring([tuple(p) for p in predict.instance_polygon(checker, (0, 0)).tolist()])
  square = predict.instance_polygon(np.ones((5, 5), bool), (0, 0))  # straight runs: 4 corners left
  assert len(square) == 9 and {tuple(p) for p in square.tolist()} >= {(0.0, 0.5), (4.5, 0.0)}
  with pytest.raises(AssertionError, match='intersect'):  # the checker itself catches a bow tie
    assert_valid_ring([(0, 0), (2, 2), (2, 0), (0, 2), (0, 0)])
