"""TNBC (50 images, 512x512, 11 patients): 5-fold CV by image, 3:1:1.

  python -m donuseg_jax.main --config=configs/tnbc.py --workdir=runs/tnbc            # paper settings (GPU)
  python -m donuseg_jax.main --config=configs/tnbc.py:lite --workdir=runs/tnbc_lite  # CPU, ~30 min
  python -m donuseg_jax.main --config=configs/tnbc.py:smoke --workdir=/tmp/tnbc_smoke  # tests

Fold k: --config.data.fold=k (0..4).
"""

from configs import default


def get_config(variant: str | None = None):
  config = default.get_config(None)
  config.unlock()
  config.data.name = 'tnbc'

  return default.apply_variant(config, variant)
