"""MoNuSeg 2018: 5-fold CV over the training images; --config.data.split_scheme=official trains on the
official training set and tests on MoNuSegTestData (held out).

  python -m donuseg_jax.main --config=configs/monuseg.py --workdir=runs/monuseg            # paper settings (GPU)
  python -m donuseg_jax.main --config=configs/monuseg.py:lite --workdir=runs/monuseg_lite  # CPU, ~30 min
  python -m donuseg_jax.main --config=configs/monuseg.py:smoke --workdir=/tmp/monuseg_smoke  # tests

Fold k: --config.data.fold=k (0..4).
"""

from configs import default


def get_config(variant: str | None = None):
  config = default.get_config(None)
  config.unlock()
  config.data.name = 'monuseg'

  return default.apply_variant(config, variant)
