"""Where raw datasets and prepared TFDS files live: one setting each, never inside the repository."""

import os
import pathlib

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def data_root(configured: str = '') -> pathlib.Path:
  """Raw datasets: the config value, else $DONUSEG_DATA_ROOT, else ../shared/data beside the checkout."""
  if configured:
    return pathlib.Path(configured).expanduser()
  if os.environ.get('DONUSEG_DATA_ROOT'):
    return pathlib.Path(os.environ['DONUSEG_DATA_ROOT']).expanduser()
  return REPO_ROOT.parent / 'shared' / 'data'


def tfds_dir(configured: str = '') -> pathlib.Path:
  """Prepared TFDS array_record files: the config value, else $DONUSEG_TFDS_DIR, else a user cache."""
  if configured:
    return pathlib.Path(configured).expanduser()
  if os.environ.get('DONUSEG_TFDS_DIR'):
    return pathlib.Path(os.environ['DONUSEG_TFDS_DIR']).expanduser()
  return pathlib.Path.home() / '.cache' / 'donuseg_jax' / 'tfds'
