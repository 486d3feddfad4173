"""The `folder` dataset: a user's own images with point clicks, split into train / val / test.

  python -m donuseg_jax.main --config=configs/folder.py:cpu --config.data.folder=DIR --workdir=W
  python -m donuseg_jax.data summary --dataset folder --data_dir DIR

The files are read directly, every time (`readers.folder`: no TFDS cache to go stale while the
user keeps clicking). The split is by image:

  - `DIR/splits.json`, when present: {"train": [stems], "val": [stems], "test": [stems]}; "test"
    may be empty or absent, "val" too (then training's images validate, and the log says so).
    Stems that are not images with a point file, or that appear twice, are errors naming the file;
    images it does not list are left out with a warning.
  - otherwise a seeded permutation (seed `splits.SEED`) of the sorted stems: 20% test, 20% val
    (each at least one image), the rest train; with 4 or 3 images one test, one val, the rest train;
    with 2 images one train and one val, no test; with 1 image it trains and validates on itself,
    no test. What is used for what is logged as a warning whenever a part is missing.

Validation images rarely have masks, so the checkpoint is chosen by point F1
(`config.train.select_metric = 'point_f1'`, `evaluate.point_f1`): the F1 of the one-to-one matching
between the clicked points and the predicted instances that contain them, inside the annotated
regions. Masks (`<stem>.mask.tif`) add AJI, Dice and the other mask metrics, on the images that
have one.
"""

import json
import pathlib
import warnings

import ml_collections
import numpy as np
from absl import logging

from donuseg_jax.data import images
from donuseg_jax.data import regions as regions_lib
from donuseg_jax.data import splits as splits_lib
from donuseg_jax.data.readers import folder as reader

PARTS = ('train', 'val', 'test')
HELD_OUT_FRACTION = 0.2  # share of the images for test, and the same for val


class UnannotatedImagesWarning(UserWarning):
  """Images of the folder have no point file; they were left out."""


class SplitWarning(UserWarning):
  """The split leaves a part empty or shares images between parts; the message says which."""


def folder_root(data: ml_collections.ConfigDict) -> pathlib.Path:
  """The folder of `config.data` (`data.folder`); a DataError when it is not set."""
  folder = data.get('folder', '')
  if not folder:
    raise images.DataError('data.name=folder needs the folder of images: --config.data.folder=DIR')
  return pathlib.Path(folder).expanduser()


def scan(root) -> reader.Scan:
  """`readers.folder.scan`, warning about the images without a point file."""
  found = reader.scan(root)
  if found.unannotated:
    warnings.warn(reader.unannotated_message(found), UnannotatedImagesWarning, stacklevel=2)
    logging.warning('%s', reader.unannotated_message(found))
  if not found.entries:
    raise images.DataError(f'folder {found.root}: no image has a point file; expected '
                           f'{reader.LAYOUT}')
  return found


def seeded_split(stems, *, seed: int = splits_lib.SEED) -> dict[str, list[str]]:
  """The split of the module docstring for sorted `stems` (see there for small folders)."""
  ordered = sorted(set(stems))
  count = len(ordered)
  if count == 0:
    raise ValueError('no images to split')
  if count == 1:
    return {'train': ordered, 'val': ordered, 'test': []}
  order = [ordered[i] for i in np.random.default_rng(seed).permutation(count)]
  if count == 2:
    return {'train': sorted(order[:1]), 'val': sorted(order[1:]), 'test': []}
  held = max(1, round(HELD_OUT_FRACTION * count)) if count >= 5 else 1
  return {'test': sorted(order[:held]), 'val': sorted(order[held:2 * held]),
          'train': sorted(order[2 * held:])}


