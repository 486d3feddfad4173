"""Deterministic H&E-like tiles with instance maps: the built-in dataset of the demo and the tests.

Each tile is drawn in stain space (Beer-Lambert: optical density = concentration x stain vector):
  - eosin background with low-frequency and fibrous texture and a few pale gaps;
  - haematoxylin nuclei: ellipses with a major radius of 4-14 px, random aspect and rotation, some
    lobed / irregular; partly clustered, some placed touching a neighbour; each with its own
    darkness, chromatin texture and a darker rim;
  - per-image stain variation (perturbed Ruifrok-Johnston stain vectors and strength), a gaussian
    blur of sigma 0.6-1.2 px and gaussian sensor noise.
The same (index, seed, size) gives the same arrays on every machine (NumPy's PCG64 with a
SeedSequence of [seed, index]). About 0.05 s per 512x512 tile.
"""

import numpy as np
import scipy.ndimage

from donuseg_jax.data.readers import common

# Optical-density stain vectors (R, G, B); haematoxylin from Ruifrok & Johnston (2001).
_HAEMATOXYLIN = np.array([0.65, 0.70, 0.29])
_EOSIN = np.array([0.10, 0.75, 0.45])  # pinker than Ruifrok's [0.07, 0.99, 0.11]


def generate_example(index: int, *, size: int = 512, seed: int = 0) -> dict:
  """One synthetic example: image (size, size, 3) uint8, instances, points, id, group ''."""
  rng = np.random.default_rng([seed, index])
  instances = _place_nuclei(rng, size)  # (S, S) int32
  image = _render(rng, instances)  # (S, S, 3) uint8
  return common.make_example(image=image, instances=instances, image_id=f'synthetic_{index:03d}',
                             group='', source=f'synthetic tile {index} (seed {seed})')


def iter_examples(num_images: int, size: int = 512, seed: int = 0):
  """Yields `num_images` examples, indices 0..num_images-1."""
  for index in range(num_images):
    yield generate_example(index, size=size, seed=seed)


def list_ids(num_images: int) -> list[str]:
  return [f'synthetic_{index:03d}' for index in range(num_images)]


def _nucleus_mask(rng, radius: float) -> np.ndarray:
  """(n, n) bool mask of one nucleus centred in its box: a rotated, possibly lobed ellipse."""
  minor = radius * rng.uniform(0.55, 1.0)
  angle = rng.uniform(0, np.pi)
  half = int(np.ceil(radius * 1.3)) + 1
  y, x = np.ogrid[-half:half + 1, -half:half + 1]  # (n, 1), (1, n)
  u = (x * np.cos(angle) + y * np.sin(angle)) / radius
  v = (-x * np.sin(angle) + y * np.cos(angle)) / minor
  rho, phi = np.hypot(u, v), np.arctan2(v, u)
  boundary = np.ones_like(phi)
  if rng.random() < 0.3:  # irregular / lobed outline: a few low harmonics of the radius
    for harmonic in rng.choice([2, 3, 4, 5], size=2, replace=False):
      boundary += rng.uniform(0.05, 0.18) * np.sin(harmonic * phi + rng.uniform(0, 2 * np.pi))
  return rho <= boundary


def _place_nuclei(rng, size: int) -> np.ndarray:
  instances = np.zeros((size, size), np.int32)
  count = int(size * size / rng.uniform(1200, 3000))
  clusters = rng.uniform(0, size, size=(rng.integers(2, 6), 2))
  centres, radii = [], []
  next_id = 1
  for _ in range(count):
    radius = rng.uniform(4, 14) if rng.random() < 0.8 else rng.uniform(4, 7)  # many small ones
    draw = rng.random()
    if centres and draw < 0.25:  # touching a previous nucleus
      k = rng.integers(len(centres))
      direction = rng.uniform(0, 2 * np.pi)
      distance = (radii[k] + radius) * rng.uniform(0.8, 1.0)
      centre = centres[k] + distance * np.array([np.cos(direction), np.sin(direction)])
    elif draw < 0.6:  # clustered
      centre = clusters[rng.integers(len(clusters))] + rng.normal(0, size / 10, size=2)
    else:
      centre = rng.uniform(0, size, size=2)
    mask = _nucleus_mask(rng, radius)
    half = mask.shape[0] // 2
    cy, cx = int(round(centre[1])), int(round(centre[0]))
    y0, x0 = cy - half, cx - half
    # Clip the nucleus box to the image (nuclei may be cut by the border, as in real tiles).
    top, left = max(0, y0), max(0, x0)
    bottom, right = min(size, y0 + mask.shape[0]), min(size, x0 + mask.shape[1])
    if bottom - top < 3 or right - left < 3:
      continue
    mask = mask[top - y0:bottom - y0, left - x0:right - x0]
    window = instances[top:bottom, left:right]
    free = mask & (window == 0)
    if mask.sum() < 12 or free.sum() < 0.75 * mask.sum():
      continue  # too small, or hidden behind earlier nuclei
    if free.sum() < mask.sum():  # partly hidden: keep one connected piece
      parts, num_parts = scipy.ndimage.label(free)
      if num_parts > 1:
        free = parts == 1 + np.argmax(np.bincount(parts.ravel())[1:])
    window[free] = next_id
    next_id += 1
    centres.append(np.asarray(centre, np.float64))
    radii.append(radius)
  return instances


