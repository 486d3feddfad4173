"""TFDS builder for CryoNuSeg: one split, 'train'.

Builder configs keep differently labelled copies apart in one TFDS folder: 'annotator1' (default),
'annotator1_round1' and 'annotator2' read the Kaggle release, 'pilot' the two pilot tiles.
`raw_dir` is the folder holding the release or the pilot zips.
"""

import tensorflow_datasets as tfds

from donuseg_jax.data import images
from donuseg_jax.data.builders import base
from donuseg_jax.data.readers import cryonuseg


class Builder(base.RawDatasetBuilder, skip_registration=True):
  """CryoNuSeg (Mahbod et al., 2021), MIT (pilot) / CC BY-NC-SA 4.0 (Kaggle release)."""

  VERSION = base.VERSION
  RELEASE_NOTES = base.RELEASE_NOTES
  MANUAL_DOWNLOAD_INSTRUCTIONS = f'Place in the manual dir: {cryonuseg.LAYOUT}.'
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(name=name, description=f'Kaggle release, labels of {name}.')
      for name in cryonuseg.ANNOTATORS
  ] + [tfds.core.BuilderConfig(name='pilot', description='The two pilot tiles (ImageJ ROIs).')]

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description='CryoNuSeg nuclei: 512x512 H&E tiles of frozen sections, 10 organs.',
        features=base.example_features(),
        homepage='https://github.com/masih4/CryoNuSeg')

  def _split_generators(self, dl_manager):
    root = self._raw_root(dl_manager, cryonuseg.LAYOUT)
    found = cryonuseg.layout(root)
    wanted = 'pilot' if self.builder_config.name == 'pilot' else 'release'
    if found != wanted:
      raise images.DataError(
          f'cryonuseg/{self.builder_config.name}: {root} holds the {found} layout, not the {wanted}')
    return {'train': self._generate_examples(root)}

  def _generate_examples(self, root):
    annotator = 'annotator1' if self.builder_config.name == 'pilot' else self.builder_config.name
    return self._keyed(cryonuseg.iter_examples(root, annotator=annotator))
