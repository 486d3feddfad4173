"""Writes TNBC's fold-k images as a user's folder: the like-for-like check of the folder pipeline.

  python experiments/folder_from_tnbc.py --out /tmp/tnbc_folder [--fold 0] [--limit 0]

For every image of the fold's train, val and test parts, DIR gets
  <id>.png        the image as the TNBC reader decodes it (8-bit RGB)
  <id>.geojson    its centroid points (the benchmark protocol's clicks) as QuPath exports them: one
                  MultiPoint annotation, coordinates on QuPath's pixel corners (x + 0.5, y + 0.5)
  <id>.mask.tif   the instance map, for the test images only (masks are for evaluation only)
and splits.json reproducing TNBC's fold-k split (data/splits/tnbc.json), so that

  python -m donuseg_jax.main --config=configs/folder.py:cpu,plus --config.data.folder=DIR --workdir=A
  python -m donuseg_jax.main --config=configs/tnbc.py:cpu,plus --config.data.fold=0 --workdir=B

train on the same images, points and split, select by the same point F1 on the same validation
images and report the same test images. `--limit N` keeps the first N ids of each part (a quick
check of this script). The raw TNBC folder comes from --data_root (default: paths.data_root()).
"""

import argparse
import json
import pathlib
import sys

import numpy as np
import PIL.Image
import tifffile

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from donuseg_jax.data import datasets  # noqa: E402
from donuseg_jax.data import images  # noqa: E402
from donuseg_jax.data import splits  # noqa: E402
from donuseg_jax.data.readers import tnbc  # noqa: E402


def qupath_multipoint(points: np.ndarray) -> dict:
  """One QuPath point annotation (the Points tool's export): pixel-centre points -> corners."""
  return {'type': 'FeatureCollection', 'features': [{
      'type': 'Feature', 'id': 'points',
      'geometry': {'type': 'MultiPoint',
                   'coordinates': [[float(x) + 0.5, float(y) + 0.5] for x, y in points]},
      'properties': {'objectType': 'annotation', 'classification': {'name': 'Nucleus'}}}]}


def write_folder(out, *, fold: int = 0, data_root=None, limit: int = 0) -> dict[str, list[str]]:
  """Writes the folder (see the module docstring); returns the split written to splits.json."""
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  split = splits.load_split('tnbc', fold, data_root=data_root)
  if limit:
    split = {part: ids[:limit] for part, ids in split.items()}
  wanted = {i: part for part, ids in split.items() for i in ids}
  for example in tnbc.iter_examples(datasets.raw_dir('tnbc', data_root=data_root)):
    image_id = example['id']
    if image_id not in wanted:
      continue
    PIL.Image.fromarray(example['image']).save(out / f'{image_id}.png')
    (out / f'{image_id}.geojson').write_text(json.dumps(qupath_multipoint(example['points'])))
    if wanted[image_id] == 'test':
      tifffile.imwrite(out / f'{image_id}.mask.tif', example['instances'].astype(np.int32))
  (out / 'splits.json').write_text(json.dumps(split, indent=1) + '\n')
  return split


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', required=True, help='folder to write (created if needed)')
  parser.add_argument('--fold', type=int, default=0)
  parser.add_argument('--data_root', default=None, help='raw datasets (default: paths.data_root())')
  parser.add_argument('--limit', type=int, default=0, help='first N ids of each part (0 = all)')
  args = parser.parse_args(argv)
  try:
    split = write_folder(args.out, fold=args.fold, data_root=args.data_root, limit=args.limit)
  except images.DataError as error:  # e.g. no TNBC under the data root: one line, status 2
    sys.exit(f'error: {error}')
  print(f'wrote {args.out}: ' + ', '.join(f'{part} {len(ids)}' for part, ids in split.items()))


if __name__ == '__main__':
  main()
