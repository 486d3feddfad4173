"""What the dataset builders share: the example features and where the raw files come from."""

import pathlib

import numpy as np
import tensorflow_datasets as tfds

from donuseg_jax.data import images

VERSION = tfds.core.Version('1.0.0')
RELEASE_NOTES = {'1.0.0': 'Whole images with instance maps and centroid points.'}


def example_features() -> tfds.features.FeaturesDict:
  """The whole-image example of `donuseg_jax.data.batch`, in TFDS features that need no TensorFlow."""
  return tfds.features.FeaturesDict({
      'image': tfds.features.Tensor(shape=(None, None, 3), dtype=np.uint8, encoding='zlib'),
      'instances': tfds.features.Tensor(shape=(None, None), dtype=np.int32, encoding='zlib'),
      'points': tfds.features.Tensor(shape=(None, 2), dtype=np.float32),
      'id': tfds.features.Text(),  # decodes to bytes without TensorFlow
      'group': tfds.features.Text(),
  })


class RawDatasetBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A builder reading local raw files: `raw_dir` (constructor) or the TFDS manual dir.

  Registration is skipped: the project creates its builders explicitly (no name lookup), and a
  later TFDS release adding a dataset of the same name cannot clash with ours.
  """

  def __init__(self, *, raw_dir=None, **kwargs):
    self._raw_dir = pathlib.Path(raw_dir) if raw_dir is not None else None
    super().__init__(**kwargs)

  @property
  def raw_dir(self) -> pathlib.Path | None:
    """The local raw folder given to the constructor (None: manual dir or download)."""
    return self._raw_dir

  def _raw_root(self, dl_manager, layout: str) -> pathlib.Path:
    """The raw dataset folder; DataError naming it and `layout` when it is missing."""
    if self._raw_dir is not None:
      if not self._raw_dir.is_dir():
        raise images.DataError(
            f'{self.name}: dataset folder {self._raw_dir} does not exist; expected {layout}')
      return self._raw_dir
    try:
      return pathlib.Path(dl_manager.manual_dir)
    except AssertionError as error:
      raise images.DataError(f'{self.name}: no raw_dir given and {error}') from error

  @staticmethod
  def _keyed(examples):
    """TFDS wants (unique key, example) pairs; the image id is the key."""
    for example in examples:
      yield example['id'], example
