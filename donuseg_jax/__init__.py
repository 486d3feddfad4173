"""donuseg-jax: DoNuSeg (MICCAI 2024) point-supervised nuclei instance segmentation in JAX/Flax.

Layout: `data` (readers, TFDS builders, pseudo labels, batches), `models` (ResNet-FPN and heads,
CAMs, weight conversion), `losses` (pure jitted loss functions), `train` (the loop), `inference`
(whole-image prediction, instances), `metrics` (HoVer-Net-exact instance metrics), and the command
lines `main`, `evaluate`, `predict`.
"""

__version__ = '0.1.0'
