"""CryoNuSeg (30 images, 512x512, Kaggle release layout): 5-fold CV by image.

  python -m donuseg_jax.main --config=configs/cryonuseg.py --workdir=runs/cryonuseg            # paper settings (GPU)
  python -m donuseg_jax.main --config=configs/cryonuseg.py:lite --workdir=runs/cryonuseg_lite  # CPU, ~30 min
  python -m donuseg_jax.main --config=configs/cryonuseg.py:smoke --workdir=/tmp/cryonuseg_smoke  # tests

Fold k: --config.data.fold=k (0..4).
"""

from configs import default


def get_config(variant: str | None = None):
  config = default.get_config(None)
  config.unlock()
  config.data.name = 'cryonuseg'

  return default.apply_variant(config, variant)
