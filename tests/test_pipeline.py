"""Training input: batch contract, consistent augmentations, determinism, resume, shards."""

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from configs import default
from donuseg_jax.data import augment
from donuseg_jax.data import batch as batch_lib
from donuseg_jax.data import pipeline

CROP = 32
MAX_POINTS = 24


def make_example(index: int, *, height: int = 72, width: int = 96, count: int = 12) -> dict:
  """Disk nuclei (later ones overwrite earlier ones); point k = the pixel of nucleus k + 1 nearest
  its centroid, so it lies inside its nucleus. Red channel = instance id, to check alignment."""
  rng = np.random.default_rng(index)
  instances = np.zeros((height, width), np.int32)
  ys, xs = np.mgrid[:height, :width]
  for k in range(count):
    cy, cx = rng.uniform(0, height), rng.uniform(0, width)
    instances[np.hypot(ys - cy, xs - cx) <= rng.uniform(2, 6)] = k + 1
  instances = np.unique(instances, return_inverse=True)[1].reshape(height, width).astype(np.int32)
  points = []
  for k in range(1, instances.max() + 1):
    rows, cols = np.nonzero(instances == k)
    nearest = np.argmin((rows - rows.mean()) ** 2 + (cols - cols.mean()) ** 2)
    points.append((cols[nearest], rows[nearest]))
  image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
  image[..., 0] = instances
  points = np.array(points, np.float32).reshape(-1, 2)
  return {'image': image, 'instances': instances, 'points': points, 'id': f'toy_{index}',
          'group': ''}


def make_config(**data):
  config = default.get_config('smoke').unlock()
  config.data.crop_size = CROP
  config.data.max_points = MAX_POINTS
  config.data.batch_size = 4
  config.data.color_jitter = 'none'
  config.data.update(data)
  return config.lock()


@pytest.fixture(scope='module')
def prepared():
  # The last image is smaller than the crop: padded to 32 x 40.
  examples = [make_example(i) for i in range(3)] + [make_example(9, height=20, width=40, count=4)]
  return pipeline.prepare_images(examples, config=make_config())


def batches_for(prepared, **kwargs):
  return pipeline.TrainBatches(prepared, config=make_config(**kwargs))


def test_contract_and_steps_per_epoch(prepared):
  batches = batches_for(prepared, color_jitter='hed')
  batch = batches.batch_at(0)
  batch_lib.check_train_batch(batch, crop_size=CROP, max_points=MAX_POINTS)
  assert set(batch) == set(batch_lib.TRAIN_BATCH_SPEC)
  # Slots: 3 images of ceil(72/32) * ceil(96/32) = 9, one padded to 32x40 -> 2; 29 / 4 -> 8 steps.
  assert pipeline.steps_per_epoch(prepared, crop_size=CROP, batch_size=4) == 8
  assert batches.steps_per_epoch == 8
  # One epoch of samples visits every image as often as it has slots.
  images = [batches.sample_image(g) for g in range(29)]
  assert np.bincount(images).tolist() == [9, 9, 9, 2]


def test_augmentations_keep_points_in_their_nuclei(prepared):
  batches = batches_for(prepared)
  valid_total = 0
  for index in range(160):
    sample = batches.sample(index)
    source = prepared[sample['image_index']]
    valid = sample['point_valid']
    valid_total += valid.sum()
    # Red channel = instance map (or padding): image and instances moved together.
    red = sample['image'][..., 0]
    assert ((red == sample['instances']) | ((red == 255) & (sample['label_m'] == -1))).all()
    cols, rows = np.floor(sample['points'][valid] + 0.5).astype(int).T
    assert ((rows >= 0) & (rows < CROP) & (cols >= 0) & (cols < CROP)).all()
    ids = sample['instances'][rows, cols]
    np.testing.assert_array_equal(ids, sample['point_index'][valid] + 1)  # its own nucleus
    assert (sample['label_m'][rows, cols] == 1).all()
    boxes = sample['boxes'][valid]
    x, y = sample['points'][valid].T
    assert ((boxes[:, 0] <= x) & (x <= boxes[:, 2]) & (boxes[:, 1] <= y) & (y <= boxes[:, 3])).all()
    assert boxes.min(initial=0) >= -0.5 and boxes.max(initial=0) <= CROP - 0.5
    np.testing.assert_array_equal(sample['box_valid'], valid)
    # Every point whose pixel lies in the window is there (no more than MAX_POINTS here).
    y0, x0 = sample['window']
    pix = np.floor(source['points'] + 0.5)
    inside = ((pix[:, 0] >= x0) & (pix[:, 0] < x0 + CROP) &
              (pix[:, 1] >= y0) & (pix[:, 1] < y0 + CROP))
    assert valid.sum() == inside.sum()
  assert valid_total > 200  # the check above ran on many points


