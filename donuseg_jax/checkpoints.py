"""Orbax checkpoints of a training run: the latest few, and the best by validation score.

Layout under `DIR/checkpoints`:
  latest/<step>/   the last `keep` checkpoints (asynchronous saves; a kill mid-save leaves only a
                   temporary folder that Orbax ignores, so the previous complete step is restored)
  best/<step>/     the checkpoint with the highest validation score (model selection never sees
                   the test fold)
  damaged/         steps found damaged by a resumed training, moved aside (never deleted)

Each checkpoint holds the train state (`state`: step, params, batch_stats, opt_state, and `ema`,
the weight average, when the run keeps one) and a small JSON (`meta`): the step, the data position
and the validation metrics. The data pipeline is a pure function of (data seed, step) and training
randomness is `fold_in(key, step)`, so the step is the whole position: a resumed run sees exactly
the batches an uninterrupted run would have.

Integrity. Once a save has finished, a manifest (`<step>/donuseg_manifest.json`: size and SHA-256
of every file) is written beside it. A restore checks the manifest, restores, and checks that the
restored step is the step asked for; a step that fails is reported by its folder and the next
older intact one is used. Retention is ours, not Orbax's: Orbax removes old steps once a new save
is finalised even when that save failed (a full disk), so here an old step is deleted only when
`keep` newer steps are complete on disk.
"""

import dataclasses
import hashlib
import json
import pathlib
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

from donuseg_jax import atomic_io

MANIFEST = 'donuseg_manifest.json'
WHICH = ('latest', 'best')


class CheckpointError(RuntimeError):
  """No usable checkpoint: none saved, every one damaged, or one that does not fit the model."""


@dataclasses.dataclass
class Restored:
  state: Any
  meta: dict
  which: str  # the folder it came from ('best' may fall back to 'latest')
  step: int
  damaged: list  # [(step folder, reason)] of newer steps skipped as damaged


