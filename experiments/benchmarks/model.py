"""Benchmark (not a test): FLOPs and CPU time of the DoNuSeg forward pass and train step.

For batch 8 at 256x256 (defaults), per config variant (full = configs/default.py, the paper model;
lite = its `:lite` variant), prints the parameter count, the FLOPs of
  forward     eval mode, no CAMs (what inference runs), and
  train step  forward with CAMs (training mode) + `losses.total_loss` on a synthetic batch
              (a sum of mean squares if the losses package is missing) + gradient + SGD update,
from XLA's cost analysis of the compiled programs, the median wall time per call, and the achieved
FLOP/s as a fraction of this machine's float32 matrix-multiply rate (2048x2048 `jnp.dot`, measured
here first). The machine may be shared with other jobs: the load average is printed with it.

  python experiments/benchmarks/model.py [--variants full,lite] [--batch 8] [--size 256] [--repeats 3]
"""

import argparse
import os
import pathlib
import statistics
import sys
import time

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

from configs import default  # noqa: E402
from donuseg_jax import models  # noqa: E402

try:
  from donuseg_jax import losses  # noqa: E402
except ImportError:  # the model issue does not depend on the losses issue
  losses = None


def _median_seconds(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older JAX: one dict per device program
    cost = cost[0]
  return float(cost['flops'])


def matmul_rate(n: int = 2048, repeats: int = 10) -> float:
  """float32 FLOP/s of an n x n matrix product on the default device."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  dot = jax.jit(jnp.dot)
  jax.block_until_ready(dot(a, b))
  return 2 * n**3 / _median_seconds(lambda: dot(a, b), repeats)


def synthetic_batch(config, batch: int, size: int) -> dict:
  """A training batch with the contract's keys (`data/batch.py`): random labels, points, boxes."""
  rng = np.random.default_rng(0)
  n = config.data.max_points
  points = rng.uniform(0, size, (batch, n, 2)).astype(np.float32)
  sides = rng.uniform(config.labels.box_min, config.labels.box_max, (batch, n, 1)).astype(np.float32)
  boxes = np.clip(np.concatenate([points - sides / 2, points + sides / 2], axis=-1), 0, size)
  valid = np.arange(n)[None, :] < rng.integers(20, n, (batch, 1))
  return {
      'image': rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8),
      'label_m': rng.choice(np.array([-1, 0, 1], np.int8), (batch, size, size), p=[0.4, 0.5, 0.1]),
      'points': points, 'point_valid': valid, 'boxes': boxes.astype(np.float32), 'box_valid': valid,
      'instances': np.zeros((batch, size, size), np.int32),
  }


def benchmark(variant: str, *, batch: int, size: int, repeats: int, peak: float) -> None:
  config = default.get_config('' if variant == 'full' else variant)
  model = models.create_model(config, rngs=nnx.Rngs(0))
  graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  data = jax.tree.map(jnp.asarray, synthetic_batch(config, batch, size))
  count = sum(p.size for p in jax.tree.leaves(params))
  m = config.model
  print(f'\n[{variant}] encoder {m.encoder}, fpn {m.fpn_channels}, heads {m.head_channels}x{m.head_convs}, '
        f'seg_stride {m.seg_stride}, projector {m.projector_level}, dtype {m.dtype}: {count:,} parameters')

  forward = jax.jit(lambda p, b, x: models.forward(graphdef, p, b, x, train=False)[0])

  def loss_fn(params, batch_stats, batch):
    outputs, new_stats = models.forward(graphdef, params, batch_stats, batch['image'], train=True,
                                        with_cams=True)
    if losses is not None:
      loss, _ = losses.total_loss(outputs, batch, config=config)
    else:
      loss = sum(jnp.mean(jnp.square(a)) for a in jax.tree.leaves(outputs))
    return loss, new_stats

  def train_step(params, batch_stats, batch):
    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats, batch)
    params = jax.tree.map(lambda p, g: p - config.optim.learning_rate * g, params, grads)
    return params, new_stats, loss

  step = jax.jit(train_step, donate_argnums=(0, 1))
  rows = []
  for name, fn, args in (('forward', forward, (params, batch_stats, data['image'])),
                         ('train step', step, (params, batch_stats, data))):
    start = time.perf_counter()
    compiled = fn.lower(*args).compile()
    compile_s = time.perf_counter() - start
    flops = _flops(compiled)
    if name == 'forward':
      jax.block_until_ready(compiled(*args))  # warm-up
      seconds = _median_seconds(lambda: compiled(*args), repeats)
    else:
      state = list(args[:2])

      def run():
        state[0], state[1], loss = compiled(state[0], state[1], data)
        return loss
      jax.block_until_ready(run())  # warm-up
      seconds = _median_seconds(run, repeats)
    rows.append((name, flops, compile_s, seconds))
    print(f'  {name:10s}  {flops / 1e9:9.1f} GFLOP  compile {compile_s:6.1f} s  median {seconds:7.2f} s  '
          f'{flops / seconds / 1e9:6.1f} GFLOP/s = {flops / seconds / peak:5.1%} of matmul  '
          f'({batch / seconds:.2f} images/s)', flush=True)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--variants', default='full,lite', help='comma-separated: full, lite, smoke')
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--size', type=int, default=256)
  parser.add_argument('--repeats', type=int, default=3, help='timed calls per program (after a warm-up)')
  args = parser.parse_args()
  print(f'date: {time.strftime("%Y-%m-%dT%H:%M:%S%z")}')
  print(f'jax {jax.__version__}, device {jax.devices()[0].device_kind}, {os.cpu_count()} CPUs, '
        f'load average {os.getloadavg()[0]:.1f} (shared machine: other jobs compete for the cores)')
  peak = matmul_rate()
  print(f'float32 matmul 2048x2048: {peak / 1e9:.1f} GFLOP/s')
  print(f'batch {args.batch} at {args.size}x{args.size}; losses: '
        f'{"losses.total_loss" if losses is not None else "stand-in sum of mean squares"}; '
        f'median of {args.repeats} after one warm-up call')
  for variant in args.variants.split(','):
    benchmark(variant, batch=args.batch, size=args.size, repeats=args.repeats, peak=peak)
  print(f'\nload average at the end: {os.getloadavg()[0]:.1f}')


if __name__ == '__main__':
  main()
