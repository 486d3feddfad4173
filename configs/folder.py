"""Your own images: a folder of PNG / TIFF / JPEG images with point files (data/folder.py).

  python -m donuseg_jax.main --config=configs/folder.py:cpu --config.data.folder=DIR --workdir=runs/mine
  python -m donuseg_jax.main --config=configs/folder.py:cpu,plus --config.data.folder=DIR \
      --config.model.init_from=runs/tnbc_cpu_fold0 --workdir=runs/mine_ft   # fine-tune a TNBC model
  python -m donuseg_jax.main --config=configs/folder.py:smoke --config.data.folder=DIR \
      --workdir=/tmp/folder_smoke   # tiny, for tests

DIR holds, per image <stem>, <stem>.geojson (QuPath export) or <stem>.csv points, optional
<stem>.mask.tif label maps (evaluation only) and optionally splits.json; see README "Your own
images". The checkpoint is selected by point F1 on the validation images (no mask needed).
Variants as every dataset config: paper scale (GPU), `:lite`, `:cpu`, `:smoke`, and `plus`.
"""

from configs import default


def get_config(variant: str | None = None):
  config = default.get_config(None)
  config.unlock()
  config.data.name = 'folder'
  config.train.select_metric = 'point_f1'  # validation images have points, rarely masks

  return default.apply_variant(config, variant)