class RunCheckpoints:
  """The two Orbax managers of one work dir.

  read_only=True (evaluate, predict, reports) creates no folder and writes nothing; a work dir
  without checkpoints then simply has no steps.
  """

  def __init__(self, workdir: str | pathlib.Path, *, keep: int = 3, async_save: bool = True,
               read_only: bool = False):
    self.root = pathlib.Path(workdir).resolve() / 'checkpoints'
    self.keep = max(1, int(keep))
    self.read_only = read_only
    self._managers = {}
    for which in WHICH:
      directory = self.root / which
      if read_only and not directory.is_dir():
        continue
      self._managers[which] = ocp.CheckpointManager(
          directory,
          options=ocp.CheckpointManagerOptions(
              max_to_keep=None, enable_async_checkpointing=async_save and not read_only,
              cleanup_tmp_directories=not read_only, read_only=read_only, create=not read_only,
              best_fn=(lambda metrics: metrics['val_score']) if which == 'best' else None,
              best_mode='max', save_interval_steps=0 if read_only else 1),
          item_names=('state', 'meta'))
    self._in_flight = {which: None for which in WHICH}
    self._best_reference = self._read_best_reference()

  # Which steps exist.
  def steps(self, which: str) -> list[int]:
    manager = self._managers.get(which)
    return sorted(manager.all_steps()) if manager is not None else []

  def latest_step(self) -> int | None:
    steps = self.steps('latest')
    return steps[-1] if steps else None

  def best_step(self) -> int | None:
    """The newest saved best step: each one saved supersedes the earlier ones (see `save_best`)."""
    steps = self.steps('best')
    return steps[-1] if steps else None

  def step_dir(self, which: str, step: int) -> pathlib.Path:
    return self.root / which / str(step)

  # Saving.
  def save_latest(self, step: int, state: Any, meta: dict) -> None:
    self._save('latest', step, state, meta, metrics=None)

  def save_best(self, step: int, state: Any, meta: dict, *, score: float,
                margin: float = 0.0) -> None:
    """Keeps the checkpoint if its validation score (`config.train.select_metric`) beats every
    earlier one (the first of equal scores stays), or, with margin > 0, if it comes within the
    margin of the highest score so far: of checkpoints that validation cannot tell apart, the later
    one is kept. The margin is the one that came with the highest score (its standard error), so
    a slow decline cannot walk the choice down: every kept checkpoint is within one margin of
    the best seen."""
    score, margin = float(score), max(0.0, float(margin))
    reference = self._best_reference
    within = reference is not None and reference[1] > 0 and score >= reference[0] - reference[1]
    if reference is not None and not (score > reference[0] or within):
      return
    if reference is None or score > reference[0]:
      reference = (score, margin)
    self._save('best', step, state, meta, metrics={
        'val_score': score, 'reference_score': reference[0], 'reference_margin': reference[1]})
    self._best_reference = reference

  def _save(self, which: str, step: int, state: Any, meta: dict, *, metrics) -> None:
    if self.read_only:
      raise CheckpointError(f'{self.root} was opened read-only')
    manager = self._managers[which]
    if step in manager.all_steps():  # a resumed run replaying a step saved before the kill
      return
    manager.save(step, args=_save_args(state, meta), metrics=metrics, force=True)
    # Orbax waited for the previous save before starting this one: seal it, then prune.
    self._in_flight[which] = step
    self._seal_and_prune(which)

  def wait(self) -> None:
    for which, manager in self._managers.items():
      manager.wait_until_finished()
      self._in_flight[which] = None
      if not self.read_only:
        self._seal_and_prune(which)

  def close(self) -> None:
    self.wait()
    for manager in self._managers.values():
      manager.close()

  def _complete_steps(self, which: str) -> list[int]:
    """Steps whose save has finished: on disk under their final name, not the one in flight."""
    return [s for s in self.steps(which)
            if s != self._in_flight[which] and self.step_dir(which, s).is_dir()]

  def _seal_and_prune(self, which: str) -> None:
    complete = self._complete_steps(which)
    if jax.process_index() == 0:
      for step in complete:
        if not (self.step_dir(which, step) / MANIFEST).exists():
          write_manifest(self.step_dir(which, step))
    if which == 'latest':
      doomed = complete[:-self.keep]
    else:  # only better steps are saved: the newest complete one is the best
      doomed = complete[:-1]
    for step in doomed:
      self._managers[which].delete(step)

  def _read_best_reference(self) -> tuple[float, float] | None:
    """(highest score so far, its margin), from the newest readable best step (a resumed run).
    Steps saved before margins existed hold only their score: margin 0."""
    manager = self._managers.get('best')
    for step in reversed(self.steps('best')):
      try:
        metrics = manager.metrics(step)
        return (float(metrics.get('reference_score', metrics['val_score'])),
                float(metrics.get('reference_margin', 0.0)))
      except Exception:  # unreadable metrics: a damaged step; restore reports it
        continue
    return None

  # Restoring.
  def restore(self, abstract_state: Any, *, which: str = 'latest', step: int | None = None):
    """(state, meta) of the newest intact step of `which` (see `restore_intact`)."""
    restored = self.restore_intact(abstract_state, which=which, step=step)
    return restored.state, restored.meta

  def restore_intact(self, abstract_state: Any, *, which: str = 'latest',
                     step: int | None = None, fallback_to_latest: bool = False,
                     partial: bool = False) -> Restored:
    """Restores and verifies a checkpoint shaped and sharded like `abstract_state`.

    Candidates, newest (or best) first: every step of `which`, or only `step` if given; with
    `fallback_to_latest`, the latest steps follow the best ones. Each damaged candidate is logged
    as a warning naming its folder and listed in `Restored.damaged`. partial=True restores only
    the leaves of `abstract_state` (e.g. params without the optimiser state). CheckpointError when none is
    usable, or when a step whose manifest checks out still does not fit `abstract_state` (a
    model of another shape: not damage, so no older step is tried).
    """
    if which not in WHICH:
      raise ValueError(f'which must be one of {WHICH}, got {which!r}')
    if step is not None:
      candidates = [(which, step)]
    elif which == 'best':  # newest first: each saved best supersedes the earlier ones
      candidates = [('best', s) for s in reversed(self.steps('best'))]
    else:
      candidates = [('latest', s) for s in reversed(self.steps('latest'))]
    if fallback_to_latest and which == 'best' and step is None:
      candidates += [('latest', s) for s in reversed(self.steps('latest'))]
    if not candidates:
      raise CheckpointError(f'no {which} checkpoint in {self.root / which}')
    if partial:
      state_args = ocp.args.PyTreeRestore(
          item=abstract_state, partial_restore=True,
          restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state))
    else:
      state_args = ocp.args.StandardRestore(abstract_state)
    damaged = []
    for source, candidate in candidates:
      folder = self.step_dir(source, candidate)
      problem = verify_manifest(folder)
      if problem is None:
        verified = (folder / MANIFEST).exists()
        try:
          restored = self._managers[source].restore(candidate, args=ocp.args.Composite(
              state=state_args, meta=ocp.args.JsonRestore()))
        except Exception as error:  # Orbax / TensorStore raise many types on damaged files
          if verified:  # the files are as saved: the model, not the checkpoint, differs
            raise CheckpointError(
                f'{folder} is intact (checksums match) but does not fit this model '
                f'({_first_line(error)}); was the run trained with another config?') from error
          problem = f'cannot be restored ({_first_line(error)})'
        else:
          problem = _check_step(restored, candidate)
      if problem is None:
        return Restored(state=restored['state'], meta=restored['meta'], which=source,
                        step=candidate, damaged=damaged)
      logging.warning('checkpoint %s is damaged: %s; trying an older one', folder, problem)
      damaged.append((str(folder), problem))
    listing = '\n  '.join(f'{path}: {problem}' for path, problem in damaged)
    raise CheckpointError(f'no intact {which} checkpoint in {self.root}:\n  {listing}')

  def set_aside(self, damaged: list) -> None:
    """Moves damaged step folders to checkpoints/damaged/ (kept for inspection, never deleted),
    so that training can save those steps again."""
    if self.read_only or not damaged:
      return
    if jax.process_index() == 0:
      target = self.root / 'damaged'
      target.mkdir(exist_ok=True)
      for path, _ in damaged:
        path = pathlib.Path(path)
        if path.exists():
          name = f'{path.parent.name}-{path.name}'
          destination, n = target / name, 1
          while destination.exists():
            destination, n = target / f'{name}.{n}', n + 1
          shutil.move(str(path), str(destination))
          logging.warning('moved damaged checkpoint %s to %s', path, destination)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # noqa: PLC0415
      multihost_utils.sync_global_devices('donuseg_set_aside')
    for manager in self._managers.values():
      manager.reload()
    self._best_reference = self._read_best_reference()


