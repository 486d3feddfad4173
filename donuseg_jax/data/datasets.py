"""The datasets the project knows, and loading one into memory as whole-image examples.

`DATASETS` is a plain dict (no registry): name -> where its raw files live, its reader and its TFDS
builder. `load_examples` prepares the TFDS array_record files once (from the local raw files) and
reads them back; the datasets are small (at most a few hundred MB decoded), so every example is
kept in memory as NumPy arrays.

Raw folders under the data root: tnbc/, consep/, monuseg/, cryonuseg/ (the Kaggle release) or else
cryonuseg_pilot/ (two pilot tiles). Delete `<tfds_dir>/<name>` to rebuild after the raw files change.
"""

import contextlib
import dataclasses
import pathlib
import sys

import tensorflow_datasets as tfds

from donuseg_jax.data import images
from donuseg_jax.data import paths
from donuseg_jax.data import synthetic
from donuseg_jax.data.builders.consep import consep_dataset_builder
from donuseg_jax.data.builders.cryonuseg import cryonuseg_dataset_builder
from donuseg_jax.data.builders.monuseg import monuseg_dataset_builder
from donuseg_jax.data.builders.synthetic import synthetic_dataset_builder
from donuseg_jax.data.builders.tnbc import tnbc_dataset_builder
from donuseg_jax.data.readers import consep
from donuseg_jax.data.readers import cryonuseg
from donuseg_jax.data.readers import folder
from donuseg_jax.data.readers import monuseg
from donuseg_jax.data.readers import tnbc


@dataclasses.dataclass(frozen=True)
class Dataset:
  folders: tuple  # raw folder names under the data root, first existing one wins ('' = none)
  layout: str  # what the folder must hold, for error messages
  builder: type | None  # TFDS builder class (None: read directly, without TFDS)


DATASETS = {
    'tnbc': Dataset(('tnbc',), tnbc.LAYOUT, tnbc_dataset_builder.Builder),
    'consep': Dataset(('consep',), consep.LAYOUT, consep_dataset_builder.Builder),
    'monuseg': Dataset(('monuseg',), monuseg.LAYOUT, monuseg_dataset_builder.Builder),
    'cryonuseg': Dataset(('cryonuseg', 'cryonuseg_pilot'), cryonuseg.LAYOUT,
                         cryonuseg_dataset_builder.Builder),
    'synthetic': Dataset((), 'nothing (generated)', synthetic_dataset_builder.Builder),
    # A user's folder (data_root = the folder itself), read directly: see data/folder.py.
    'folder': Dataset((), folder.LAYOUT, None),
}


def raw_dir(name: str, *, data_root=None) -> pathlib.Path:
  """The raw folder of dataset `name`; DataError naming the path and the layout when missing."""
  dataset = _get(name)
  root = paths.data_root(str(data_root or ''))
  for folder in dataset.folders:
    if (root / folder).is_dir():
      return root / folder
  tried = ' or '.join(str(root / f) for f in dataset.folders)
  raise images.DataError(
      f'{name}: dataset folder {tried} does not exist; expected in it {dataset.layout}')


def list_image_ids(name: str, *, data_root=None, subset: str | None = None,
                   synthetic_images: int = 40) -> list[str]:
  """Sorted image ids from file names only (no decoding): what the split files are made from.

  subset None = every image of the dataset; MoNuSeg: 'train' | 'test' (None = both present),
  CoNSeP: 'train' | 'test'. Other datasets have one subset and ignore it.
  """
  if name == 'synthetic':
    return synthetic.list_ids(synthetic_images)
  if name == 'folder':
    return sorted(entry.stem for entry in folder.scan(data_root).entries)
  root = raw_dir(name, data_root=data_root)
  if name == 'tnbc':
    return tnbc.list_ids(root)
  if name == 'consep':
    return consep.list_ids(root, subset=subset)
  if name == 'monuseg':
    subsets = [subset] if subset else monuseg.available_subsets(root)
    return sorted(i for s in subsets for i in monuseg.list_ids(root, subset=s))
  return cryonuseg.list_ids(root)


