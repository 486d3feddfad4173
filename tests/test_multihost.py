"""Two real JAX processes on loopback form one 2-device mesh: same batches and same step as one process.

The test starts this file twice as a script (`python tests/test_multihost.py WORKER MODE OUT`), each
child with one CPU device, gloo CPU collectives and the DONUSEG_* variables, so that
`parallel.maybe_initialize_distributed()` is what joins them (DESIGN.md sections 6 and 7). Each
child builds only its own rows of the smoke config's training batches
(`TrainBatches(process_index, process_count=2)`) and assembles the global batch with
`parallel.shard_batch`; the parent recomputes everything in one process and compares.
"""

import os
import pathlib
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script (the children): no conftest.py there
  sys.path.insert(0, str(REPO_ROOT))

from configs import demo  # noqa: E402
from donuseg_jax import parallel  # noqa: E402
from donuseg_jax.data import folds  # noqa: E402
from donuseg_jax.data import pipeline  # noqa: E402

NUM_PROCESSES = 2
BATCH_STEPS = (0, 1)
CHILD_TIMEOUT_S = 600  # generous: the machine running the suite may be shared


def _smoke_config():
  return demo.get_config('smoke')


def _train_batches(config, *, process_index: int, process_count: int) -> pipeline.TrainBatches:
  prepared = pipeline.prepare_images(folds.load_fold_examples(config)['train'], config=config)
  return pipeline.TrainBatches(prepared, config=config, process_index=process_index,
                               process_count=process_count)


def batch_statistics(batch: dict) -> dict:
  """Per-row checksums and batch totals of a training batch (jit-able; totals reduce over rows).

  Integer sums stay in int32 (x64 is off): a smoke row's image sum is at most
  64 * 64 * 3 * 255 ~ 3.1e6, its position-weighted sum at most 60 times that ~ 1.9e8, and the
  batch total of 4 such rows ~ 7.5e8 < 2**31.
  """
  image = batch['image'].astype(jnp.int32)  # (B, S, S, 3)
  rows = image.shape[0]
  flat = image.reshape(rows, -1)  # (B, S*S*3)
  # Weights by position (mod a prime) make the checksum see moved pixels, not only their sum.
  weights = (jnp.arange(flat.shape[1], dtype=jnp.int32) % 61)[None]  # (1, S*S*3)
  label = batch['label_m'].astype(jnp.int32)  # (B, S, S)
  per_row = {
      'image_sum': flat.sum(1),
      'image_checksum': (flat * weights).sum(1),
      'label_foreground': (label == 1).sum((1, 2)),
      'label_ignored': (label == -1).sum((1, 2)),
      'instances_sum': batch['instances'].sum((1, 2)),
      'valid_points': batch['point_valid'].sum(1, dtype=jnp.int32),
      'valid_boxes': batch['box_valid'].sum(1, dtype=jnp.int32),
      'points_sum': batch['points'].sum((1, 2)),
      'boxes_sum': batch['boxes'].sum((1, 2)),
  }
  totals = {f'total_{k}': v.sum() for k, v in per_row.items()}
  return {**per_row, **totals}


def _host_value(x) -> np.ndarray:
  """A replicated global array's value on this process (its first local shard holds all of it)."""
  return np.asarray(x.addressable_shards[0].data)


# ----------------------------------------------------------------------------- children


def _worker_batches(out: pathlib.Path) -> None:
  """Statistics, and the whole global batch gathered onto every device, for BATCH_STEPS."""
  config = _smoke_config()
  mesh = parallel.create_mesh()
  batches = _train_batches(config, process_index=jax.process_index(),
                           process_count=jax.process_count())
  replicated = parallel.replicated(mesh)
  statistics = jax.jit(batch_statistics, out_shardings=replicated)
  gather = jax.jit(lambda b: b, out_shardings=replicated)  # all-gather over the two processes
  result = {}
  for step in BATCH_STEPS:
    local = batches.batch_at(step)
    result.update({f'local/{step}/{k}': v for k, v in local.items()})
    global_batch = parallel.shard_batch(local, mesh)
    for key, value in global_batch.items():
      if value.shape[0] != config.data.batch_size:
        raise AssertionError(f'global {key} has {value.shape[0]} rows, not {config.data.batch_size}')
    result.update({f'stats/{step}/{k}': _host_value(v)
                   for k, v in statistics(global_batch).items()})
    result.update({f'gathered/{step}/{k}': _host_value(v)
                   for k, v in gather(global_batch).items()})
  np.savez(out, **result)


