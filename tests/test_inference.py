"""Sliding-window inference with stand-in networks whose outputs are known exactly."""

import ml_collections
import numpy as np
import pytest
from scipy import ndimage
from scipy import special

from configs import default
from donuseg_jax import trained_run
from donuseg_jax.inference import detections as detections_lib
from donuseg_jax.inference import predictor
from donuseg_jax.inference import windows

STRIDES = (4, 8, 16, 32, 64)
MARKER = (255, 0, 255)  # a pixel of this colour is a "nucleus" for the stand-in detector
HALF = 10.0  # the stand-in's ltrb


def pointwise_logit(images):
  """Segmentation logit of each pixel, a function of its own value only."""
  x = np.asarray(images, np.float32)
  return (x[..., 0] - 2 * x[..., 1] + 0.5 * x[..., 2]) / 64.0


class StandIn:
  """A network: pointwise segmentation; a P3 detection (ltrb = 10) at every MARKER location."""

  def __init__(self, segmentation=pointwise_logit):
    self.segmentation = segmentation
    self.shapes = []

  def __call__(self, images):
    self.shapes.append(images.shape)
    levels = []
    for n, s in enumerate(STRIDES):
      centres = images[:, s // 2::s, s // 2::s]  # (b, h, w, 3) pixel at each FCOS location
      hit = (centres == np.array(MARKER, np.uint8)).all(-1) & (s == 8)
      levels.append({'logits': np.where(hit, 8.0, -8.0).astype(np.float32),
                     'ltrb': np.full(hit.shape + (4,), HALF, np.float32),
                     'centerness': np.full(hit.shape, 4.0, np.float32)})
    return {'segmentation': self.segmentation(images), 'detection': tuple(levels)}


def random_image(height, width, seed=0):
  # Values below 250 never equal MARKER by chance.
  return np.random.default_rng(seed).integers(0, 250, (height, width, 3), dtype=np.uint8)


def config(**eval_overrides):
  cfg = default.get_config()
  for key, value in eval_overrides.items():
    setattr(cfg.eval, key, value)
  return cfg


def sliding(image, net, *, core_only=True, cfg=None):
  ev = (cfg or config()).eval
  return windows.predict_sliding(image, predict_windows=net, window=ev.window, stride=ev.stride,
                                 batch_size=ev.batch_size, score_threshold=ev.score_threshold,
                                 max_detections=ev.max_detections, core_only=core_only)


@pytest.mark.parametrize('height, width', [(256, 256), (1000, 1000), (700, 513), (30, 41)])
def test_stitching_reproduces_a_pointwise_network(height, width):
  image = random_image(height, width)
  net = StandIn()
  probability, _ = sliding(image, net)
  assert probability.shape == (height, width) and probability.dtype == np.float32
  np.testing.assert_allclose(probability, special.expit(pointwise_logit(image)), atol=2e-6, rtol=0)
  # Every call gets a full batch (one compilation); together they hold every window once.
  rows = windows.axis_layout(height, window=256, stride=128)
  cols = windows.axis_layout(width, window=256, stride=128)
  count = len(rows.starts) * len(cols.starts)
  assert all(shape == (8, 256, 256, 3) for shape in net.shapes)
  assert len(net.shapes) == -(-count // 8)


def test_layout_covers_the_image_with_margins():
  for length in (1, 2, 100, 256, 257, 383, 384, 385, 1000):
    layout = windows.axis_layout(length, window=256, stride=128)
    assert layout.before == 64 and layout.after >= 64
    assert layout.padded == layout.before + length + layout.after
    assert layout.starts[0] == 0 and layout.padded - layout.starts[-1] == 256
    # Each real pixel is owned by exactly one window core, and that core is inside its window.
    owner = windows.core_owner(np.arange(length) + layout.before, layout, stride=128)
    assert (layout.starts[owner] <= np.arange(length) + layout.before).all()
    assert (np.arange(length) + layout.before < layout.starts[owner] + 256).all()


def test_blending_has_no_seams_between_windows_that_disagree():
  """Each window predicts its own constant; the stitched map changes smoothly between them."""
  height, width = 1000, 700
  yy, xx = np.mgrid[:height, :width]
  image = np.zeros((height, width, 3), np.uint8)
  image[..., 0] = (255 * (xx + yy) / (height + width)).astype(np.uint8)  # a ramp: windows differ

  def per_window_constant(images):
    means = images[..., 0].astype(np.float32).mean(axis=(1, 2))  # (b,)
    return np.broadcast_to(((means - 128) / 16)[:, None, None], images.shape[:3]).copy()

  probability, _ = sliding(image, StandIn(per_window_constant))
  window_values = special.expit((image[..., 0].astype(np.float32) - 128) / 16)
  assert np.ptp(window_values) > 0.9  # the windows really disagree (hard tiles would show steps)
  steps = max(np.abs(np.diff(probability, axis=0)).max(), np.abs(np.diff(probability, axis=1)).max())
  assert steps < 0.02, steps
  assert np.isfinite(probability).all()


def marked_image(height, width, points):
  image = random_image(height, width, seed=1)
  for x, y in points:
    image[y, x] = MARKER
  return image


def expected_boxes(points, height, width):
  boxes = np.array([[x - HALF, y - HALF, x + HALF, y + HALF] for x, y in points], np.float32)
  boxes[:, 0::2] = boxes[:, 0::2].clip(-0.5, width - 0.5)
  boxes[:, 1::2] = boxes[:, 1::2].clip(-0.5, height - 0.5)
  return boxes


def sort_boxes(boxes):
  return boxes[np.lexsort(boxes.T[::-1])]


def test_detections_are_mapped_to_image_coordinates_and_merged():
  # FCOS locations at stride 8 fall on image pixels = 4 (mod 8): the margin (64) is a multiple of 8.
  height, width = 700, 513
  points = [(500, 300), (4, 4), (508, 692), (132, 260)]  # (132, 260): on window borders
  image = marked_image(height, width, points)
  want = sort_boxes(expected_boxes(points, height, width))

  _, every = sliding(image, StandIn(), core_only=False)
  assert len(every.scores) > len(points)  # overlapping windows find the same nucleus again
  keep = detections_lib.nms(every.boxes, every.scores, iou_threshold=0.44)
  np.testing.assert_allclose(sort_boxes(every.boxes[keep]), want, atol=1e-5)

  _, owned = sliding(image, StandIn(), core_only=True)  # one window decodes each location
  np.testing.assert_allclose(sort_boxes(owned.boxes), want, atol=1e-5)
  np.testing.assert_allclose(owned.scores, np.sqrt(special.expit(8.0) * special.expit(4.0)),
                             rtol=1e-6)

  result = predictor.predict_image(image, predict_windows=StandIn(), config=config())
  np.testing.assert_allclose(sort_boxes(result['boxes']), want, atol=1e-5)
  assert result['instances'].shape == (height, width) and result['instances'].dtype == np.int32


def test_mirrored_detections_in_the_padding_are_dropped():
  image = marked_image(256, 256, [(4, 4)])
  _, found = sliding(image, StandIn(), core_only=False)
  # The reflect padding mirrors the marker to (-4, -4) etc.; those locations lie outside the image.
  assert (found.locations >= 0).all() and len(found.scores) >= 1
  np.testing.assert_allclose(np.unique(found.boxes, axis=0), expected_boxes([(4, 4)], 256, 256))


def test_decode_scores_boxes_and_cap():
  window = 32
  levels = []
  for s in STRIDES[:3]:
    h = window // s
    levels.append({'logits': np.full((2, h, h), -9.0, np.float32),
                   'ltrb': np.ones((2, h, h, 4), np.float32) * np.array([1, 2, 3, 4], np.float32),
                   'centerness': np.zeros((2, h, h), np.float32)})
  levels[0]['logits'][0, 1, 2] = 2.0  # stride 4: location (x=10, y=6)
  levels[0]['logits'][0, 3, 3] = 1.0
  levels[1]['logits'][0, 0, 1] = 3.0  # stride 8: location (x=12, y=4)
  levels[2]['logits'][1, 1, 0] = 0.1  # prob 0.525 > 0.5, stride 16: (x=8, y=24)
  found = detections_lib.decode_detections(levels, window=window, score_threshold=0.5,
                                           max_detections=2)
  assert len(found) == 2
  first, second = found
  np.testing.assert_allclose(first.locations, [[12, 4], [10, 6]])  # best two of three, by score
  np.testing.assert_allclose(first.scores, np.sqrt(special.expit([3.0, 2.0]) * 0.5), rtol=1e-6)
  np.testing.assert_allclose(first.boxes[0], [11, 2, 15, 8])
  np.testing.assert_allclose(second.locations, [[8, 24]])
  with pytest.raises(ValueError, match='does not tile'):
    detections_lib.decode_detections(levels, window=30, score_threshold=0.5, max_detections=2)


def test_nms_keeps_best_and_respects_threshold():
  boxes = np.array([[0, 0, 10, 10],  # score 0.9
                    [0, 0, 10, 20],  # IoU 0.5 with the first: suppressed
                    [0, 0, 10, 5],  # IoU 0.5 with the first, but a worse score: suppressed
                    [6, 0, 16, 10],  # IoU 0.25: kept
                    [50, 50, 60, 60]], np.float32)
  scores = np.array([0.9, 0.8, 0.3, 0.7, 0.95], np.float32)
  np.testing.assert_array_equal(detections_lib.nms(boxes, scores, iou_threshold=0.44), [4, 0, 3])
  np.testing.assert_array_equal(detections_lib.nms(boxes, scores, iou_threshold=0.5), [4, 0, 1, 3, 2])
  assert detections_lib.nms(np.zeros((0, 4)), np.zeros(0), iou_threshold=0.5).size == 0


def naive_nms(boxes, scores, threshold):
  """Textbook greedy NMS, one IoU at a time."""
  def iou(a, b):
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - ix * iy
    return ix * iy / union if union > 0 else 0.0
  keep = []
  for k in sorted(range(len(scores)), key=lambda k: -scores[k]):  # stable: ties by index
    if all(iou(boxes[k], boxes[m]) <= threshold for m in keep):
      keep.append(k)
  return keep


def test_nms_matches_the_textbook_loop_on_crowded_boxes():
  rng = np.random.default_rng(3)
  for trial in range(5):
    count = 400
    x, y = rng.uniform(0, 150, count), rng.uniform(0, 150, count)
    w, h = rng.uniform(2, 30, count), rng.uniform(2, 30, count)
    boxes = np.stack([x, y, x + w, y + h], 1).astype(np.float32)
    boxes[:399:7] = boxes[1::7]  # exact duplicates
    scores = np.round(rng.uniform(0, 1, count), 2).astype(np.float32)  # ties
    want = naive_nms(boxes.astype(np.float64), scores.astype(np.float64), 0.44)
    np.testing.assert_array_equal(detections_lib.nms(boxes, scores, iou_threshold=0.44), want)


def test_overlapping_pairs_in_small_chunks_find_every_pair_once():
  rng = np.random.default_rng(0)
  x = rng.uniform(0, 50, 60)
  boxes = np.stack([x, x * 0, x + rng.uniform(0, 10, 60), x * 0 + 1], 1)
  boxes[5] = boxes[6]
  got = []
  for i, j in detections_lib.overlapping_pairs(boxes, chunk_pairs=7):
    got += [tuple(sorted(p)) for p in zip(i.tolist(), j.tolist())]
  want = [(a, b) for a in range(60) for b in range(a + 1, 60)
          if min(boxes[a, 2], boxes[b, 2]) > max(boxes[a, 0], boxes[b, 0])]
  assert sorted(got) == sorted(want) and len(set(got)) == len(got)


def test_bad_images_are_rejected_clearly():
  net = StandIn()
  with pytest.raises(ValueError, match='too small'):
    predictor.predict_image(np.zeros((1, 1, 3), np.uint8), predict_windows=net, config=config())
  with pytest.raises(ValueError, match='RGB'):
    predictor.predict_image(np.zeros((20, 20, 4), np.uint8), predict_windows=net, config=config())
  with pytest.raises(ValueError, match='uint8'):
    predictor.predict_image(np.zeros((20, 20, 3), np.uint16), predict_windows=net, config=config())


BLUR = 3  # the neighbourhood stand-in's radius (a 7 x 7 box)


def neighbourhood_logit(images):
  """A logit that depends on a 7 x 7 neighbourhood, computed inside each window with zeros beyond
  its edges: right only where the window holds the whole neighbourhood."""
  return ndimage.uniform_filter(pointwise_logit(images), size=(1, 2 * BLUR + 1, 2 * BLUR + 1),
                                mode='constant')


@pytest.mark.parametrize('window, stride, blend', [
    (128, 64, 'ramp'), (128, 96, 'ramp'), (128, 112, 'ramp'), (192, 128, 'ramp'),
    (128, 96, 'crop'), (128, 80, 'crop'), (128, 97, 'crop')])
def test_blending_crops_window_edges_and_pads_by_reflection(window, stride, blend):
  """Stitched = the neighbourhood function of the reflect-padded image, exactly: window edges
  (where the stand-in saw zeros) get no weight, and the padding mirrors without repeating the edge."""
  image = random_image(300, 233, seed=4)
  probability, _ = windows.predict_sliding(
      image, predict_windows=StandIn(neighbourhood_logit), window=window, stride=stride,
      batch_size=4, score_threshold=0.5, max_detections=10, blend=blend)
  want = special.expit(ndimage.uniform_filter(pointwise_logit(image), size=2 * BLUR + 1,
                                              mode='mirror'))  # scipy 'mirror' = numpy 'reflect'
  np.testing.assert_allclose(probability, want, atol=1e-5, rtol=0)
  # The test can tell: Hann weights (never zero at the window edges) leave errors there.
  hann, _ = windows.predict_sliding(
      image, predict_windows=StandIn(neighbourhood_logit), window=window, stride=stride,
      batch_size=4, score_threshold=0.5, max_detections=10, blend='hann')
  assert np.abs(hann - want).max() > 1e-4  # 40x the tolerance above


def test_ramp_profiles_are_a_partition_of_unity_at_any_stride():
  for window, stride in ((128, 64), (128, 96), (256, 224), (1024, 960), (64, 64)):
    profile = windows.blend_profile(window, stride, 'ramp')
    overlap = window - stride
    assert (profile[:overlap // 4] == 0).all() and profile.max() == 1
    total = np.zeros(window + 3 * stride)
    for k in range(4):
      total[k * stride:k * stride + window] += profile
    np.testing.assert_allclose(total[window - stride + overlap:3 * stride + overlap // 2], 1.0,
                               atol=1e-12)
  with pytest.raises(ValueError, match='unknown blend'):
    windows.blend_profile(64, 32, 'gauss')


def test_ramp_blending_has_no_seams_but_cropping_does():
  height, width = 900, 800
  yy, xx = np.mgrid[:height, :width]
  image = np.zeros((height, width, 3), np.uint8)
  image[..., 0] = (255 * (xx + yy) / (height + width)).astype(np.uint8)

  def per_window_constant(images):
    means = images[..., 0].astype(np.float32).mean(axis=(1, 2))
    return np.broadcast_to(((means - 128) / 16)[:, None, None], images.shape[:3]).copy()

  def steps(blend):
    probability, _ = windows.predict_sliding(
        image, predict_windows=StandIn(per_window_constant), window=256, stride=192,
        batch_size=8, score_threshold=0.5, max_detections=10, blend=blend)
    return max(np.abs(np.diff(probability, axis=0)).max(),
               np.abs(np.diff(probability, axis=1)).max())
  assert steps('ramp') < 0.03
  assert steps('crop') > 0.1  # hard tiles show steps: the measure bites


def test_window_settings_fit_small_images_and_fill_batches():
  ev = config().eval
  assert ev.windows == 'throughput' and (ev.max_window, ev.margin) == (1024, 32)
  small = windows.window_settings(ev, 512, 512)  # one window of 512 + 2 * 32 -> 576
  assert small == windows.WindowSettings(576, 512, 'ramp', 1)
  assert windows.window_settings(ev, 1000, 1000).window == 576  # 2 x 2 windows: 1.3 MP, not 4.2
  assert windows.window_settings(ev, 1500, 900).window == 576  # 3 x 2: 2.0 MP; 2 x 1024: 2.1 MP
  big = windows.window_settings(ev, 4800, 4800)  # 5 x 5 windows of 1024 at stride 960, exactly
  assert (big.window, big.stride, big.batch_size) == (1024, 960, 1)  # 8 x 256^2 pixels a call
  ev.max_window, ev.batch_size = 256, 8
  assert windows.window_settings(ev, 3000, 3000).batch_size == 8
  assert windows.window_settings(ev, 100, 300) == windows.WindowSettings(192, 128, 'ramp', 3)  # 1 x 3
  ev.windows = 'fixed'
  assert windows.window_settings(ev, 512, 512) == windows.WindowSettings(256, 128, 'hann', 8)
  # A run saved before the window fields existed reads them as trained_run.ADDED_FIELDS says.
  old = trained_run.with_added_fields({'eval': {'window': 256, 'stride': 128, 'batch_size': 8}})
  assert windows.window_settings(ml_collections.ConfigDict(old['eval']), 512, 512).window == 576
  ev.windows, ev.max_window = 'throughput', 1000
  with pytest.raises(ValueError, match='multiple of 64'):
    windows.window_settings(ev, 512, 512)


def test_windows_are_sharded_over_the_devices():
  import jax  # noqa: PLC0415

  devices = jax.local_devices()
  assert len(devices) == 4  # conftest's fake CPU devices

  @jax.jit
  def forward(params, batch_stats, images):
    logits = images.astype(np.float32).mean(-1) * params['scale'] + batch_stats['shift']
    return {'segmentation': logits, 'detection': ({'logits': logits[:, ::8, ::8]},)}

  predict_windows = predictor.make_predict_windows(
      None, {'scale': np.float32(2.0)}, {'shift': np.float32(1.0)}, forward_windows=forward)
  assert predict_windows.device_count == 4
  images = random_image(6 * 16, 16).reshape(6, 16, 16, 3)  # 6 windows: padded to 8, then cut
  outputs = predict_windows(images)
  assert outputs['segmentation'].shape == (6, 16, 16)
  np.testing.assert_allclose(outputs['segmentation'], images.mean(-1) * 2 + 1, rtol=1e-6)
  full = predict_windows(np.concatenate([images, images[:2]]))
  assert len(full['segmentation'].sharding.device_set) == 4  # split over every device
  single = predictor.make_predict_windows(None, {'scale': np.float32(2.0)},
                                          {'shift': np.float32(1.0)}, forward_windows=forward,
                                          devices=devices[:1])
  assert single.device_count == 1
  np.testing.assert_allclose(single(images)['segmentation'], outputs['segmentation'], rtol=1e-6)


def test_flip_views_and_their_mean_invert_each_other():
  images = random_image(3 * 12, 10).reshape(3, 12, 10, 3)
  views = np.asarray(predictor.flip_views(images))
  assert views.shape == (12, 12, 10, 3)
  np.testing.assert_array_equal(views[3:6], images[:, :, ::-1])
  np.testing.assert_array_equal(views[6:9], images[:, ::-1])
  np.testing.assert_array_equal(views[9:], images[:, ::-1, ::-1])
  # A map that is not flip-equivariant: each view's cumulative sum along its rows.
  maps = np.cumsum(views[..., 0].astype(np.float32), axis=2)
  want = (maps[:3] + maps[3:6, :, ::-1] + maps[6:9, ::-1] + maps[9:, ::-1, ::-1]) / 4
  np.testing.assert_allclose(np.asarray(predictor.mean_of_flips(maps)), want, rtol=1e-6)
  assert not np.allclose(want, maps[:3])  # the test would notice a mean of unflipped maps


def test_flip_tta_averages_the_real_network_over_flipped_windows():
  from flax import nnx  # noqa: PLC0415

  from donuseg_jax import models  # noqa: PLC0415

  config = default.get_config('smoke')
  graphdef, params, batch_stats = nnx.split(models.create_model(config, rngs=nnx.Rngs(0)),
                                            nnx.Param, nnx.BatchStat)
  images = random_image(2 * 64, 64).reshape(2, 64, 64, 3)
  plain = predictor.make_forward_windows(graphdef)
  tta = predictor.make_forward_windows(graphdef, flips=True)(params, batch_stats, images)
  views = [images, images[:, :, ::-1], images[:, ::-1], images[:, ::-1, ::-1]]
  logits = [np.asarray(plain(params, batch_stats, np.ascontiguousarray(v))['segmentation'])
            for v in views]
  want = (logits[0] + logits[1][:, :, ::-1] + logits[2][:, ::-1] + logits[3][:, ::-1, ::-1]) / 4
  np.testing.assert_allclose(np.asarray(tta['segmentation']), want, rtol=1e-4, atol=1e-5)
  assert not np.allclose(want, logits[0], atol=1e-4)  # the flips really change the output
  detection = plain(params, batch_stats, images)['detection']
  for got, level in zip(tta['detection'], detection):  # detection: the windows as they are
    for key in level:
      np.testing.assert_allclose(np.asarray(got[key]), np.asarray(level[key]), rtol=1e-4, atol=1e-5)


def test_unclaimed_foreground_setting_reaches_the_assembly():
  # A blob the segmentation finds and no detection covers: dropped as [code], kept when asked.
  image = random_image(120, 160, seed=3)
  rows, cols = np.mgrid[:120, :160]
  blob = (rows - 60) ** 2 + (cols - 80) ** 2 <= 8 ** 2

  def blob_logit(images):
    b, h, w = images.shape[:3]
    logit = np.full((b, h, w), -5.0, np.float32)
    for k in range(b):  # the blob wherever this window shows its dark marker colour
      logit[k][(images[k] == np.array([0, 0, 1], np.uint8)).all(-1)] = 5.0
    return logit

  image[blob] = (0, 0, 1)
  plain = predictor.predict_image(image, predict_windows=StandIn(blob_logit), config=config())
  assert plain['instances'].max() == 0
  kept = predictor.predict_image(image, predict_windows=StandIn(blob_logit),
                                 config=config(unclaimed_min_px=20))
  assert kept['instances'].max() == 1 and (kept['instances'][blob] == 1).all()
  np.testing.assert_array_equal(kept['instance_scores'], np.float32([0.0]))
