"""Atomic writes: the final name holds the old file or the complete new one, never a part."""

import json
import os

import pytest

from donuseg_jax import atomic_io


def test_write_replaces_whole_file_and_leaves_no_temporary(tmp_path):
  target = tmp_path / 'eval.json'
  target.write_text('old')
  atomic_io.write_json(target, {'aji': 0.5})
  assert json.loads(target.read_text()) == {'aji': 0.5}
  assert sorted(p.name for p in tmp_path.iterdir()) == ['eval.json']


def test_failure_midway_keeps_the_old_file(tmp_path):
  target = tmp_path / 'overlay.png'
  target.write_bytes(b'good')
  with pytest.raises(RuntimeError):
    with atomic_io.atomic_open(target, 'wb') as stream:
      stream.write(b'half')
      raise RuntimeError('killed while writing')
  assert target.read_bytes() == b'good'
  assert sorted(p.name for p in tmp_path.iterdir()) == ['overlay.png']


def test_full_disk_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch):
  target = tmp_path / 'labels.tif'
  target.write_bytes(b'good')

  def no_space(fd):
    raise OSError(28, 'No space left on device')

  monkeypatch.setattr(os, 'fsync', no_space)
  with pytest.raises(atomic_io.OutputError, match='labels.tif.*No space left'):
    atomic_io.write_bytes(target, b'new data')
  assert target.read_bytes() == b'good'
  assert sorted(p.name for p in tmp_path.iterdir()) == ['labels.tif']


def test_unwritable_folder_is_an_output_error(tmp_path):
  with pytest.raises(atomic_io.OutputError, match='missing'):
    atomic_io.write_text(tmp_path / 'missing' / 'x.txt', 'x')