def _worker_step(out: pathlib.Path) -> None:
  """One train step on the 2-process mesh; every process saves its (replicated) result."""
  from donuseg_jax import train  # noqa: PLC0415 (model and losses only where needed)

  config = _smoke_config()
  mesh = parallel.create_mesh()
  batches = _train_batches(config, process_index=jax.process_index(),
                           process_count=jax.process_count())
  state, metrics = _one_train_step(config, batches.batch_at(0), mesh, train)
  leaves = {f'state/{i}': _host_value(x) for i, x in enumerate(jax.tree.leaves(state))}
  np.savez(out, loss=_host_value(metrics['loss']), **leaves)


def _one_train_step(config, local_batch, mesh, train):
  graphdef, state, tx, schedule = train.create_train_state(config, total_steps=10)
  _progress('state created')
  state = jax.device_put(state, parallel.replicated(mesh))
  step_fn = train.compile_train_step(mesh, graphdef=graphdef, tx=tx, schedule=schedule,
                                     config=config, steps_per_epoch=5)
  state, metrics = jax.block_until_ready(step_fn(state, parallel.shard_batch(local_batch, mesh)))
  _progress('step done')
  return state, metrics


def _progress(what: str) -> None:
  """A time-stamped line in a child's log, so a timeout shows how far each process got."""
  print(f'[{time.strftime("%H:%M:%S")} process {jax.process_index()}] {what}', file=sys.stderr,
        flush=True)


def _worker_main(mode: str, out: str) -> None:
  parallel.maybe_initialize_distributed()  # joins the other process (DONUSEG_* variables)
  if jax.process_count() != NUM_PROCESSES or len(jax.devices()) != NUM_PROCESSES:
    raise AssertionError(f'expected {NUM_PROCESSES} processes with one device each, got '
                         f'{jax.process_count()} processes and devices {jax.devices()}')
  {'batches': _worker_batches, 'step': _worker_step}[mode](pathlib.Path(out))


# ----------------------------------------------------------------------------- parent


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


class _TwoProcesses:
  """Both children of one mode, started on a fresh loopback port; `wait` returns their outputs."""

  def __init__(self, mode: str, tmp_path: pathlib.Path):
    port = _free_port()
    self.procs, self.logs, self.outs = [], [], []
    for rank in range(NUM_PROCESSES):
      env = dict(os.environ)
      env.update({
          'XLA_FLAGS': '--xla_force_host_platform_device_count=1',  # conftest.py set 4 for us
          'JAX_PLATFORMS': 'cpu',
          'PYTHONPATH': str(REPO_ROOT),
          'DONUSEG_COORDINATOR': f'127.0.0.1:{port}',
          'DONUSEG_NUM_PROCESSES': str(NUM_PROCESSES),
          'DONUSEG_PROCESS_ID': str(rank),
          'DONUSEG_CPU_COLLECTIVES': 'gloo',
      })
      self.outs.append(tmp_path / f'{mode}_{rank}.npz')
      # Logs go to files: a child blocked on a full pipe would stall the other in a collective.
      self.logs.append(open(tmp_path / f'{mode}_{rank}.log', 'w+'))  # noqa: SIM115
      self.procs.append(subprocess.Popen(
          [sys.executable, __file__, 'WORKER', mode, str(self.outs[-1])], cwd=REPO_ROOT,
          env=env, stdout=self.logs[-1], stderr=subprocess.STDOUT))
    self.deadline = time.monotonic() + CHILD_TIMEOUT_S

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self._stop()

  def _stop(self) -> None:
    self._kill()
    for log in self.logs:
      log.close()

  def _kill(self) -> None:
    for p in self.procs:
      if p.poll() is None:
        p.kill()
        p.wait()

  def wait(self) -> list[dict]:
    """Waits for both (stopping both when one fails or time is up); raises with their logs."""
    while any(p.poll() is None for p in self.procs):
      if any(p.returncode for p in self.procs) or time.monotonic() > self.deadline:
        break
      time.sleep(0.2)
    timed_out = time.monotonic() > self.deadline
    self._kill()  # the survivor of a failed pair would wait for its peer until time runs out
    if any(p.returncode != 0 for p in self.procs):
      reports = []
      for rank, (p, log) in enumerate(zip(self.procs, self.logs)):
        log.seek(0)
        reports.append(f'--- process {rank} (exit {p.returncode}) ---\n{log.read()[-4000:]}')
      raise AssertionError((f'timed out after {CHILD_TIMEOUT_S} s\n' if timed_out else '') +
                           '\n'.join(reports))
    results = []
    for out in self.outs:
      with np.load(out) as data:
        results.append(dict(data))
    return results


