"""The predict command: outputs on a real TNBC image, GeoJSON validity, bad inputs, the CLI."""

import csv
import json

import numpy as np
import pytest
import skimage.io
import tifffile
from scipy import ndimage
from skimage import measure

from configs import default
from donuseg_jax import predict
from donuseg_jax.inference import outputs

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


def check_outputs(output, stem, shape, *, min_instances=1, overlay='overlay'):
  labels = tifffile.imread(output / f'{stem}.instances.tif')
  assert labels.dtype == np.int32 and labels.shape == shape
  ids = np.unique(labels[labels > 0])
  assert len(ids) >= min_instances
  overlay = skimage.io.imread(output / f'{stem}.{overlay}.png')
  if overlay.shape[:2] == shape:
    assert overlay.shape == shape + (3,)
  if len(ids):
    assert (overlay == np.array(predict.OUTLINE_COLOR, np.uint8)).all(-1).any()
  collection = json.loads((output / f'{stem}.geojson').read_text())
  assert collection['type'] == 'FeatureCollection'
  assert len(collection['features']) == len(ids)
  objects = ndimage.find_objects(labels)
  assert len({feature['id'] for feature in collection['features']}) == len(ids)  # unique ids
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
    assert np.sum(x[:-1] * y[1:] - x[1:] * y[:-1]) > 0  # counter-clockwise in (x, y)
    # Every pixel of the instance (its centre at (j + 0.5, i + 0.5)) lies inside the polygon.
    rr, cc = np.nonzero(labels == props['measurements']['instance_id'])
    assert measure.points_in_poly(np.stack([cc + 0.5, rr + 0.5], 1), np.stack([x, y], 1)).all()
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
  assert summary == {'written': ['01_1'], 'skipped': [], 'failed': [], 'cut': 0}
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
  import jax.numpy as jnp  # noqa: PLC0415
  from donuseg_jax import train  # noqa: PLC0415

  workdir.mkdir(parents=True)
  (workdir / 'config.json').write_text(config.to_json_best_effort(indent=2) + '\n')
  _, state, _, _ = train.create_train_state(config, total_steps=1)
  state = state.replace(step=jnp.asarray(1, state.step.dtype))  # restore checks the saved step
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
  ring = outputs.instance_polygon(np.ones((1, 1), bool), (10, 20))  # one pixel: a diamond
  assert_valid_ring([tuple(p) for p in ring.tolist()])
  np.testing.assert_allclose(ring.min(0), [20, 10])
  np.testing.assert_allclose(ring.max(0), [21, 11])
  donut = np.ones((9, 9), bool)
  donut[3:6, 3:6] = False
  ring = outputs.instance_polygon(donut, (0, 0))  # the outer ring, not the hole
  np.testing.assert_allclose([ring[:, 0].min(), ring[:, 0].max()], [0, 9], atol=0.5)
  diagonal = np.eye(4, dtype=bool) | np.eye(4, k=1, dtype=bool)  # a staircase
  assert_valid_ring([tuple(p) for p in outputs.instance_polygon(diagonal, (0, 0)).tolist()])
  checker = np.zeros((4, 4), bool)
  checker[0, 0] = checker[1, 1] = True  # touching at a corner only: still one outline
  assert_valid_ring([tuple(p) for p in outputs.instance_polygon(checker, (0, 0)).tolist()])
  square = outputs.instance_polygon(np.ones((5, 5), bool), (0, 0))  # straight runs: 4 corners left
  assert len(square) == 9 and {tuple(p) for p in square.tolist()} >= {(0.0, 0.5), (4.5, 0.0)}
  with pytest.raises(AssertionError, match='intersect'):  # the checker itself catches a bow tie
    assert_valid_ring([(0, 0), (2, 2), (2, 0), (0, 2), (0, 0)])


@pytest.fixture(scope='module')
def mosaic(tnbc_image):
  """A 700 x 900 RGB image of real H&E (a TNBC tile, mirrored to fill)."""
  return np.pad(tnbc_image, ((0, 188), (0, 388), (0, 0)), mode='reflect')


def write_pyramid(path, image):
  with tifffile.TiffWriter(path) as tiff:
    tiff.write(image, subifds=2, photometric='rgb', tile=(128, 128), compression='zlib')
    for step in (2, 4):
      tiff.write(image[::step, ::step], subfiletype=1, photometric='rgb', tile=(128, 128),
                 compression='zlib')


