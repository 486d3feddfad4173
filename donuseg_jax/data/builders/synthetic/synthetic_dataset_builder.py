"""TFDS builder for the built-in synthetic tiles (no raw files): one split, 'train'.

The number of tiles, their size and the seed are part of the builder config's name
('n40_s512_seed0'), so differently sized sets never overwrite each other in one TFDS folder:

  Builder(data_dir=..., config=synthetic_dataset_builder.make_config(num_images=40, size=512))
"""

import dataclasses

import tensorflow_datasets as tfds

from donuseg_jax.data import synthetic
from donuseg_jax.data.builders import base


@dataclasses.dataclass
class SyntheticConfig(tfds.core.BuilderConfig):
  num_images: int = 40
  size: int = 512
  seed: int = 0


def make_config(*, num_images: int = 40, size: int = 512, seed: int = 0) -> SyntheticConfig:
  return SyntheticConfig(name=f'n{num_images}_s{size}_seed{seed}', num_images=num_images,
                         size=size, seed=seed)


class Builder(base.RawDatasetBuilder, skip_registration=True):
  """Deterministic H&E-like tiles (`donuseg_jax.data.synthetic`)."""

  VERSION = base.VERSION
  RELEASE_NOTES = base.RELEASE_NOTES
  BUILDER_CONFIGS = [make_config()]

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description='Synthetic H&E-like tiles with instance maps (stain variation, varied and '
                    'touching nuclei, blur, noise).',
        features=base.example_features())

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    config = self.builder_config
    return self._keyed(synthetic.iter_examples(config.num_images, config.size, config.seed))
