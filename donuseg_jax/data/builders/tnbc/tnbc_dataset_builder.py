"""TFDS builder for TNBC: the local extracted folder or zip, else the Zenodo download.

One split, 'train' (all 50 images; folds are chosen later by image id). `raw_dir` is
data_root/'tnbc'; when it is missing or empty the Zenodo zip is downloaded instead.
"""

import tensorflow_datasets as tfds

from donuseg_jax.data.builders import base
from donuseg_jax.data.readers import tnbc


class Builder(base.RawDatasetBuilder, skip_registration=True):
  """TNBC (Naylor et al., IEEE TMI 2018), CC BY 4.0."""

  VERSION = base.VERSION
  RELEASE_NOTES = base.RELEASE_NOTES
  MANUAL_DOWNLOAD_INSTRUCTIONS = f'Place in the manual dir: {tnbc.LAYOUT}.'

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description='TNBC nuclei: 50 H&E tiles of 512x512 from 11 patients; instances are the '
                    '8-connected components of the binary masks.',
        features=base.example_features(),
        homepage='https://zenodo.org/records/1175282')

  def _split_generators(self, dl_manager):
    if self._raw_dir is not None and self._raw_dir.is_dir() and any(self._raw_dir.iterdir()):
      root = self._raw_dir
    else:
      try:
        root = dl_manager.manual_dir
      except AssertionError:  # no local copy: fetch the archive (needs internet)
        root = dl_manager.download_and_extract(tnbc.URL)
    return {'train': self._generate_examples(root)}

  def _generate_examples(self, root):
    return self._keyed(tnbc.iter_examples(root))
