"""Benchmark (not a test): training throughput of the real train step and input pipeline.

For each config variant (full = the paper model of configs/default.py, lite = its `:lite`) at the
config's batch (8) and crop (256), on whatever devices JAX sees (CPU here; the same script on a
GPU machine), prints: FLOPs of one train step (XLA cost analysis of the compiled sharded step),
compile time, median seconds per step over `--steps` steps fed by `data.pipeline.TrainBatches`
(host augmentation included, as in training), images/s, and achieved FLOP/s as a fraction of the
device's measured float32 matrix-multiply rate.

  python experiments/benchmarks/train.py [--variants lite,full] [--steps 3] [--dataset synthetic]
"""

import argparse
import os
import pathlib
import statistics
import subprocess
import sys
import time

import jax

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from configs import default  # noqa: E402
from donuseg_jax import parallel  # noqa: E402
from donuseg_jax import train  # noqa: E402
from donuseg_jax.data import folds  # noqa: E402
from donuseg_jax.data import pipeline  # noqa: E402
import model as model_benchmark  # noqa: E402  (experiments/benchmarks/model.py: matmul_rate)


def benchmark(variant: str, *, dataset: str, steps: int, peak: float) -> None:
  config = default.get_config('' if variant == 'full' else variant)
  config.unlock()
  config.data.name = dataset
  config.lock()
  mesh = parallel.create_mesh()
  batches = pipeline.TrainBatches(
      pipeline.prepare_images(folds.load_fold_examples(config)['train'], config=config),
      config=config, process_index=jax.process_index(), process_count=jax.process_count())
  graphdef, state, tx, schedule = train.create_train_state(config, total_steps=steps + 1)
  state = jax.device_put(state, parallel.replicated(mesh))
  step_fn = train.compile_train_step(mesh, graphdef=graphdef, tx=tx, schedule=schedule,
                                     config=config, steps_per_epoch=batches.steps_per_epoch)
  first = parallel.shard_batch(batches.batch_at(0), mesh)
  start = time.perf_counter()
  compiled = step_fn.lower(state, first).compile()
  compile_s = time.perf_counter() - start
  cost = compiled.cost_analysis()
  flops = float((cost[0] if isinstance(cost, (list, tuple)) else cost)['flops'])
  state, metrics = step_fn(state, first)  # warm-up
  jax.block_until_ready(metrics)
  times = []
  for step in range(1, steps + 1):
    start = time.perf_counter()
    state, metrics = step_fn(state, parallel.shard_batch(batches.batch_at(step), mesh))
    jax.block_until_ready(metrics['loss'])
    times.append(time.perf_counter() - start)
  seconds = statistics.median(times)
  b = config.data.batch_size
  m = config.model
  print(f'[{variant}] {m.encoder}, fpn {m.fpn_channels}, heads {m.head_channels}x{m.head_convs}, '
        f'seg_stride {m.seg_stride}; batch {b} at {config.data.crop_size}; {dataset}; '
        f'{mesh.size} device(s)')
  print(f'  train step {flops / 1e9:8.1f} GFLOP  compile {compile_s:6.1f} s  median {seconds:7.2f} s '
        f'over {steps}  {b / seconds:6.2f} images/s  {flops / seconds / 1e9:7.1f} GFLOP/s = '
        f'{flops / seconds / peak:5.1%} of matmul  loss {float(metrics["loss"]):.3f}', flush=True)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--variants', default='lite,full')
  parser.add_argument('--steps', type=int, default=3, help='timed steps after a warm-up step')
  parser.add_argument('--dataset', default='synthetic')
  args = parser.parse_args()
  commit = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=REPO_ROOT, capture_output=True,
                          text=True).stdout.strip()
  print(f'date: {time.strftime("%Y-%m-%dT%H:%M:%S%z")}  commit: {commit}')
  print(f'jax {jax.__version__}, devices {jax.devices()}, {os.cpu_count()} CPUs, '
        f'load average {os.getloadavg()[0]:.1f}')
  peak = model_benchmark.matmul_rate()
  print(f'float32 matmul 2048x2048: {peak / 1e9:.1f} GFLOP/s')
  for variant in args.variants.split(','):
    benchmark(variant, dataset=args.dataset, steps=args.steps, peak=peak)
  print(f'load average at the end: {os.getloadavg()[0]:.1f}')


if __name__ == '__main__':
  main()
