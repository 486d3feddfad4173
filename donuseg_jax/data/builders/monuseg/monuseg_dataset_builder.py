"""TFDS builder for MoNuSeg 2018: split 'train' (official training folder) and, when its folder is
present, 'test' (MoNuSegTestData). `raw_dir` is data_root/'monuseg'.
"""

import tensorflow_datasets as tfds

from donuseg_jax.data.builders import base
from donuseg_jax.data.readers import monuseg


class Builder(base.RawDatasetBuilder, skip_registration=True):
  """MoNuSeg 2018 (Kumar et al.), CC BY-NC-SA 4.0."""

  VERSION = base.VERSION
  RELEASE_NOTES = base.RELEASE_NOTES
  MANUAL_DOWNLOAD_INSTRUCTIONS = f'Place in the manual dir: {monuseg.LAYOUT}.'

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description='MoNuSeg 2018 nuclei: 1000x1000 H&E tiles from TCGA; ImageScope polygons '
                    'painted in document order (later regions overwrite earlier ones).',
        features=base.example_features(),
        homepage='https://monuseg.grand-challenge.org/')

  def _split_generators(self, dl_manager):
    root = self._raw_root(dl_manager, monuseg.LAYOUT)
    return {subset: self._generate_examples(root, subset)
            for subset in monuseg.available_subsets(root)}

  def _generate_examples(self, root, subset):
    return self._keyed(monuseg.iter_examples(root, subset=subset))
