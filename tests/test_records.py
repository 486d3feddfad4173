"""The recorded runs under experiments/runs stay readable by today's code, and the main record is
what the README says it is: a run of today's `configs/tnbc.py:cpu,plus`."""

import json
import pathlib

import pytest

from configs import default
from configs import tnbc
from donuseg_jax import trained_run

RUNS = pathlib.Path(__file__).resolve().parents[1] / 'experiments' / 'runs'
RECORDS = sorted(path.parent.name for path in RUNS.glob(f'*/{trained_run.CONFIG_NAME}'))


def _current(config) -> dict:
  return json.loads(trained_run.config_json(config))


def test_there_are_records():
  assert 'tnbc_cpu_fold0' in RECORDS and len(RECORDS) >= 5


@pytest.mark.parametrize('name', RECORDS)
def test_every_record_has_every_field_of_todays_config(name):
  """A field added to the config without an ADDED_FIELDS entry leaves older runs without it: they
  then cannot resume (check_compatible calls it a change) and code reading the field fails."""
  recorded = trained_run.read_config(RUNS / name).to_dict()
  missing = [key for key, old, _ in trained_run.differences(recorded, _current(default.get_config()))
             if old == trained_run._ABSENT]
  assert not missing, f'{name} lacks {missing}: add them to trained_run.ADDED_FIELDS'


def test_main_record_is_a_run_of_todays_cpu_plus_variant():
  recorded = trained_run.read_config(RUNS / 'tnbc_cpu_fold0').to_dict()
  assert trained_run.differences(recorded, _current(tnbc.get_config('cpu,plus'))) == []
  assert (RUNS / 'tnbc_cpu_fold0' / 'eval_test_image.json').is_file()
