"""Training input: whole images -> fixed-shape batches of augmented crops (batch.TRAIN_BATCH_SPEC).

1. `prepare_images` computes the initial label M and the LUDA pseudo boxes once per whole image
   (before any cropping, DESIGN.md section 2) and pads images smaller than the crop at the bottom /
   right: the image with white (255, the colour of the empty glass of a slide, so the padding holds
   no unlabelled nucleus-like texture that reflection would create), M with -1 (ignored: the
   padding is neither nucleus nor tissue background) and instances with 0.
2. `TrainBatches.batch_at(step)` is a pure function of (data seed, step): resuming at step k gives
   the batches of an uninterrupted run, and `iterate` only prefetches it in a thread.

Sampling. Each image owns ceil(H/S) * ceil(W/S) slots (S = crop side), so an epoch, one pass over
all slots, sees every training image's area about once; `steps_per_epoch` = ceil(slots / B). The
samples form one stream: epoch e is a permutation of the slots seeded by (seed, e), and global
sample g = step * B + row is slot g mod |slots| of epoch g // |slots| (a batch may straddle two
epochs). Sample g draws its crop position (uniform), flips, quarter turns and colour jitter from a
generator seeded by (seed, g) alone, so a process that builds only its rows of the global batch
(`process_index` / `process_count`, for several hosts) gets the same rows as a single process.

Partial annotation. An example may carry `region` ((H, W) bool, True = annotated; `data.regions`).
Outside it nothing is known, so nothing there may act as background: `prepare_image` sets M to -1
(ignored) and paints the image white (PAD_VALUE), exactly as the padding of a small image. Every
loss then sees outside the region only empty glass, never unclicked tissue called background (the
FCOS detection loss has no ignore mask: it calls every location without a box negative; the CAMs
behind DCS and CCL find no nucleus on white). Such an image owns max(1, ceil(annotated pixels /
S^2)) slots, and its crops are drawn around an annotated pixel chosen uniformly (the crop is then
uniform among the positions that hold that pixel), so every crop holds annotated area.

Points. A point belongs to the crop when its pixel (round half up) does; the first `max_points`
such points (in the image's point order) are kept, the rest dropped. Boxes are the whole-image
boxes of the kept points, translated and clipped to the crop extent [-0.5, S - 0.5].
"""

import collections
import concurrent.futures
import math
from collections.abc import Iterator, Sequence

import ml_collections
import numpy as np

from donuseg_jax.data import augment
from donuseg_jax.data import batch as batch_lib
from donuseg_jax.data import points as points_lib
from donuseg_jax.data import pseudo_labels
from donuseg_jax.data import regions

PAD_VALUE = 255  # image padding: white, as empty glass


def prepare_image(example: dict, *, labels: ml_collections.ConfigDict, crop_size: int) -> dict:
  """One whole-image example -> dict with M and boxes, padded to at least crop_size per side.

  Returns image (H', W', 3) uint8, label_m (H', W') int8, instances (H', W') int32, points (K, 2)
  float32, boxes (K, 4) float32, id, group, and shape (H, W) before padding.
  """
  image = np.asarray(example['image'])
  name = example.get('id', '')
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
    raise ValueError(f'{name}: image must be (H, W, 3) uint8, got {image.dtype}{image.shape}')
  height, width = image.shape[:2]
  instances = example.get('instances')
  instances = (np.zeros((height, width), np.int32) if instances is None
               else np.asarray(instances, np.int32))
  if instances.shape != (height, width):
    raise ValueError(f'{name}: instances {instances.shape} do not match image {image.shape}')
  points = np.asarray(example['points'], np.float32).reshape(-1, 2)
  points_lib.check_points_inside(points, (height, width), name or 'example')
  label_m = pseudo_labels.make_initial_label(image, points, labels=labels)
  region = example.get('region')
  if region is not None:
    region = np.asarray(region, bool)
    if region.shape != (height, width):
      raise ValueError(f'{name}: region {region.shape} does not match image {image.shape}')
    if not regions.points_inside(points, region).all():
      raise ValueError(f'{name}: points outside the annotated region (readers drop them)')
    label_m = np.where(region, label_m, batch_lib.IGNORE).astype(np.int8)
    image = np.where(region[..., None], image, np.uint8(PAD_VALUE))
  boxes = pseudo_labels.pseudo_boxes(
      points, (height, width), ratio=labels.box_ratio, range_split=labels.box_range_split,
      s_min=labels.box_min, s_max=labels.box_max)
  pad = ((0, max(0, crop_size - height)), (0, max(0, crop_size - width)))
  if pad[0][1] or pad[1][1]:
    image = np.pad(image, pad + ((0, 0),), constant_values=PAD_VALUE)
    label_m = np.pad(label_m, pad, constant_values=batch_lib.IGNORE)
    instances = np.pad(instances, pad, constant_values=0)
    region = None if region is None else np.pad(region, pad, constant_values=False)
  return {'image': image, 'label_m': label_m, 'instances': instances, 'points': points,
          'boxes': boxes, 'id': name, 'group': example.get('group', ''), 'shape': (height, width),
          'region': region}


