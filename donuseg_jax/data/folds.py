"""The examples of one cross-validation fold of a config: train / val / test lists."""

from absl import logging
import ml_collections

from donuseg_jax.data import datasets
from donuseg_jax.data import folder
from donuseg_jax.data import splits
from donuseg_jax.data.readers import monuseg


def load_fold_examples(config: ml_collections.ConfigDict) -> dict[str, list[dict]]:
  """Reads the dataset of `config.data` and splits it by image id into train, val and test."""
  data = config.data
  if data.name == 'folder':  # a user's folder: read directly, split by its own rules
    return folder.load_fold_examples(data)
  split = splits.load_split(data.name, data.fold, data_root=data.data_root or None,
                            scheme=data.split_scheme, synthetic_images=data.synthetic_images)
  subsets = _subsets(data)
  if 'test' in subsets and 'test' not in monuseg.available_subsets(
      datasets.raw_dir(data.name, data_root=data.data_root or None)):
    # Train and select on the official training images; there is nothing to test on here.
    logging.warning('monuseg official scheme: MoNuSegTestData/ not found under the data root; '
                    'training and validating on the official training images, test step skipped')
    subsets = ('train',)
    split = dict(split, test=[])
  examples = {}
  for subset in subsets:
    for example in datasets.load_examples(
        data.name, data_root=data.data_root or None, tfds_dir=data.tfds_dir or None,
        subset=subset, synthetic_images=data.synthetic_images, synthetic_size=data.synthetic_size):
      examples[example['id']] = example
  missing = sorted({i for ids in split.values() for i in ids} - set(examples))
  if missing:
    raise ValueError(f'{data.name}: split ids not found in the data: {missing[:5]} '
                     f'({len(missing)} in all); regenerate the split files or check the data folder')
  return {name: [examples[i] for i in ids] for name, ids in split.items()}


def _subsets(data) -> tuple:
  """MoNuSeg's official scheme reads the official test set as well as the training set."""
  if data.name == 'monuseg' and data.split_scheme == 'official':
    return ('train', 'test')
  return (None,)