def _smooth_noise(rng, size: int, cell: int) -> np.ndarray:
  """(size, size) float32 noise with blobs about `cell` px wide, roughly in [-1, 1].

  A coarse normal grid is interpolated with a gaussian kernel, as two small matrix products
  (much cheaper than filtering at full resolution; einsum, not BLAS, whose threads only spin
  on a busy CPU for matrices this small).
  """
  count = size // cell + 3
  coarse = rng.standard_normal((count, count), dtype=np.float32)
  offsets = np.arange(size, dtype=np.float32)[:, None] / cell + 1 - np.arange(count, dtype=np.float32)
  weights = np.exp(-0.5 * (offsets / 0.7) ** 2)  # (size, count)
  weights /= weights.sum(axis=1, keepdims=True)
  rows = np.einsum('ik,kl->il', weights, coarse)  # (size, count)
  return np.einsum('il,jl->ij', rows, weights) * np.float32(1.5)


def _render(rng, instances: np.ndarray) -> np.ndarray:
  size = instances.shape[0]
  nucleus = instances > 0
  # Per-image stain variation.
  h_vector = _HAEMATOXYLIN + rng.normal(0, 0.05, 3)
  e_vector = _EOSIN + rng.normal(0, 0.05, 3)
  h_vector, e_vector = (np.abs(v) / np.linalg.norm(v) for v in (h_vector, e_vector))
  h_strength, e_strength = rng.uniform(0.7, 1.2), rng.uniform(0.6, 1.4)

  # Eosin: stroma with coarse variation and fibres, pale gaps, less inside nuclei.
  eosin = rng.uniform(0.12, 0.25) + 0.06 * _smooth_noise(rng, size, 40)
  fibres = scipy.ndimage.gaussian_filter(
      rng.standard_normal((size, size), dtype=np.float32), sigma=(1.0, 4.0), truncate=2.0)
  if rng.random() < 0.5:
    fibres = fibres.T
  eosin += 0.4 * fibres * (1.0 + _smooth_noise(rng, size, 48))  # fibres in some places only
  gaps = _smooth_noise(rng, size, 56) > rng.uniform(0.7, 1.2)
  eosin = np.where(gaps, 0.25 * eosin, eosin)
  eosin = np.clip(eosin, 0.01, None) * np.where(nucleus, 0.5, 1.0)

  # Haematoxylin: faint in cytoplasm; per-nucleus darkness, chromatin texture, darker rim.
  darkness = rng.uniform(0.3, 0.9, size=instances.max() + 1).astype(np.float32)
  darkness[0] = 0.0
  chromatin = 1.0 + 0.6 * scipy.ndimage.gaussian_filter(
      rng.standard_normal((size, size), dtype=np.float32), 1.0, truncate=2.0)
  rim = np.zeros_like(nucleus)
  rim[1:, :] |= instances[1:, :] != instances[:-1, :]
  rim[:-1, :] |= instances[:-1, :] != instances[1:, :]
  rim[:, 1:] |= instances[:, 1:] != instances[:, :-1]
  rim[:, :-1] |= instances[:, :-1] != instances[:, 1:]
  rim &= nucleus
  haematoxylin = 0.05 + 0.03 * _smooth_noise(rng, size, 24)
  haematoxylin = haematoxylin + darkness[instances] * chromatin + 0.2 * rim

  blur = rng.uniform(0.6, 1.2)
  haematoxylin = scipy.ndimage.gaussian_filter(haematoxylin, blur, truncate=3.0)
  eosin = scipy.ndimage.gaussian_filter(eosin, blur, truncate=3.0)
  density = (h_strength * haematoxylin[..., None] * h_vector.astype(np.float32)
             + e_strength * eosin[..., None] * e_vector.astype(np.float32))  # (S, S, 3) optical density
  light = rng.uniform(235, 255, size=3).astype(np.float32)
  image = light * np.exp(np.float32(-np.log(10.0)) * np.clip(density, 0, None))
  image += rng.uniform(1.5, 4.0) * rng.standard_normal(image.shape, dtype=np.float32)
  return np.clip(np.round(image), 0, 255).astype(np.uint8)