def prepare_images(examples: Sequence[dict], *, config: ml_collections.ConfigDict) -> list[dict]:
  """`prepare_image` for every example; `config` is the full config (labels and data sections)."""
  return [prepare_image(e, labels=config.labels, crop_size=config.data.crop_size)
          for e in examples]


def image_slots(prepared: Sequence[dict], *, crop_size: int) -> np.ndarray:
  """(sum of slots,) int64: image index of each slot, ceil(H/S) * ceil(W/S) slots per image
  (max(1, ceil(annotated pixels / S^2)) for an image with a region)."""
  counts = [math.ceil(p['image'].shape[0] / crop_size) * math.ceil(p['image'].shape[1] / crop_size)
            if p.get('region') is None else max(1, math.ceil(p['region'].sum() / crop_size ** 2))
            for p in prepared]
  return np.repeat(np.arange(len(prepared)), counts)


def steps_per_epoch(prepared: Sequence[dict], *, crop_size: int, batch_size: int) -> int:
  """ceil(sum over images of ceil(H/S) * ceil(W/S) / B): one pass over every image's area."""
  return math.ceil(len(image_slots(prepared, crop_size=crop_size)) / batch_size)


class TrainBatches:
  """Deterministic, resumable training batches (see the module docstring)."""

  def __init__(self, prepared: Sequence[dict], *, config: ml_collections.ConfigDict,
               process_index: int = 0, process_count: int = 1):
    """`prepared` from `prepare_images`; `config` the full config (its data section is used)."""
    data = config.data
    if not prepared:
      raise ValueError('no training images')
    if data.color_jitter not in augment.COLOR_JITTERS:
      raise ValueError(f'unknown colour jitter {data.color_jitter!r}; '
                       f'expected one of {augment.COLOR_JITTERS}')
    if data.batch_size % process_count or not 0 <= process_index < process_count:
      raise ValueError(f'global batch {data.batch_size} cannot be split into {process_count} '
                       f'processes (process {process_index})')
    small = [p['id'] for p in prepared if min(p['image'].shape[:2]) < data.crop_size]
    if small:
      raise ValueError(f'images smaller than the crop {data.crop_size} (use prepare_images): '
                       f'{small[:3]}')
    self.prepared = list(prepared)
    self.crop_size = data.crop_size
    self.batch_size = data.batch_size
    self.max_points = data.max_points
    self.color_jitter = data.color_jitter
    self.seed = data.seed
    self.process_index = process_index
    self.process_count = process_count
    self.slots = image_slots(self.prepared, crop_size=self.crop_size)
    self.steps_per_epoch = math.ceil(len(self.slots) / self.batch_size)
    self._orders = {}  # epoch -> slot permutation
    # Partially annotated images: annotated pixels counted up to each row's end, to draw one.
    self._region_rows = [None if p.get('region') is None else np.cumsum(p['region'].sum(axis=1))
                         for p in self.prepared]

  @property
  def local_batch_size(self) -> int:
    return self.batch_size // self.process_count

  def _epoch_order(self, epoch: int) -> np.ndarray:
    """Slot permutation of one epoch (cached: consecutive steps share it)."""
    order = self._orders.get(epoch)
    if order is None:
      order = np.random.default_rng([self.seed, 0, epoch]).permutation(len(self.slots))
      self._orders = {epoch: order, **dict(list(self._orders.items())[:1])}  # keep two epochs
    return order

  def sample_image(self, index: int) -> int:
    """Image index of global sample `index`."""
    epoch, position = divmod(index, len(self.slots))
    return int(self.slots[self._epoch_order(epoch)[position]])

  def sample(self, index: int) -> dict:
    """Global sample `index`: one augmented crop with padded points and boxes (no batch axis).

    Besides the batch keys it holds, for diagnostics and tests, `image_index`, `window` (y0, x0)
    and `point_index` (N,) (the source row of each point, -1 for padding).
    """
    rng = np.random.default_rng([self.seed, 1, index])
    image_index = self.sample_image(index)
    source = self.prepared[image_index]
    size = self.crop_size
    y0, x0 = self._crop_origin(image_index, rng)
    hflip, vflip = bool(rng.integers(2)), bool(rng.integers(2))
    rot = int(rng.integers(4))
    geometry = dict(hflip=hflip, vflip=vflip, rot=rot)
    window = np.s_[y0:y0 + size, x0:x0 + size]

    pixels = pseudo_labels.point_pixels(source['points'])  # (K, 2) row, col
    inside = ((pixels[:, 0] >= y0) & (pixels[:, 0] < y0 + size) &
              (pixels[:, 1] >= x0) & (pixels[:, 1] < x0 + size))
    keep = np.flatnonzero(inside)[:self.max_points]
    offset = np.array([x0, y0], np.float32)
    points = source['points'][keep] - offset  # (k, 2)
    boxes = np.clip(source['boxes'][keep] - np.tile(offset, 2), -0.5, size - 0.5)  # (k, 4)
    count = len(keep)

    out = {
        'image': np.ascontiguousarray(augment.transform_array(source['image'][window], **geometry)),
        'label_m': np.ascontiguousarray(
            augment.transform_array(source['label_m'][window], **geometry)),
        'instances': np.ascontiguousarray(
            augment.transform_array(source['instances'][window], **geometry)),
        'points': np.zeros((self.max_points, 2), np.float32),
        'point_valid': np.arange(self.max_points) < count,
        'boxes': np.zeros((self.max_points, 4), np.float32),
    }
    out['points'][:count] = augment.transform_points(points, size, **geometry)
    out['boxes'][:count] = augment.transform_boxes(boxes, size, **geometry)
    out['point_index'] = np.full((self.max_points,), -1, np.int64)
    out['point_index'][:count] = keep
    out['image_index'], out['window'] = image_index, (y0, x0)
    # A point always lies inside its own box, so its box survives clipping with positive area.
    out['box_valid'] = out['point_valid'].copy()
    out['image'] = augment.color_jitter(out['image'], mode=self.color_jitter, rng=rng)
    return out

  def _crop_origin(self, image_index: int, rng: np.random.Generator) -> tuple[int, int]:
    """Top-left (y0, x0) of a crop: uniform, or around a uniform annotated pixel (regions)."""
    source = self.prepared[image_index]
    size = self.crop_size
    height, width = source['image'].shape[:2]
    rows = self._region_rows[image_index]
    if rows is None:
      return int(rng.integers(0, height - size + 1)), int(rng.integers(0, width - size + 1))
    k = int(rng.integers(rows[-1]))  # the k-th annotated pixel in raster order
    row = int(np.searchsorted(rows, k, side='right'))
    col = int(np.flatnonzero(source['region'][row])[k - (rows[row - 1] if row else 0)])
    y0 = int(rng.integers(max(0, row - size + 1), min(row, height - size) + 1))
    x0 = int(rng.integers(max(0, col - size + 1), min(col, width - size) + 1))
    return y0, x0

  def batch_at(self, step: int) -> dict:
    """This process's rows of global batch `step` (all rows with one process)."""
    first = step * self.batch_size + self.process_index * self.local_batch_size
    samples = [self.sample(first + row) for row in range(self.local_batch_size)]
    return {key: np.stack([s[key] for s in samples]) for key in batch_lib.TRAIN_BATCH_SPEC}

  def iterate(self, start_step: int = 0, *, prefetch: int = 2) -> Iterator[dict]:
    """batch_at(start_step), batch_at(start_step + 1), ... (endless), `prefetch` built ahead."""
    step = start_step
    if prefetch <= 0:
      while True:
        yield self.batch_at(step)
        step += 1
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
      pending = collections.deque()
      try:
        while True:
          while len(pending) < prefetch:
            pending.append(pool.submit(self.batch_at, step + len(pending)))
          batch = pending.popleft().result()
          step += 1
          yield batch
      finally:
        for future in pending:
          future.cancel()
