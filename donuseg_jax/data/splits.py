"""Cross-validation splits by image (DESIGN.md section 6), committed as JSON beside this module.

Scheme `cv5`: the sorted image ids are permuted with a fixed seed and cut into 5 near-equal folds;
for fold k, test = fold k, val = fold k + 1 (mod 5), train = the other three (3:1:1).
Scheme `official` (MoNuSeg only): train on the official training set less a seeded 20% kept for
validation; test on the official test set (its 14 ids are recorded in `splits/monuseg.json`).

The files `splits/<dataset>.json` are written by

  python -m donuseg_jax.data.splits --write [--data_root DIR]

which lists the image ids through `datasets.list_image_ids` and regenerates byte-identical files.
Datasets without a committed file (synthetic, CryoNuSeg's full release), or whose images on disk
differ from the committed list (for example all 30 MoNuSeg training images instead of the 13 here),
get their folds computed on the fly by the same seeded function from the ids found.
"""

import argparse
import json
import logging
import pathlib
from collections.abc import Sequence

import numpy as np

SPLITS_DIR = pathlib.Path(__file__).resolve().parent / 'splits'
SEED = 0  # the one split seed, recorded in every file
NUM_FOLDS = 5
COMMITTED = ('tnbc', 'consep', 'monuseg')  # datasets whose split files live in the repository
OFFICIAL_VAL_FRACTION = 0.2  # MoNuSeg `official`: share of the official training set kept for val
# MoNuSeg 2018 official test set (monuseg.grand-challenge.org): 14 images, held out.
MONUSEG_OFFICIAL_TEST = (
    'TCGA-2Z-A9J9-01A-01-TS1', 'TCGA-44-2665-01B-06-BS6', 'TCGA-69-7764-01A-01-TS1',
    'TCGA-A6-6782-01A-01-BS1', 'TCGA-AC-A2FO-01A-01-TS1', 'TCGA-AO-A0J2-01A-01-BSA',
    'TCGA-CU-A0YN-01A-02-BSB', 'TCGA-EJ-A46H-01A-03-TSC', 'TCGA-FG-A4MU-01B-01-TS1',
    'TCGA-GL-6846-01A-01-BS1', 'TCGA-HC-7209-01A-01-TS1', 'TCGA-HT-8564-01Z-00-DX1',
    'TCGA-IZ-8196-01A-01-BS1', 'TCGA-ZF-A9R5-01A-01-TS1')


def make_folds(ids: Sequence[str], *, seed: int, num_folds: int = NUM_FOLDS) -> list[list[str]]:
  """`num_folds` disjoint, sorted id lists covering `ids`; sizes differ by at most one.

  Depends only on the set of ids and the seed (the input order does not matter).
  """
  ordered = sorted(set(ids))
  if len(ordered) != len(ids):
    raise ValueError('image ids are not unique')
  if len(ordered) < num_folds:
    raise ValueError(f'{len(ordered)} images cannot make {num_folds} folds')
  order = np.random.default_rng(seed).permutation(len(ordered))
  return [sorted(ordered[i] for i in chunk) for chunk in np.array_split(order, num_folds)]


def fold_split(folds: Sequence[Sequence[str]], fold: int) -> dict[str, list[str]]:
  """test = fold `fold`, val = fold `fold` + 1 (mod k), train = the rest (sorted)."""
  count = len(folds)
  if not 0 <= fold < count:
    raise ValueError(f'fold {fold} out of range 0..{count - 1}')
  val = (fold + 1) % count
  train = sorted(i for k, chunk in enumerate(folds) if k not in (fold, val) for i in chunk)
  return {'train': train, 'val': sorted(folds[val]), 'test': sorted(folds[fold])}


def official_split(train_ids: Sequence[str], test_ids: Sequence[str], *,
                   seed: int = SEED) -> dict[str, list[str]]:
  """Official train set less a seeded OFFICIAL_VAL_FRACTION for val; the official test set."""
  ordered = sorted(train_ids)
  count = max(1, round(OFFICIAL_VAL_FRACTION * len(ordered)))
  order = np.random.default_rng(seed).permutation(len(ordered))
  val = sorted(ordered[i] for i in order[:count])
  train = sorted(ordered[i] for i in order[count:])
  return {'train': train, 'val': val, 'test': sorted(test_ids)}