def read_splits_file(path, stems) -> dict[str, list[str]]:
  """A user's splits.json, checked against the image stems that have point files."""
  path = pathlib.Path(path)
  try:
    record = json.loads(path.read_text(encoding='utf-8-sig'))
  except (OSError, ValueError) as error:
    raise images.DataError(f'{path}: cannot read the split file ({error})') from error
  if not isinstance(record, dict) or 'train' not in record:
    raise images.DataError(f'{path}: expected an object {{"train": [...], "val": [...], '
                           '"test": [...]}} of image stems')
  unknown_keys = sorted(set(record) - set(PARTS))
  if unknown_keys:
    raise images.DataError(f'{path}: unknown key(s) {unknown_keys}; expected {list(PARTS)}')
  split, seen = {}, {}
  for part in PARTS:
    ids = record.get(part, [])
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
      raise images.DataError(f'{path}: "{part}" must be a list of image stems (strings)')
    for stem in ids:
      if stem in seen:
        raise images.DataError(f'{path}: image {stem!r} is in both "{seen[stem]}" and "{part}"')
      seen[stem] = part
    split[part] = sorted(ids)
  unknown = sorted(set(seen) - set(stems))
  if unknown:
    raise images.DataError(f'{path}: {len(unknown)} listed image(s) are not images with a point '
                           f'file in {path.parent}: {unknown[:5]}')
  if not split['train']:
    raise images.DataError(f'{path}: "train" lists no image')
  left_out = sorted(set(stems) - set(seen))
  if left_out:
    warnings.warn(f'{path}: {len(left_out)} annotated image(s) not in the split file are left '
                  f'out: {left_out[:10]}', SplitWarning, stacklevel=2)
  if not split['val']:
    split['val'] = list(split['train'])
  return split


def split_stems(root, stems) -> dict[str, list[str]]:
  """DIR/splits.json when present, else `seeded_split`; warns when a part is missing."""
  path = pathlib.Path(root) / reader.SPLITS_FILE
  split = read_splits_file(path, stems) if path.exists() else seeded_split(stems)
  message = describe_split(split, source=str(path) if path.exists() else 'seeded split')
  if split['val'] == split['train'] or not split['test']:
    warnings.warn(message, SplitWarning, stacklevel=2)
  logging.info('%s', message)
  return split


def describe_split(split: dict, *, source: str) -> str:
  """One sentence saying what is used for what."""
  text = (f'{source}: train on {len(split["train"])} image(s), select the checkpoint on '
          f'{len(split["val"])}, test on {len(split["test"])}')
  notes = []
  if split['val'] == split['train']:
    notes.append('validation uses the training images (too few images for a separate part): the '
                 'checkpoint choice is optimistic')
  if not split['test']:
    notes.append('no test image: no test metrics are reported')
  return text + ('; ' + '; '.join(notes) if notes else '')


def load_fold_examples(data: ml_collections.ConfigDict) -> dict[str, list[dict]]:
  """train / val / test examples of the folder of `config.data` (the fold number is unused)."""
  found = scan(folder_root(data))
  by_stem = {entry.stem: entry for entry in found.entries}
  split = split_stems(found.root, list(by_stem))
  cache = {}
  def example(stem):
    if stem not in cache:
      cache[stem] = reader.read_example(by_stem[stem])
    return cache[stem]
  return {part: [example(stem) for stem in split[part]] for part in PARTS}


def summarize(root) -> dict:
  """Counts of a folder, for `python -m donuseg_jax.data summary --dataset folder`."""
  if not root:
    raise images.DataError('--dataset folder needs --data_dir DIR, the folder of images')
  found = scan(root)
  examples = [reader.read_example(entry) for entry in found.entries]
  by_stem = {example['id']: example for example in examples}
  split = split_stems(found.root, list(by_stem))
  def counts(ids):
    chosen = [by_stem[i] for i in ids]
    return {'images': len(chosen),
            'points': int(sum(len(e['points']) for e in chosen)),
            'masks': int(sum(e['has_mask'] for e in chosen)),
            'instances': int(sum(e['instances'].max(initial=0) for e in chosen)),
            'partially_annotated': int(sum(e['region'] is not None for e in chosen))}
  summary = {'dataset': 'folder', 'raw_dir': str(found.root)}
  summary.update(counts(list(by_stem)))
  summary['splits'] = {part: dict(counts(split[part]), ids=split[part]) for part in PARTS}
  summary['split_note'] = describe_split(
      split, source=reader.SPLITS_FILE if (found.root / reader.SPLITS_FILE).exists()
      else 'seeded split')
  summary['image_sizes'] = sorted({f'{e["image"].shape[1]}x{e["image"].shape[0]}'
                                   for e in examples})
  summary['annotated_fraction'] = {e['id']: round(regions_lib.annotated_fraction(e['region']), 4)
                                   for e in examples if e['region'] is not None}
  summary['left_out'] = [p.name for p in found.unannotated]
  return summary
