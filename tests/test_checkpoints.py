"""RunCheckpoints: latest-k retention, best by validation AJI, restore to a sharded target, a full
disk mid-save."""

import errno
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from donuseg_jax import checkpoints


def _state(value: float):
  return {'step': jnp.asarray(int(value), jnp.int32), 'w': jnp.full((3, 2), value, jnp.float32)}


def _abstract(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)


def test_latest_keeps_the_last_few_and_restores_meta(tmp_path):
  ckpts = checkpoints.RunCheckpoints(tmp_path, keep=2)
  for step in (1, 2, 3):
    ckpts.save_latest(step, _state(step), {'step': step})
  ckpts.wait()
  assert ckpts.steps('latest') == [2, 3]
  state, meta = ckpts.restore(_abstract(_state(0)), which='latest')
  np.testing.assert_array_equal(state['w'], np.full((3, 2), 3.0))
  assert meta == {'step': 3}
  ckpts.close()


def test_best_follows_validation_aji_not_recency(tmp_path):
  ckpts = checkpoints.RunCheckpoints(tmp_path, keep=2)
  for step, aji in ((10, 0.30), (20, 0.45), (30, 0.40)):
    ckpts.save_best(step, _state(step), {"step": step}, score=aji)
  ckpts.wait()
  assert ckpts.best_step() == 20
  state, _ = ckpts.restore(_abstract(_state(0)), which='best')
  np.testing.assert_array_equal(state['w'], np.full((3, 2), 20.0))
  ckpts.close()
  # A new manager over the same folder (a resumed run) sees the same best.
  again = checkpoints.RunCheckpoints(tmp_path, keep=2)
  assert again.best_step() == 20
  again.close()


def test_a_margin_keeps_the_later_of_checkpoints_within_it_of_the_best(tmp_path):
  """With a margin (the standard error that came with the highest score), a later checkpoint
  within it of the highest score replaces the best; one below it does not; and the margin stays
  the highest score's, so a slow decline cannot walk the choice down, also after a resume."""
  ckpts = checkpoints.RunCheckpoints(tmp_path, keep=2)
  for step, score, margin in ((10, 0.50, 0.03), (20, 0.48, 0.10), (30, 0.46, 0.10),
                              (40, 0.475, 0.0)):
    ckpts.save_best(step, _state(step), {'step': step}, score=score, margin=margin)
    ckpts.wait()
    assert ckpts.best_step() == {10: 10, 20: 20, 30: 20, 40: 40}[step]
  state, _ = ckpts.restore(_abstract(_state(0)), which='best')
  np.testing.assert_array_equal(state['w'], np.full((3, 2), 40.0))
  ckpts.close()
  again = checkpoints.RunCheckpoints(tmp_path, keep=2)  # resumed: the reference is 0.50 +- 0.03
  again.save_best(50, _state(50), {'step': 50}, score=0.465, margin=0.5)
  again.wait()
  assert again.best_step() == 40
  again.save_best(60, _state(60), {'step': 60}, score=0.51, margin=0.0)  # a new highest score
  again.save_best(70, _state(70), {'step': 70}, score=0.505, margin=0.0)  # its margin is 0
  again.save_best(80, _state(80), {'step': 80}, score=0.51, margin=0.0)  # equal: the first stays
  again.wait()
  assert again.best_step() == 60
  again.close()


def test_restore_without_checkpoint_names_the_folder(tmp_path):
  ckpts = checkpoints.RunCheckpoints(tmp_path)
  with pytest.raises(checkpoints.CheckpointError) as error:
    ckpts.restore(_abstract(_state(0)), which='latest')
  assert 'latest' in str(error.value) and str(tmp_path) in str(error.value)
  ckpts.close()


async def _disk_full(self, item, directory):
  """JsonCheckpointHandler's write on a full disk: a torn start of the file, then ENOSPC (the
  arrays of the same step are being written beside it: the step is left half on disk)."""
  path = directory / self._filename
  path.write_text(json.dumps(item)[:5])
  raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


@pytest.mark.parametrize('which', ['latest', 'best'])
def test_a_save_on_a_full_disk_fails_loudly_and_keeps_every_older_step(tmp_path, monkeypatch,
                                                                      which):
  """Retention counts only complete steps: a save that fails midway deletes nothing older, is
  never taken as the newest step, and its error reaches the caller (training stops on it)."""
  def save(ckpts, step):
    if which == 'latest':
      ckpts.save_latest(step, _state(step), {'step': step})
    else:  # ever better scores: each one is kept as the new best
      ckpts.save_best(step, _state(step), {'step': step}, score=step / 10)

  ckpts = checkpoints.RunCheckpoints(tmp_path, keep=2)
  for step in (1, 2, 3):
    save(ckpts, step)
  ckpts.wait()
  kept = [2, 3] if which == 'latest' else [3]
  assert ckpts.steps(which) == kept

  monkeypatch.setattr(ocp.handlers.JsonCheckpointHandler, '_save_fn', _disk_full)
  with pytest.raises(OSError) as error:  # at the next save or at the wait, as Orbax reports it
    save(ckpts, 4)
    save(ckpts, 5)
    ckpts.wait()
  assert error.value.errno == errno.ENOSPC
  ckpts.wait()
  assert ckpts.steps(which) == kept

  def check_intact(manager):
    assert manager.steps(which) == kept
    newest = manager.restore_intact(_abstract(_state(0)), which=which)
    assert (newest.step, newest.damaged) == (3, [])
    for step in kept:
      assert checkpoints.verify_manifest(manager.step_dir(which, step)) is None
      state, meta = manager.restore(_abstract(_state(0)), which=which, step=step)
      np.testing.assert_array_equal(state['w'], np.full((3, 2), float(step)))
      assert meta == {'step': step}

  check_intact(ckpts)
  again = checkpoints.RunCheckpoints(tmp_path, keep=2)  # a rerun after the crash sees the same
  check_intact(again)
  assert (again.latest_step() if which == 'latest' else again.best_step()) == 3
  again.close()
  # Space again: saving goes on, and retention with it.
  monkeypatch.undo()
  save(ckpts, 6)
  ckpts.wait()
  assert ckpts.steps(which) == ([3, 6] if which == 'latest' else [6])
  ckpts.close()
