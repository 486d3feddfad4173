"""RunCheckpoints: latest-k retention, best by validation AJI, restore to a sharded target."""

import jax
import jax.numpy as jnp
import numpy as np
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


def test_restore_without_checkpoint_names_the_folder(tmp_path):
  ckpts = checkpoints.RunCheckpoints(tmp_path)
  with pytest.raises(checkpoints.CheckpointError) as error:
    ckpts.restore(_abstract(_state(0)), which='latest')
  assert 'latest' in str(error.value) and str(tmp_path) in str(error.value)
  ckpts.close()