def test_m_and_boxes_are_whole_image_and_transform_with_the_crop(prepared):
  batches = batches_for(prepared)
  for index in range(20):
    sample = batches.sample(index)
    source = prepared[sample['image_index']]
    y0, x0 = sample['window']
    window = np.s_[y0:y0 + CROP, x0:x0 + CROP]
    valid = sample['point_valid']
    keep = sample['point_index'][valid]
    boxes = np.clip(source['boxes'][keep] - [x0, y0, x0, y0], -0.5, CROP - 0.5).astype(np.float32)

    def explains(hflip, vflip, rot):
      move = lambda a: augment.transform_array(a, hflip=hflip, vflip=vflip, rot=rot)
      moved = augment.transform_boxes(boxes, CROP, hflip=hflip, vflip=vflip, rot=rot)
      return (np.array_equal(move(source['label_m'][window]), sample['label_m'])
              and np.array_equal(move(source['instances'][window]), sample['instances'])
              and np.allclose(moved, sample['boxes'][valid], atol=1e-5))

    # One dihedral transform maps the source window, its M and its boxes onto the sample.
    assert any(explains(*g) for g in itertools.product([False, True], [False, True], range(4)))


def test_same_seed_same_batches_and_resume(prepared):
  first = batches_for(prepared, color_jitter='hed', seed=3)
  stream = first.iterate(0, prefetch=2)
  uninterrupted = [next(stream) for _ in range(10)]  # crosses the epoch boundary (8 steps)
  stream.close()
  resumed = batches_for(prepared, color_jitter='hed', seed=3)  # a fresh start
  for step in (0, 7, 8, 9):
    for key, value in resumed.batch_at(step).items():
      np.testing.assert_array_equal(value, uninterrupted[step][key], err_msg=f'{step} {key}')
  again = resumed.iterate(7, prefetch=0)
  np.testing.assert_array_equal(next(again)['image'], uninterrupted[7]['image'])
  other = batches_for(prepared, color_jitter='hed', seed=4).batch_at(0)
  assert not np.array_equal(other['image'], uninterrupted[0]['image'])
  assert not np.array_equal(uninterrupted[1]['image'], uninterrupted[0]['image'])


def test_process_shards_concatenate_to_the_global_batch(prepared):
  config = make_config(color_jitter='rgb')
  whole = pipeline.TrainBatches(prepared, config=config).batch_at(5)
  for count in (2, 4):
    parts = [pipeline.TrainBatches(prepared, config=config, process_index=i,
                                   process_count=count).batch_at(5)
             for i in range(count)]
    assert parts[0]['image'].shape[0] == 4 // count
    for key in batch_lib.TRAIN_BATCH_SPEC:
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])
  with pytest.raises(ValueError, match='cannot be split'):
    pipeline.TrainBatches(prepared, config=config, process_index=0, process_count=3)


def test_small_image_is_padded(prepared):
  tiny = prepared[3]
  assert tiny['image'].shape == (32, 40, 3) and tiny['shape'] == (20, 40)
  assert (tiny['label_m'][20:] == -1).all() and (tiny['instances'][20:] == 0).all()
  assert (tiny['image'][20:] == pipeline.PAD_VALUE).all()
  batches = pipeline.TrainBatches([tiny], config=make_config(batch_size=2, max_points=8))
  batch_lib.check_train_batch(batches.batch_at(0), crop_size=CROP, max_points=8)
  with pytest.raises(ValueError, match='smaller than the crop'):
    pipeline.TrainBatches([tiny], config=make_config(crop_size=64))


def test_image_without_points_trains_as_background():
  example = make_example(1, count=0)
  assert example['points'].shape == (0, 2)
  prepared = pipeline.prepare_images([example], config=make_config())
  batch = batches_for(prepared).batch_at(0)
  assert np.isin(batch['label_m'], [0, -1]).all() and (batch['label_m'] == 0).any()
  assert not batch['point_valid'].any() and not batch['box_valid'].any()


