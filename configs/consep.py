"""CoNSeP (41 images, 1000x1000): 5-fold CV over all 41 images, as the paper re-split it.

  python -m donuseg_jax.main --config=configs/consep.py --workdir=runs/consep            # paper settings (GPU)
  python -m donuseg_jax.main --config=configs/consep.py:lite --workdir=runs/consep_lite  # CPU, ~30 min
  python -m donuseg_jax.main --config=configs/consep.py:smoke --workdir=/tmp/consep_smoke  # tests

Fold k: --config.data.fold=k (0..4).
"""

from configs import default


def get_config(variant: str | None = None):
  config = default.get_config(None)
  config.unlock()
  config.data.name = 'consep'

  return default.apply_variant(config, variant)
