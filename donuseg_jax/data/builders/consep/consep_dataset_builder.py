"""TFDS builder for CoNSeP: splits 'train' (27 images) and 'test' (14), the official ones.

`raw_dir` is data_root/'consep' holding CoNSeP/{Train,Test}/{Images,Labels}.
"""

import tensorflow_datasets as tfds

from donuseg_jax.data.builders import base
from donuseg_jax.data.readers import consep


class Builder(base.RawDatasetBuilder, skip_registration=True):
  """CoNSeP (Graham et al., MedIA 2019), Apache-2.0."""

  VERSION = base.VERSION
  RELEASE_NOTES = base.RELEASE_NOTES
  MANUAL_DOWNLOAD_INSTRUCTIONS = f'Place in the manual dir: {consep.LAYOUT}.'

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description='CoNSeP nuclei: 41 H&E tiles of 1000x1000 (colorectal), instance maps from '
                    'inst_map.',
        features=base.example_features(),
        homepage='https://warwick.ac.uk/fac/cross_fac/tia/data/hovernet/')

  def _split_generators(self, dl_manager):
    root = self._raw_root(dl_manager, consep.LAYOUT)
    return {subset: self._generate_examples(root, subset)
            for subset in consep.available_subsets(root)}

  def _generate_examples(self, root, subset):
    return self._keyed(consep.iter_examples(root, subset=subset))