def split_file(name: str) -> pathlib.Path:
  return SPLITS_DIR / f'{name}.json'


def split_record(name: str, ids: Sequence[str], *, seed: int = SEED) -> dict:
  """The JSON content of one dataset's split file."""
  if len(set(ids)) < NUM_FOLDS:
    raise ValueError(f'{name}: {len(set(ids))} images cannot make {NUM_FOLDS} cross-validation folds')
  record = {'dataset': name, 'scheme': 'cv5', 'seed': seed, 'num_folds': NUM_FOLDS,
            'ids': sorted(ids), 'folds': make_folds(ids, seed=seed)}
  if name == 'monuseg':
    record['official'] = official_split(ids, MONUSEG_OFFICIAL_TEST, seed=seed)
    record['official_val_fraction'] = OFFICIAL_VAL_FRACTION
  return record


def dumps(record: dict) -> str:
  """Stable text: sorted keys, one id per line, trailing newline (byte-identical on rewrite)."""
  return json.dumps(record, indent=1, sort_keys=True) + '\n'


def write_split_files(ids_by_dataset: dict[str, Sequence[str]], *,
                      directory: pathlib.Path = SPLITS_DIR) -> list[pathlib.Path]:
  """Writes `<directory>/<name>.json` for each dataset; returns the paths."""
  directory.mkdir(parents=True, exist_ok=True)
  written = []
  for name, ids in sorted(ids_by_dataset.items()):
    path = directory / f'{name}.json'
    path.write_text(dumps(split_record(name, ids)))
    written.append(path)
  return written


def list_training_ids(name: str, *, data_root=None, synthetic_images: int = 40) -> list[str]:
  """Image ids that the cross-validation folds cover (MoNuSeg: its official training set only)."""
  from donuseg_jax.data import datasets  # lazy: the readers import heavy libraries
  subset = 'train' if name == 'monuseg' else None
  ids = datasets.list_image_ids(name, data_root=data_root, subset=subset,
                                synthetic_images=synthetic_images)
  return sorted(i for i in ids if i not in MONUSEG_OFFICIAL_TEST)


def load_split(name: str, fold: int, *, data_root=None, scheme: str = 'cv5',
               ids: Sequence[str] | None = None,
               synthetic_images: int = 40) -> dict[str, list[str]]:
  """{'train', 'val', 'test'} id lists for `fold` of dataset `name`.

  Reads the committed file when there is one. The folds are computed on the fly (same seeded
  function) when there is none (synthetic: `synthetic_images` images; CryoNuSeg), or when `ids`
  (the images actually available, if the caller knows them) differ from the file's.
  `scheme='official'` (MoNuSeg only) ignores `fold`.
  """
  if scheme not in ('cv5', 'official'):
    raise ValueError(f'unknown split scheme {scheme!r}; expected cv5 or official')
  if scheme == 'official' and name != 'monuseg':
    raise ValueError(f'split scheme "official" exists for monuseg only, not {name!r}')
  record = None
  if split_file(name).exists():
    record = json.loads(split_file(name).read_text())
    if ids is not None and sorted(ids) != record['ids']:
      logging.warning('%s: %d images available, the split file lists %d; computing folds from the '
                      'available ids (seed %d)', name, len(ids), len(record['ids']), record['seed'])
      record = None
  if record is None:
    if ids is None:
      ids = list_training_ids(name, data_root=data_root, synthetic_images=synthetic_images)
    record = split_record(name, ids)
  if scheme == 'official':
    return {k: list(v) for k, v in record['official'].items()}
  return fold_split(record['folds'], fold)


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--write', action='store_true', help='regenerate splits/<dataset>.json')
  parser.add_argument('--data_root', default=None, help='raw datasets (default: paths.data_root())')
  parser.add_argument('--datasets', nargs='*', default=list(COMMITTED))
  args = parser.parse_args(argv)
  ids = {name: list_training_ids(name, data_root=args.data_root) for name in args.datasets}
  for name, found in ids.items():
    print(f'{name}: {len(found)} images')
  if args.write:
    for path in write_split_files(ids):
      print(f'wrote {path}')


if __name__ == '__main__':
  main()