def test_max_points_keeps_the_first_points():
  example = make_example(2, height=40, width=40, count=40)
  config = make_config(crop_size=40, batch_size=1, max_points=5)
  batches = pipeline.TrainBatches(pipeline.prepare_images([example], config=config), config=config)
  sample = batches.sample(0)
  assert sample['point_valid'].sum() == 5
  np.testing.assert_array_equal(sample['point_index'][:5], np.arange(5))


def test_bad_examples_name_the_problem():
  example = make_example(3)
  example['points'] = np.concatenate([example['points'], [[500., 3.]]]).astype(np.float32)
  with pytest.raises(ValueError, match=r'toy_3: point \d+ \(x=500, y=3\) lies outside'):
    pipeline.prepare_images([example], config=make_config())
  example = make_example(3)
  example['image'] = example['image'][..., 0]
  with pytest.raises(ValueError, match='toy_3: image must be'):
    pipeline.prepare_images([example], config=make_config())
  with pytest.raises(ValueError, match='unknown colour jitter'):
    pipeline.TrainBatches(pipeline.prepare_images([make_example(3)], config=make_config()),
                          config=make_config(color_jitter='hsv'))


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 15), st.booleans(), st.booleans(), st.integers(0, 3))
def test_point_and_array_transforms_agree(size_offset, hflip, vflip, rot):
  size = 4 + size_offset
  rng = np.random.default_rng(size)
  points = rng.integers(0, size, (6, 2)).astype(np.float32)
  marks = np.zeros((size, size), np.int32)
  marks[points[:, 1].astype(int), points[:, 0].astype(int)] = np.arange(1, 7)
  moved = augment.transform_array(marks, hflip=hflip, vflip=vflip, rot=rot)
  new = augment.transform_points(points, size, hflip=hflip, vflip=vflip, rot=rot).astype(int)
  # Later duplicates overwrite earlier marks: compare where the mark is the point's own.
  own = marks[points[:, 1].astype(int), points[:, 0].astype(int)] == np.arange(1, 7)
  np.testing.assert_array_equal(moved[new[:, 1], new[:, 0]][own], np.arange(1, 7)[own])
  extent = np.array([[-0.5, -0.5, size - 0.5, size - 0.5]], np.float32)
  np.testing.assert_array_equal(
      augment.transform_boxes(extent, size, hflip=hflip, vflip=vflip, rot=rot), extent)


def test_color_jitter():
  example = make_example(4)
  rng = np.random.default_rng(0)
  # H&E-like colours: pink stroma, purple nuclei, with noise.
  image = np.where(example['instances'][..., None] > 0, [110, 60, 150], [235, 190, 215])
  image = np.clip(image + rng.integers(-10, 11, image.shape), 0, 255).astype(np.uint8)
  same = augment.hed_jitter(image, scale=np.ones(3), shift=np.zeros(3))
  np.testing.assert_array_equal(same, image)  # the round trip is exact (no stain clipping)
  np.testing.assert_array_equal(augment.hed_jitter(example['image'], scale=np.ones(3),
                                                   shift=np.zeros(3)), example['image'])
  for mode in ('hed', 'rgb'):
    out = augment.color_jitter(image, mode=mode, rng=rng)
    assert out.dtype == np.uint8 and out.shape == image.shape
    change = np.abs(out.astype(int) - image).mean()
    assert 0.1 < change < 30, (mode, change)
  assert augment.color_jitter(image, mode='none', rng=rng) is image


def test_synthetic_points_keep_their_nucleus_through_augmentation():
  from donuseg_jax.data import synthetic
  config = make_config(crop_size=64, max_points=64, color_jitter='hed')
  prepared = pipeline.prepare_images([synthetic.generate_example(i, size=96) for i in range(2)],
                                     config=config)
  batches = pipeline.TrainBatches(prepared, config=config)
  checked = 0
  for index in range(40):
    sample = batches.sample(index)
    source = prepared[sample['image_index']]
    src_cols, src_rows = np.floor(source['points'] + 0.5).astype(int).T
    valid = sample['point_valid']
    cols, rows = np.floor(sample['points'][valid] + 0.5).astype(int).T
    expected = source['instances'][src_rows, src_cols][sample['point_index'][valid]]
    np.testing.assert_array_equal(sample['instances'][rows, cols], expected)
    checked += valid.sum()
  assert checked > 20