def features(output, stem):
  collection = json.loads((output / f'{stem}.geojson').read_text())
  return sorted(((np.array(f['geometry']['coordinates'][0]), f['properties']['measurements'])
                 for f in collection['features']), key=lambda f: tuple(f[0].min(0)))


def test_pyramidal_tiff_is_predicted_by_tiles_with_a_label_pyramid_and_preview(
    mosaic, tmp_path, monkeypatch):
  path = tmp_path / 'slide.tif'
  write_pyramid(path, mosaic)
  monkeypatch.setattr(predict, 'SMALL_IMAGE_PIXELS', 1 << 16)  # this image counts as large
  monkeypatch.setattr(outputs, 'PREVIEW_SIDE', 256)
  monkeypatch.setattr(outputs, 'LABEL_TILE', 64)
  monkeypatch.setattr(outputs, 'LABEL_PYRAMID_SIDE', 256)
  summary = predict.predict_paths([path], tmp_path / 'out', predict_windows=DarknessNet(),
                                  config=default.get_config(), progress=False, tile=256,
                                  halo=64, label_map='yes')
  assert summary['written'] == ['slide'] and not summary['failed']
  out = tmp_path / 'out'
  labels = check_outputs(out, 'slide', (700, 900), min_instances=50, overlay='preview')
  preview = skimage.io.imread(out / 'slide.preview.png')
  assert preview.shape == (175, 225, 3)  # decimated by 4
  assert (preview == np.array(predict.OUTLINE_COLOR)).all(-1).mean() > 0.01
  assert not (out / 'slide.overlay.png').exists()
  with tifffile.TiffFile(out / 'slide.instances.tif') as tiff:
    levels = tiff.series[0].levels
    assert tiff.pages[0].is_tiled and [lv.shape for lv in levels] == [(700, 900), (350, 450)]
    np.testing.assert_array_equal(levels[1].asarray(), labels[::2, ::2])
  # No nucleus twice across the 3 x 4 tile borders: no two instances share a centroid.
  with open(out / 'slide.csv', newline='') as file:
    centres = np.array([[float(r['centroid_x']), float(r['centroid_y'])] for r in csv.DictReader(file)])
  gaps = np.sqrt(((centres[:, None] - centres[None]) ** 2).sum(-1)) + np.eye(len(centres)) * 1e9
  assert gaps.min() > 2.0
  assert sorted(p.name for p in out.iterdir()) == [
      'slide.csv', 'slide.done.json', 'slide.geojson', 'slide.instances.tif', 'slide.preview.png']


def test_levels_and_regions_give_level_zero_coordinates(mosaic, tmp_path):
  path = tmp_path / 'slide.tif'
  write_pyramid(path, mosaic)
  half = tmp_path / 'half.png'
  skimage.io.imsave(half, mosaic[::2, ::2], check_contrast=False)
  crop = tmp_path / 'crop.png'
  skimage.io.imsave(crop, mosaic[100:400, 200:520], check_contrast=False)
  cfg = default.get_config()
  run = dict(predict_windows=DarknessNet(), config=cfg, progress=False)
  predict.predict_paths([half, crop], tmp_path / 'ref', **run)
  predict.predict_paths([path], tmp_path / 'level1', level=1, **run)
  predict.predict_paths([path], tmp_path / 'region', region=(200, 100, 320, 300), **run)
  predict.predict_paths([path], tmp_path / 'both', level=1, region=(200, 100, 320, 300), **run)
  ref_half, ref_crop = features(tmp_path / 'ref', 'half'), features(tmp_path / 'ref', 'crop')
  got = features(tmp_path / 'level1', 'slide')
  assert len(got) == len(ref_half) > 20
  for (ring, props), (want, want_props) in zip(got, ref_half):
    np.testing.assert_allclose(ring, want * 2)  # level-1 pixels are 2 x 2 level-0 pixels
    assert props['area'] == want_props['area'] * 4
  got = features(tmp_path / 'region', 'slide')
  assert len(got) == len(ref_crop) > 10
  for (ring, _), (want, _) in zip(got, ref_crop):
    np.testing.assert_allclose(ring, want + [200, 100])
  assert tifffile.imread(tmp_path / 'region' / 'slide.instances.tif').shape == (300, 320)
  labels = tifffile.imread(tmp_path / 'both' / 'slide.instances.tif')
  assert labels.shape == (150, 160)  # level-1 pixels of the region
  for ring, _ in features(tmp_path / 'both', 'slide'):
    assert (ring.min(0) >= [200, 100]).all() and (ring.max(0) <= [520, 400]).all()


