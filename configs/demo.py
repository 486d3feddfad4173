"""Built-in synthetic H&E-like tiles: the default that needs no download (README's first command).

  python -m donuseg_jax.main --config=configs/demo.py:lite --workdir=runs/demo     # `make demo`, CPU
  python -m donuseg_jax.main --config=configs/demo.py --workdir=runs/demo_full     # paper model (GPU)
  python -m donuseg_jax.main --config=configs/demo.py:smoke --workdir=/tmp/demo_smoke  # tests

`:lite` here is smaller than the datasets' `:lite` so that `make demo` (train, evaluate, overlays)
finishes in under 10 minutes on 2 CPU cores: 24 tiles of 256x256, 128x128 crops, a ResNet-18
encoder with 64-channel FPN and heads.
"""

from configs import default


def get_config(variant: str | None = None):
  config = default.get_config(None)
  config.unlock()
  config.data.name = 'synthetic'
  config.eval.max_images = 8
  config = default.apply_variant(config, variant)
  if variant == 'lite':
    config.unlock()
    config.data.synthetic_images = 24
    config.data.synthetic_size = 256
    config.data.crop_size = 128
    config.data.max_points = 96
    config.model.fpn_channels = 64
    config.model.head_channels = 64
    config.model.head_convs = 2
    config.model.loc_hidden = 128
    config.train.epochs = 40
    config.train.eval_every_epochs = 20
    config.train.checkpoint_every_steps = 70
    config.train.log_every = 10
    config.eval.window = 128
    config.eval.stride = 64
    config.lock()
  return config