def region_reports(name: str, *, data_root=None) -> dict:
  """Per-image account of dropped polygons (MoNuSeg, CryoNuSeg ROIs): {subset: {id: report}}."""
  if name not in ('monuseg', 'cryonuseg'):
    return {}
  root = raw_dir(name, data_root=data_root)
  if name == 'monuseg':
    return {s: monuseg.region_reports(root, subset=s) for s in monuseg.available_subsets(root)}
  if name == 'cryonuseg':
    return {'train': cryonuseg.region_reports(root)}
  return {}


def create_builder(name: str, *, data_root=None, tfds_dir=None, synthetic_images: int = 40,
                   synthetic_size: int = 512, download: bool = False) -> tfds.core.DatasetBuilder:
  """The TFDS builder of `name`, writing under `tfds_dir` (paths.tfds_dir() when None).

  download=True lets TNBC fetch its Zenodo zip when the local folder is missing (the other
  datasets have no public direct download).
  """
  dataset = _get(name)
  if dataset.builder is None:
    raise ValueError(f'{name} is read directly, it has no TFDS builder (see data/folder.py)')
  kwargs = {'data_dir': str(paths.tfds_dir(str(tfds_dir or ''))), 'file_format': 'array_record'}
  if name == 'synthetic':
    config = synthetic_dataset_builder.make_config(num_images=synthetic_images, size=synthetic_size)
    if config.name in {c.name for c in dataset.builder.BUILDER_CONFIGS}:
      config = config.name  # TFDS refuses a second object named like a predefined config
    return dataset.builder(config=config, **kwargs)
  if name == 'tnbc' and download:
    try:
      return dataset.builder(raw_dir=raw_dir(name, data_root=data_root), **kwargs)
    except images.DataError:
      return dataset.builder(raw_dir=None, **kwargs)  # -> download_and_extract(tnbc.URL)
  root = raw_dir(name, data_root=data_root)
  if name == 'cryonuseg':
    kwargs['config'] = 'pilot' if cryonuseg.layout(root) == 'pilot' else 'annotator1'
  return dataset.builder(raw_dir=root, **kwargs)


def load_examples(name: str, *, data_root=None, tfds_dir=None, subset: str | None = None,
                  synthetic_images: int = 40, synthetic_size: int = 512,
                  download: bool = False) -> list[dict]:
  """Every example of `name` (of one TFDS split when `subset` is given), sorted by id.

  Prepares the TFDS files on first use. Examples follow the contract of `batch.py`; id and group
  are str. Splits: 'train' for every dataset, plus 'test' for CoNSeP (official) and MoNuSeg (when
  MoNuSegTestData/ is present).
  """
  if name == 'folder':  # data_root is the folder; no TFDS files
    return [folder.read_example(entry) for entry in folder.scan(data_root).entries]
  builder = create_builder(name, data_root=data_root, tfds_dir=tfds_dir,
                           synthetic_images=synthetic_images, synthetic_size=synthetic_size,
                           download=download)
  prepare(builder)
  sources = builder.as_data_source()
  if subset is not None and subset not in sources:
    raise ValueError(f'{name} has splits {sorted(sources)}, not {subset!r}')
  examples = []
  for split in ([subset] if subset else sorted(sources)):
    source = sources[split]
    examples += [_to_example(source[i]) for i in range(len(source))]
  return sorted(examples, key=lambda example: example['id'])


def prepare(builder: tfds.core.DatasetBuilder) -> None:
  """download_and_prepare, with TFDS's status prints sent to stderr (stdout stays clean for JSON)."""
  with contextlib.redirect_stdout(sys.stderr):
    builder.download_and_prepare()


def _to_example(record: dict) -> dict:
  return {
      'image': record['image'],
      'instances': record['instances'],
      'points': record['points'],
      'id': _text(record['id']),
      'group': _text(record['group']),
  }


def _text(value) -> str:
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)


def _get(name: str) -> Dataset:
  if name not in DATASETS:
    raise ValueError(f'unknown dataset {name!r}; expected one of {sorted(DATASETS)}')
  return DATASETS[name]
