"""Training augmentations of one square crop: dihedral transforms and colour jitter (NumPy).

Geometric transforms act identically on pixel arrays and on coordinates, in the order
horizontal flip, vertical flip, then `rot` quarter turns counter-clockwise (np.rot90). With pixel
centres at integer (x, y), a crop of side S spans [-0.5, S - 0.5) on each axis and every
transform maps that extent onto itself, so clipped boxes stay clipped.

Colour jitter (image only):
- `hed`: H&E stain jitter: colour deconvolution with scikit-image's Ruifrok-Johnston matrices
  (`skimage.color.hed_from_rgb` / `rgb_from_hed`), each stain scaled and shifted, then recombined.
  Written out instead of calling `rgb2hed` / `hed2rgb` because those clip negative stain values, so
  their round trip alters about 10% of the pixels of a TNBC crop by more than 2 grey levels (up to
  46) even with no jitter; without the clip the whole jitter is one 3x3 affine map in optical
  density, about 1 ms per 256x256 crop.
- `rgb`: per-channel gain and a global brightness shift.
"""

import numpy as np
from skimage import color

COLOR_JITTERS = ('none', 'hed', 'rgb')
HED_SCALE = 0.05  # each stain multiplied by U[1 - HED_SCALE, 1 + HED_SCALE]
HED_SHIFT = 0.005  # each stain shifted by U[-HED_SHIFT, HED_SHIFT] (skimage's units; H is ~0-0.1)
RGB_GAIN = 0.1  # each channel multiplied by U[1 - RGB_GAIN, 1 + RGB_GAIN]
RGB_SHIFT = 16.  # all channels shifted by U[-RGB_SHIFT, RGB_SHIFT] grey levels

_LOG_ADJUST = np.log(1e-6)  # skimage's scale: stain value = log(rgb) / log(1e-6) @ hed_from_rgb
# Optical density of each uint8 value in skimage's units (rgb floored at 1e-6 as skimage does).
_OD_TABLE = (np.log(np.maximum(np.arange(256) / 255., 1e-6)) / _LOG_ADJUST).astype(np.float32)


def transform_array(array: np.ndarray, *, hflip: bool, vflip: bool, rot: int) -> np.ndarray:
  """Flips / rotates the first two axes of (S, S, ...) `array` (a view where possible)."""
  if hflip:
    array = array[:, ::-1]
  if vflip:
    array = array[::-1]
  return np.rot90(array, k=rot % 4, axes=(0, 1))


def transform_points(points: np.ndarray, size: int, *, hflip: bool, vflip: bool,
                     rot: int) -> np.ndarray:
  """(K, 2) (x, y) in a crop of side `size`, moved as `transform_array` moves their pixels."""
  x, y = points[:, 0], points[:, 1]
  last = size - 1.
  if hflip:
    x = last - x
  if vflip:
    y = last - y
  for _ in range(rot % 4):
    # np.rot90 (k=1): new[i, j] = old[j, S - 1 - i], so (x, y) -> (y, S - 1 - x).
    x, y = y, last - x
  return np.stack([x, y], axis=1).astype(points.dtype)


def transform_boxes(boxes: np.ndarray, size: int, *, hflip: bool, vflip: bool,
                    rot: int) -> np.ndarray:
  """(K, 4) (x0, y0, x1, y1): both corners moved, then re-ordered into min / max."""
  kwargs = dict(hflip=hflip, vflip=vflip, rot=rot)
  first = transform_points(boxes[:, 0:2], size, **kwargs)  # (K, 2)
  second = transform_points(boxes[:, 2:4], size, **kwargs)  # (K, 2)
  return np.concatenate([np.minimum(first, second), np.maximum(first, second)], axis=1)


def hed_jitter(image: np.ndarray, *, scale: np.ndarray, shift: np.ndarray) -> np.ndarray:
  """(H, W, 3) uint8 -> uint8 with stain s_c -> s_c * scale[c] + shift[c] for c in H, E, D."""
  # stains = od @ hed_from_rgb; jittered od = (stains * scale + shift) @ rgb_from_hed.
  matrix = color.hed_from_rgb @ (scale[:, None] * color.rgb_from_hed)  # (3, 3)
  offset = shift @ color.rgb_from_hed  # (3,)
  od = _OD_TABLE[image]  # (H, W, 3) float32
  od = od @ matrix.astype(np.float32) + offset.astype(np.float32)
  rgb = np.exp(od * np.float32(_LOG_ADJUST))
  return np.clip(rgb * 255. + 0.5, 0, 255).astype(np.uint8)


def rgb_jitter(image: np.ndarray, *, gain: np.ndarray, shift: float) -> np.ndarray:
  """(H, W, 3) uint8 -> uint8 with channel c -> c * gain[c] + shift."""
  out = image.astype(np.float32) * gain.astype(np.float32) + np.float32(shift)
  return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def color_jitter(image: np.ndarray, *, mode: str, rng: np.random.Generator) -> np.ndarray:
  """Random colour jitter of a uint8 RGB crop; `mode` in COLOR_JITTERS."""
  if mode == 'none':
    return image
  if mode == 'hed':
    scale = rng.uniform(1. - HED_SCALE, 1. + HED_SCALE, size=3)
    shift = rng.uniform(-HED_SHIFT, HED_SHIFT, size=3)
    return hed_jitter(image, scale=scale, shift=shift)
  if mode == 'rgb':
    gain = rng.uniform(1. - RGB_GAIN, 1. + RGB_GAIN, size=3)
    return rgb_jitter(image, gain=gain, shift=rng.uniform(-RGB_SHIFT, RGB_SHIFT))
  raise ValueError(f'unknown colour jitter {mode!r}; expected one of {COLOR_JITTERS}')