def test_a_rerun_skips_complete_outputs_and_a_crash_leaves_no_partial_file(tnbc_image, tmp_path):
  folder = tmp_path / 'in'
  folder.mkdir()
  for name in ('a', 'b'):
    skimage.io.imsave(folder / f'{name}.png', tnbc_image[:200, :240], check_contrast=False)
  out = tmp_path / 'out'
  run = dict(predict_windows=DarknessNet(), config=default.get_config(), progress=False)
  first = predict.predict_paths([folder], out, **run)
  assert first['written'] == ['a', 'b']
  again = predict.predict_paths([folder], out, **run)
  assert again['written'] == [] and again['skipped'] == ['a', 'b']
  assert predict.predict_paths([folder], out, overwrite=True, **run)['written'] == ['a', 'b']
  (out / 'a.csv').unlink()  # an output gone: a is not complete any more
  import os  # noqa: PLC0415
  stat = (folder / 'b.png').stat()
  os.utime(folder / 'b.png', ns=(stat.st_atime_ns, stat.st_mtime_ns + 10 ** 9))  # b changed
  assert predict.predict_paths([folder], out, **run)['written'] == ['a', 'b']
  assert predict.predict_paths([folder], out, tile=100, **run)['written'] == ['a', 'b']  # settings

  class Crash(DarknessNet):
    def __call__(self, images):
      if self.calls >= 1:
        raise RuntimeError('killed')
      return super().__call__(images)

  crashed = predict.predict_paths([folder / 'a.png'], tmp_path / 'crashed', tile=100, halo=16,
                                  predict_windows=Crash(), config=default.get_config(),
                                  progress=False)
  assert crashed['failed'] and 'RuntimeError: killed' in crashed['failed'][0][1]
  assert list((tmp_path / 'crashed').iterdir()) == []  # no final name, no temporary left


def test_command_line_errors_are_one_line_with_status_2(tmp_path, capsys):
  tile = tmp_path / 'tile.png'
  skimage.io.imsave(tile, np.zeros((40, 40, 3), np.uint8), check_contrast=False)
  base = ['--workdir', str(tmp_path), '--input', str(tile), '--output', str(tmp_path / 'out')]
  for extra, message in ((['--region', '1,2,3'], 'four integers'),
                         (['--region', '0,0,0,5'], 'w, h >= 1'),
                         (['--level', '-1'], '0 or more'),
                         (['--level', '1', '--mpp', '0.5'], 'not both'),
                         (['--tile', '0'], 'positive')):
    assert predict.main(base + extra) == 2
    err = capsys.readouterr().err
    assert message in err, err
  assert predict.main(['--workdir', str(tmp_path), '--input', str(tmp_path / 'none.png'),
                       '--output', str(tmp_path / 'out')]) == 2
  assert 'no usable input images' in capsys.readouterr().err
  (tmp_path / 'config.json').write_text('{"model": ')  # a damaged run
  assert predict.main(base) == 2
  err = capsys.readouterr().err
  assert err.startswith('error: cannot load the trained run') and err.count('\n') == 1


def test_region_outside_the_image_and_level_of_a_png_are_reported(tnbc_image, tmp_path):
  tile = tmp_path / 'tile.png'
  skimage.io.imsave(tile, tnbc_image[:64, :64], check_contrast=False)
  run = dict(predict_windows=DarknessNet(), config=default.get_config(), progress=False)
  summary = predict.predict_paths([tile], tmp_path / 'out', region=(100, 0, 10, 10), **run)
  assert 'outside the 64x64 image' in summary['failed'][0][1]
  summary = predict.predict_paths([tile], tmp_path / 'out', level=1, **run)
  assert 'not a pyramidal TIFF' in summary['failed'][0][1]


def test_write_outputs_of_an_in_memory_result(tnbc_image, tmp_path):
  """Training's report writes the outputs of predict_image results through the same writers."""
  from donuseg_jax.inference import predictor  # noqa: PLC0415

  result = predictor.predict_image(tnbc_image, predict_windows=DarknessNet(),
                                   config=default.get_config())
  predict.write_outputs(tnbc_image, result, tmp_path, 'tile')
  labels = check_outputs(tmp_path, 'tile', (512, 512), min_instances=20)
  np.testing.assert_array_equal(labels, result['instances'])
