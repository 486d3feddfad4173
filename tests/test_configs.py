"""Config variants: sizes, `plus`, their combination, and the errors for bad names."""

import importlib

import pytest

from configs import default

DATASETS = ('tnbc', 'consep', 'monuseg', 'cryonuseg', 'demo')


@pytest.mark.parametrize('name', DATASETS)
def test_every_dataset_has_cpu_and_plus_variants(name):
  module = importlib.import_module(f'configs.{name}')
  paper, cpu, plus = (module.get_config(v) for v in ('', 'cpu', 'cpu,plus'))
  assert paper.labels.initial == 'disks' and paper.model.encoder == 'resnet50'
  assert cpu.labels.initial == 'disks' and cpu.model.encoder == 'resnet18'
  assert cpu.train.max_steps > 0  # bounded by the CPU hour whatever the dataset's size
  assert plus.labels.initial == 'watershed'
  assert plus.to_dict() == {**cpu.to_dict(),
                            'labels': {**cpu.labels.to_dict(), 'initial': 'watershed'},
                            'loss': {**cpu.loss.to_dict(), 'use_ccl': False}}
  assert cpu.loss.use_ccl and plus.loss.use_dcs
  assert module.get_config('plus').model.encoder == 'resnet50'  # plus alone: paper scale


def test_paper_method_defaults():
  config = default.get_config(None)
  assert config.loss.theta == 0.8 and config.labels.r == 4. and config.labels.d == 20.
  assert config.loss.cam_statistics == 'running'  # the fix of issue 9, not a paper choice
  assert config.train.select_metric == 'point_f1'  # no true mask selects the checkpoint


@pytest.mark.parametrize('variant', ['fast', 'cpu,smoke', 'plus,plus,lite,cpu'])
def test_bad_variants(variant):
  with pytest.raises(ValueError, match='variant'):
    default.get_config(variant)
