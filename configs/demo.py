"""Built-in synthetic H&E-like tiles: the default that needs no download (README's first command).

  python -m donuseg_jax.main --config=configs/demo.py --workdir=runs/demo            # paper settings (GPU)
  python -m donuseg_jax.main --config=configs/demo.py:lite --workdir=runs/demo_lite  # CPU, ~30 min
  python -m donuseg_jax.main --config=configs/demo.py:smoke --workdir=/tmp/demo_smoke  # tests

Fold k: --config.data.fold=k (0..4).
"""

from configs import default


def get_config(variant: str | None = None):
  config = default.get_config(None)
  config.unlock()
  config.data.name = 'synthetic'
  config.eval.max_images = 8
  return default.apply_variant(config, variant)
