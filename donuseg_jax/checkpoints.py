"""Orbax checkpoints of a training run: the latest few, and the best by validation AJI.

Layout under `DIR/checkpoints`:
  latest/<step>/   the last `keep` checkpoints (asynchronous saves; a kill mid-save leaves only a
                   temporary folder that Orbax ignores, so the previous complete step is restored)
  best/<step>/     the one checkpoint with the highest validation AJI (model selection never sees
                   the test fold)

Each checkpoint holds the train state (`state`: step, params, batch_stats, opt_state) and a small
JSON (`meta`): the step, the data position and the validation metrics. The data pipeline is a pure
function of (data seed, step) and training randomness is `fold_in(key, step)`, so the step is the
whole position: a resumed run sees exactly the batches an uninterrupted run would have.
"""

import pathlib
from typing import Any

import orbax.checkpoint as ocp


class RunCheckpoints:
  """The two Orbax managers of one work dir."""

  def __init__(self, workdir: str | pathlib.Path, *, keep: int = 3, async_save: bool = True):
    root = pathlib.Path(workdir).resolve() / 'checkpoints'
    self.latest = ocp.CheckpointManager(
        root / 'latest',
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, cleanup_tmp_directories=True),
        item_names=('state', 'meta'))
    self.best = ocp.CheckpointManager(
        root / 'best',
        options=ocp.CheckpointManagerOptions(
            max_to_keep=1, best_fn=lambda metrics: metrics['val_score'], best_mode='max',
            keep_checkpoints_without_metrics=False, enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True),
        item_names=('state', 'meta'))

  def latest_step(self) -> int | None:
    return self.latest.latest_step()

  def best_step(self) -> int | None:
    return self.best.best_step()

  def save_latest(self, step: int, state: Any, meta: dict) -> None:
    self.latest.save(step, args=_save_args(state, meta), force=True)

  def save_best(self, step: int, state: Any, meta: dict, *, score: float) -> None:
    """Offers the checkpoint to the best manager; Orbax keeps it only if its validation score
    (`config.train.select_metric`) is the highest."""
    self.best.save(step, args=_save_args(state, meta), metrics={'val_score': float(score)},
                   force=True)

  def restore(self, abstract_state: Any, *, which: str = 'latest', step: int | None = None):
    """Returns (state, meta) of `which` ('latest' or 'best'), shaped and sharded like the target."""
    manager = {'latest': self.latest, 'best': self.best}[which]
    if step is None:
      step = manager.latest_step() if which == 'latest' else manager.best_step()
    if step is None:
      raise FileNotFoundError(f'no {which} checkpoint in {manager.directory}')
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return restored['state'], restored['meta']

  def wait(self) -> None:
    self.latest.wait_until_finished()
    self.best.wait_until_finished()

  def close(self) -> None:
    self.latest.close()
    self.best.close()


def _save_args(state: Any, meta: dict) -> ocp.args.Composite:
  return ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
