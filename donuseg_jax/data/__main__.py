"""Dataset command line: `python -m donuseg_jax.data summary --dataset NAME --data_dir DIR`.

Prints one JSON object: images, instances and points over every split found, the same per split,
image sizes, and for polygon-annotated datasets (MoNuSeg, CryoNuSeg ROIs) the regions dropped as
degenerate or covered. stdout holds only the JSON. When a file is bad, every bad file of the
dataset is listed on stderr (one pass over the raw files), not only the first; exit status 2.
"""

import argparse
import json
import sys

import numpy as np

from donuseg_jax import cli
from donuseg_jax.data import datasets
from donuseg_jax.data import folder
from donuseg_jax.data import images
from donuseg_jax.data.readers import consep
from donuseg_jax.data.readers import cryonuseg
from donuseg_jax.data.readers import monuseg
from donuseg_jax.data.readers import tnbc


def summarize(name: str, *, data_root=None, tfds_dir=None, synthetic_images: int = 40,
              synthetic_size: int = 512, download: bool = False) -> dict:
  """Counts over the prepared TFDS dataset (prepared first if needed)."""
  if name == 'folder':  # a user's folder (--data_dir), read directly
    return folder.summarize(data_root)
  builder = datasets.create_builder(name, data_root=data_root, tfds_dir=tfds_dir,
                                    synthetic_images=synthetic_images, synthetic_size=synthetic_size,
                                    download=download)
  datasets.prepare(builder)
  splits = {}
  sizes = set()
  for split in sorted(builder.info.splits):
    examples = datasets.load_examples(name, data_root=data_root, tfds_dir=tfds_dir, subset=split,
                                      synthetic_images=synthetic_images,
                                      synthetic_size=synthetic_size, download=download)
    splits[split] = {
        'images': len(examples),
        'instances': int(sum(len(np.unique(e['instances'])) - (e['instances'] == 0).any()
                             for e in examples)),
        'points': int(sum(len(e['points']) for e in examples)),
    }
    sizes |= {f'{e["image"].shape[1]}x{e["image"].shape[0]}' for e in examples}
  summary = {'dataset': name, 'tfds': builder.info.full_name,
             'raw_dir': str(getattr(builder, 'raw_dir', None) or '')}
  for key in ('images', 'instances', 'points'):
    summary[key] = sum(counts[key] for counts in splits.values())
  summary['splits'] = splits
  summary['image_sizes'] = sorted(sizes)
  reports = datasets.region_reports(name, data_root=data_root)
  if reports:
    summary['regions'] = {
        split: {'regions': sum(r['regions'] for r in per_image.values()),
                'dropped': sum(r['dropped'] for r in per_image.values()),
                'per_image': per_image}
        for split, per_image in reports.items()}
  return summary


def find_faults(name: str, *, data_root=None) -> list[str]:
  """Every problem with the raw files of dataset `name`, one message (naming the file) each."""
  if name == 'synthetic':
    return []
  try:
    root = datasets.raw_dir(name, data_root=data_root)
    if name == 'tnbc':
      return tnbc.find_faults(root)
    if name == 'consep':
      return consep.find_faults(root)
    if name == 'monuseg':
      return [f for s in monuseg.available_subsets(root) for f in monuseg.find_faults(root, subset=s)]
    return cryonuseg.find_faults(root)
  except images.DataError as error:  # the layout itself is wrong: nothing further to check
    return [str(error)]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog='python -m donuseg_jax.data',
                                   description=__doc__.split('\n')[0])
  commands = parser.add_subparsers(dest='command', required=True)
  summary = commands.add_parser('summary', help='print counts of one dataset as JSON')
  summary.add_argument('--dataset', required=True, choices=sorted(datasets.DATASETS))
  summary.add_argument('--data_dir', default='', help='raw data root (default: $DONUSEG_DATA_ROOT '
                       'or ../shared/data beside the checkout)')
  summary.add_argument('--tfds_dir', default='', help='prepared TFDS files (default: '
                       '$DONUSEG_TFDS_DIR or ~/.cache/donuseg_jax/tfds)')
  summary.add_argument('--synthetic_images', type=int, default=40)
  summary.add_argument('--synthetic_size', type=int, default=512)
  summary.add_argument('--download', action='store_true',
                       help='TNBC only: fetch the Zenodo zip when the local folder is missing')
  args = parser.parse_args(argv)
  try:
    result = summarize(args.dataset, data_root=args.data_dir or None, tfds_dir=args.tfds_dir or None,
                       synthetic_images=args.synthetic_images, synthetic_size=args.synthetic_size,
                       download=args.download)
  except images.DataError as error:
    faults = find_faults(args.dataset, data_root=args.data_dir or None) or [str(error)]
    if len(faults) == 1:
      print(f'error: {faults[0]}', file=sys.stderr)
    else:
      print(f'error: {len(faults)} problems with the {args.dataset} files:', file=sys.stderr)
      for fault in faults:
        print(f'  {fault}', file=sys.stderr)
    return cli.EXIT_BAD_INPUT
  print(json.dumps(result, indent=1))
  return 0


if __name__ == '__main__':
  sys.exit(cli.run(main))