def write_manifest(step_dir: pathlib.Path) -> None:
  """Records size and SHA-256 of every file of a finished step (atomically, inside the step)."""
  files = {str(path.relative_to(step_dir)): [path.stat().st_size, _sha256(path)]
           for path in _step_files(step_dir)}
  atomic_io.write_json(step_dir / MANIFEST, {'step_dir': step_dir.name, 'files': files})


def verify_manifest(step_dir: pathlib.Path) -> str | None:
  """None if the step matches its manifest (or has none yet); else what is wrong, naming a file."""
  if not step_dir.is_dir():
    return 'missing'
  path = step_dir / MANIFEST
  if not path.exists():
    return None  # finished but killed before sealing: the restore itself is the check
  try:
    files = json.loads(path.read_text())['files']
  except (OSError, ValueError, KeyError, TypeError) as error:
    return f'unreadable manifest {path} ({error})'
  for name, (size, digest) in sorted(files.items()):
    file = step_dir / name
    if not file.is_file():
      return f'file {file} is missing'
    if file.stat().st_size != size:
      return f'file {file} has {file.stat().st_size} bytes, {size} when saved'
    if _sha256(file) != digest:
      return f'file {file} has changed since it was saved (checksum)'
  return None


def _step_files(step_dir: pathlib.Path) -> list[pathlib.Path]:
  return sorted(p for p in step_dir.rglob('*')
                if p.is_file() and not p.name.startswith(('.' + MANIFEST, MANIFEST)))


def _sha256(path: pathlib.Path) -> str:
  digest = hashlib.sha256()
  with path.open('rb') as stream:
    for block in iter(lambda: stream.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


def _check_step(restored, step: int) -> str | None:
  """The restored checkpoint must say it is the step whose folder it came from."""
  meta_step = (restored['meta'] or {}).get('step')
  if meta_step is not None and int(meta_step) != step:
    return f'its meta says step {meta_step}'
  state = restored['state']
  state_step = getattr(state, 'step', None)
  if state_step is None and isinstance(state, dict):
    state_step = state.get('step')
  if state_step is not None and int(jax.device_get(state_step)) != step:
    return f'its state holds step {int(jax.device_get(state_step))}'
  return None


def _first_line(error: Exception) -> str:
  text = str(error).strip().splitlines()
  line = text[0] if text else type(error).__name__
  return line[:300]


def _save_args(state: Any, meta: dict) -> ocp.args.Composite:
  return ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
