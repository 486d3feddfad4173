"""Pieces shared by the dataset readers: assembling one example, finding folders leniently."""

import pathlib

import numpy as np
import skimage.segmentation

from donuseg_jax.data import images
from donuseg_jax.data import points as points_lib


def make_example(*, image: np.ndarray, instances: np.ndarray, image_id: str, group: str,
                 source: str) -> dict:
  """Builds an example dict: ids relabelled to 1..K (gaps closed), points at the centroids."""
  if instances.shape != image.shape[:2]:
    raise images.DataError(
        f'{source}: instance map is {instances.shape[1]}x{instances.shape[0]} but the image is '
        f'{image.shape[1]}x{image.shape[0]} (width x height)')
  instances = np.asarray(instances)
  if instances.size and instances.min() < 0:
    raise images.DataError(f'{source}: negative instance ids')
  instances = skimage.segmentation.relabel_sequential(instances.astype(np.int32))[0].astype(np.int32)
  return {
      'image': image,  # (H, W, 3) uint8
      'instances': instances,  # (H, W) int32, 0 = background, 1..K
      'points': points_lib.centroids_from_instances(instances),  # (K, 2) float32 x, y
      'id': image_id,
      'group': group,
  }


def faults_of(index: dict, read) -> list[str]:
  """Reads every entry of a reader's index with `read(image_id)` and returns the message of
  each DataError, so that one pass names every bad file (the data summary command)."""
  faults = []
  for image_id in sorted(index):
    try:
      read(image_id)
    except images.DataError as error:
      faults.append(str(error))
  return faults


def fault(faults: list | None, message: str) -> None:
  """Raises DataError(message), or, when collecting (`faults` is a list), records it."""
  if faults is None:
    raise images.DataError(message)
  faults.append(message)


def find_dirs(root: pathlib.Path, name: str, *, max_depth: int = 3) -> list[pathlib.Path]:
  """Folders called `name` (case-insensitive) at most `max_depth` levels below `root`, sorted."""
  found, level = [], [root]
  for _ in range(max_depth + 1):
    found += [p for p in level if p.name.lower() == name.lower() and p != root]
    level = [c for p in level if p.is_dir() for c in sorted(p.iterdir()) if c.is_dir()]
  return sorted(found)


def require_dir(root: pathlib.Path, dataset: str, layout: str) -> pathlib.Path:
  """Returns `root` if it is a folder, else raises DataError naming it and the layout expected."""
  root = pathlib.Path(root)
  if not root.is_dir():
    raise images.DataError(f'{dataset}: dataset folder {root} does not exist; expected {layout}')
  return root
