"""The one batch contract: keys, shapes and dtypes that data, models, losses and training share.

Written once here; models and losses never invent keys.

Training batch (global batch B, crop side S = config.data.crop_size, N = config.data.max_points):

  image        (B, S, S, 3) uint8    RGB crop; the model normalises (ImageNet mean/std) itself
  label_m      (B, S, S)    int8     initial label M: 1 nucleus, 0 background, -1 ignored
  points       (B, N, 2)    float32  point labels in crop pixels, (x, y) = (column, row)
  point_valid  (B, N)       bool     which rows of `points` are real (the rest is padding)
  boxes        (B, N, 4)    float32  pseudo boxes (x0, y0, x1, y1) in crop pixels, clipped to the crop
  box_valid    (B, N)       bool     which rows of `boxes` are real
  instances    (B, S, S)    int32    ground-truth instance ids (0 = background); diagnostics only,
                                     never used by a loss (all zeros when no ground truth exists)

Coordinates: pixel (row i, column j) has its centre at (x, y) = (j, i); a box covers the continuous
range [x0, x1) x [y0, y1).

Example (one whole image, as the dataset readers return it):

  image      (H, W, 3) uint8
  instances  (H, W)    int32   0 = background, 1..K instance ids
  points     (K, 2)    float32 (x, y)
  id         str
  group      str       patient / slide ('' when the dataset has none)
"""

import numpy as np

# name -> (dtype, trailing shape after the batch axis, with 'S' the crop side and 'N' max points)
TRAIN_BATCH_SPEC = {
    'image': (np.uint8, ('S', 'S', 3)),
    'label_m': (np.int8, ('S', 'S')),
    'points': (np.float32, ('N', 2)),
    'point_valid': (np.bool_, ('N',)),
    'boxes': (np.float32, ('N', 4)),
    'box_valid': (np.bool_, ('N',)),
    'instances': (np.int32, ('S', 'S')),
}

IGNORE = -1  # label value of ignored pixels in label_m and in pseudo labels


def check_train_batch(batch: dict, *, crop_size: int, max_points: int) -> None:
  """Raises ValueError naming the key when `batch` breaks the contract above."""
  sizes = {'S': crop_size, 'N': max_points}
  missing = set(TRAIN_BATCH_SPEC) - set(batch)
  if missing:
    raise ValueError(f'batch lacks keys {sorted(missing)}')
  batch_size = None
  for key, (dtype, trailing) in TRAIN_BATCH_SPEC.items():
    value = np.asarray(batch[key])
    expected = tuple(sizes.get(d, d) for d in trailing)
    if value.dtype != dtype or value.shape[1:] != expected:
      raise ValueError(
          f'batch[{key!r}] is {value.dtype}{value.shape}, expected {np.dtype(dtype)}(B, *{expected})')
    batch_size = value.shape[0] if batch_size is None else batch_size
    if value.shape[0] != batch_size:
      raise ValueError(f'batch[{key!r}] has batch size {value.shape[0]}, others {batch_size}')