def test_two_processes_assemble_the_single_process_batches(tmp_path):
  with _TwoProcesses('batches', tmp_path) as children:
    results = children.wait()
  config = _smoke_config()
  reference = _train_batches(config, process_index=0, process_count=1)
  half = config.data.batch_size // NUM_PROCESSES
  statistics = jax.jit(batch_statistics)
  for step in BATCH_STEPS:
    expected = reference.batch_at(step)
    # Not a comparison of copies: the rows (and the two steps) differ from each other.
    assert len({expected['image'][i].tobytes() for i in range(config.data.batch_size)}) == \
        config.data.batch_size
    for rank, result in enumerate(results):
      for key, value in expected.items():
        # Each process built exactly its rows of the global batch...
        np.testing.assert_array_equal(result[f'local/{step}/{key}'],
                                      value[rank * half:(rank + 1) * half], err_msg=key)
        # ... and the assembled global batch, gathered back, is the single-process batch.
        np.testing.assert_array_equal(result[f'gathered/{step}/{key}'], value, err_msg=key)
      for key, value in jax.device_get(statistics(expected)).items():
        got = result[f'stats/{step}/{key}']
        if np.issubdtype(value.dtype, np.integer):
          np.testing.assert_array_equal(got, value, err_msg=key)
        else:
          np.testing.assert_allclose(got, value, rtol=1e-6, err_msg=key)
  assert not np.array_equal(results[0]['gathered/0/image'], results[0]['gathered/1/image'])


@pytest.mark.slow
def test_two_process_train_step_equals_single_device_step(tmp_path):
  from donuseg_jax import train  # noqa: PLC0415 (model and losses)

  config = _smoke_config()
  with _TwoProcesses('step', tmp_path) as children:
    # The single-device reference runs here while the children compile (compilation dominates).
    batch = _train_batches(config, process_index=0, process_count=1).batch_at(0)
    single_state, single_metrics = jax.device_get(
        _one_train_step(config, batch, parallel.create_mesh(jax.devices()[:1]), train))
    results = children.wait()
  single_leaves = jax.tree.leaves(single_state)
  for result in results:
    np.testing.assert_allclose(result['loss'], single_metrics['loss'], rtol=1e-5)
    assert len(result) == len(single_leaves) + 1
    for i, expected in enumerate(single_leaves):
      np.testing.assert_allclose(np.asarray(result[f'state/{i}'], np.float64),
                                 np.asarray(expected, np.float64), rtol=2e-4, atol=2e-6,
                                 err_msg=f'state leaf {i}')
  # The step moved the parameters: the comparison above is not between two untouched states.
  _, initial, _, _ = train.create_train_state(config, total_steps=10)
  moved = [np.abs(np.asarray(a) - np.asarray(b)).max()
           for a, b in zip(jax.tree.leaves(initial.params), jax.tree.leaves(single_state.params))]
  assert max(moved) > 0


if __name__ == '__main__' and sys.argv[1:2] == ['WORKER']:
  _worker_main(*sys.argv[2:])
