"""Training: a small train state, a pure train step jitted over a ('data',) mesh, and the loop.

The step is compiled once: static things (graph definition, optimiser, config) are bound with
`functools.partial`, the batch is sharded along the mesh's 'data' axis, the state is replicated and
donated. The loop is a visible `for step in ...`: it logs, evaluates on the validation fold,
checkpoints, and stops at once on a non-finite loss or gradient. Rerun with the same work dir and
it resumes: from the newest intact checkpoint, and only if the config still fits the run
(`trained_run.check_compatible`); `config.json` is (re)written only once that is known.
"""

import functools
import math
import pathlib
import signal
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx
from tqdm import tqdm

from donuseg_jax import atomic_io
from donuseg_jax import checkpoints
from donuseg_jax import diagnostics
from donuseg_jax import evaluate
from donuseg_jax import losses
from donuseg_jax import models
from donuseg_jax import parallel
from donuseg_jax import run_log
from donuseg_jax import trained_run
from donuseg_jax.data import folds
from donuseg_jax.data import pipeline
from donuseg_jax.models import init_from


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # () int32, optimiser steps taken
  params: Any  # nnx.State of nnx.Param
  batch_stats: Any  # nnx.State of nnx.BatchStat (running BatchNorm statistics)
  opt_state: Any
  # Exponential moving average of the weights, {'params', 'batch_stats'}, or None when
  # config.train.ema_decay is 0. Validation, the best checkpoint and every trained-run reader use
  # it when present: at CPU scale the raw weights swing by up to 0.25 AJI between evaluations.
  ema: Any = None


def checkpoint_tree(state: TrainState) -> dict:
  """The state as Orbax stores it: a dict by field name, without `ema` when there is none (so a
  run without EMA keeps the layout of runs recorded before the field existed)."""
  tree = {'step': state.step, 'params': state.params, 'batch_stats': state.batch_stats,
          'opt_state': state.opt_state}
  if state.ema is not None:
    tree['ema'] = state.ema
  return tree


def from_checkpoint_tree(tree: dict) -> TrainState:
  return TrainState(step=tree['step'], params=tree['params'], batch_stats=tree['batch_stats'],
                    opt_state=tree['opt_state'], ema=tree.get('ema'))


def ema_decay_at(step: jax.Array, decay: float) -> jax.Array:
  """The EMA's decay at optimiser step `step` (0-based): min(decay, (1 + t) / (10 + t)), so the
  first steps' weights, far from the later ones, leave the average quickly."""
  t = step.astype(jnp.float32)
  return jnp.minimum(decay, (1.0 + t) / (10.0 + t))


def update_ema(ema, new, decay: jax.Array):
  """decay * ema + (1 - decay) * new, leaf by leaf (params and BatchNorm statistics alike)."""
  return jax.tree.map(lambda old, value: decay * old + (1.0 - decay) * value, ema, new)


def evaluation_weights(state: TrainState):
  """(params, batch_stats) that validation scores and the best checkpoint stands for."""
  if state.ema is not None:
    return state.ema['params'], state.ema['batch_stats']
  return state.params, state.batch_stats


class NonFiniteLossError(RuntimeError):
  """Training produced a non-finite loss or gradient; the last good checkpoint is left as it was."""


def create_learning_rate(config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """SGD learning rate: the paper gives 0.01 and no schedule; ours is a documented choice.

  Default `cosine`: linear warm-up over `warmup_steps`, then cosine decay to 0 at the last step.
  """
  optim = config.optim
  warmup = min(optim.warmup_steps, max(total_steps - 1, 0))
  if optim.schedule == 'constant':
    main = optax.constant_schedule(optim.learning_rate)
  elif optim.schedule == 'cosine':
    main = optax.cosine_decay_schedule(optim.learning_rate, max(total_steps - warmup, 1))
  elif optim.schedule == 'poly':
    main = optax.polynomial_schedule(optim.learning_rate, 0.0, 0.9, max(total_steps - warmup, 1))
  else:
    raise ValueError(f'unknown optim.schedule {optim.schedule!r}: constant | cosine | poly')
  if warmup == 0:
    return main
  ramp = optax.linear_schedule(optim.learning_rate / 10, optim.learning_rate, warmup)
  return optax.join_schedules([ramp, main], [warmup])


def create_optimizer(config: ml_collections.ConfigDict, total_steps: int):
  """SGD with momentum and PyTorch-style L2 weight decay (added to the gradient before momentum)."""
  schedule = create_learning_rate(config, total_steps)
  chain = []
  if config.optim.grad_clip > 0:
    chain.append(optax.clip_by_global_norm(config.optim.grad_clip))
  chain += [optax.add_decayed_weights(config.optim.weight_decay),
            optax.sgd(schedule, momentum=config.optim.momentum)]
  return optax.chain(*chain), schedule


def create_train_state(config: ml_collections.ConfigDict, *, total_steps: int):
  """Returns (graphdef, state, optimizer, schedule); the model's own factory picks the weights."""
  model = models.create_model(config, rngs=nnx.Rngs(config.seed))
  graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  tx, schedule = create_optimizer(config, total_steps)
  ema = None
  if config.train.ema_decay > 0:
    ema = jax.tree.map(jnp.copy, {'params': params, 'batch_stats': batch_stats})
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                     opt_state=tx.init(params), ema=ema)
  return graphdef, state, tx, schedule


def without_cam_losses(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of `config` with L_dcs and L_ccl off: the step used during the CAM warm-up."""
  warm = config.copy_and_resolve_references()
  warm.loss.use_dcs = warm.loss.use_ccl = False
  return warm


def cam_warmup_steps(config: ml_collections.ConfigDict, *, steps_per_epoch: int,
                     total_steps: int | None = None) -> int:
  """Steps during which L_dcs and L_ccl have weight 0: the longer of `loss.cam_warmup_epochs`
  epochs and `loss.cam_warmup_fraction` of the `total_steps` (a share, so that a variant capped
  at a number of steps warms up for the same part of training on any dataset)."""
  if not (config.loss.use_dcs or config.loss.use_ccl):
    return 0
  by_epochs = math.ceil(config.loss.cam_warmup_epochs * steps_per_epoch)
  by_share = math.ceil(config.loss.cam_warmup_fraction * (total_steps or 0))
  return max(by_epochs, by_share)


def train_step(state: TrainState, batch: dict, *, graphdef, tx, schedule, config, steps_per_epoch,
               total_steps=None):
  """One SGD step on a (sharded) batch. Pure: returns the new state and a flat dict of scalars."""
  warmup = cam_warmup_steps(config, steps_per_epoch=steps_per_epoch, total_steps=total_steps)
  cam_weight = (state.step >= warmup).astype(jnp.float32)  # traced: no retrace when it flips
  with_cams = bool(config.loss.use_dcs or config.loss.use_ccl)

  def loss_fn(params):
    outputs, batch_stats = models.forward(graphdef, params, state.batch_stats, batch['image'],
                                          train=True, with_cams=with_cams,
                                          cam_statistics=config.loss.cam_statistics)
    loss, aux = losses.total_loss(outputs, batch, config=config, cam_weight=cam_weight)
    return loss, (aux, batch_stats)

  (loss, (aux, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = dict(aux)
  metrics.update(loss=loss, grad_norm=optax.tree.norm(grads), learning_rate=schedule(state.step))
  ema = state.ema
  if ema is not None:
    ema = update_ema(ema, {'params': params, 'batch_stats': batch_stats},
                     ema_decay_at(state.step, config.train.ema_decay))
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                            opt_state=opt_state, ema=ema)
  return new_state, metrics


def compile_train_step(mesh, *, graphdef, tx, schedule, config, steps_per_epoch, total_steps=None):
  """The jitted step: batch sharded over 'data', state replicated and donated."""
  step = functools.partial(train_step, graphdef=graphdef, tx=tx, schedule=schedule, config=config,
                           steps_per_epoch=steps_per_epoch, total_steps=total_steps)
  return jax.jit(step, in_shardings=(parallel.replicated(mesh), parallel.batch_sharding(mesh)),
                 out_shardings=(parallel.replicated(mesh), parallel.replicated(mesh)),
                 donate_argnums=0)


def selection_sem(val: dict, config: ml_collections.ConfigDict) -> float:
  """Standard error of the mean of the per-image validation scores (`train.select_metric`): how
  far apart two checkpoints' scores must be before validation can tell them apart. 0 with fewer
  than two scored images."""
  values = [entry[config.train.select_metric] for entry in val['per_image']
            if np.isfinite(entry.get(config.train.select_metric, np.nan))]
  if len(values) < 2:
    return 0.0
  return float(np.std(values, ddof=1) / math.sqrt(len(values)))


def selection_score(val: dict, config: ml_collections.ConfigDict) -> tuple[float, float, float]:
  """(score, margin, standard error): score and margin for `RunCheckpoints.save_best`, the
  validation mean of `train.select_metric` and `train.select_within_sem` standard errors of it
  (0: strictly the best checkpoint)."""
  sem = selection_sem(val, config)
  return float(val['mean'][config.train.select_metric]), config.train.select_within_sem * sem, sem


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *,
                       allow_config_change: bool = False) -> dict:
  """Trains on the train fold, selects on the val fold, reports the test fold. Resumes from workdir.

  Nothing in workdir is touched until the config, the devices and the data are known to fit:
  a work dir holding a run of another config raises trained_run.RunError listing the differences
  (`allow_config_change` lets the safe ones through, trained_run.SAFE_CHANGES).
  """
  workdir = pathlib.Path(workdir)
  is_main = jax.process_index() == 0
  mesh = parallel.create_mesh()
  parallel.check_batch_size(config.data.batch_size, mesh)
  changes = trained_run.check_compatible(workdir, config, allow_changes=allow_config_change)
  for key, old, new in changes:
    logging.warning('continuing %s with %s = %r (was %r)', workdir, key, new, old)

  fold = folds.load_fold_examples(config)
  batches = pipeline.TrainBatches(pipeline.prepare_images(fold['train'], config=config),
                                  config=config, process_index=jax.process_index(),
                                  process_count=jax.process_count())
  steps_per_epoch = batches.steps_per_epoch
  total_steps = config.train.max_steps or config.train.epochs * steps_per_epoch
  eval_every = max(1, config.train.eval_every_epochs * steps_per_epoch)

  graphdef, state, tx, schedule = create_train_state(config, total_steps=total_steps)
  if config.model.init_from:  # fine-tuning; a resumed run's own checkpoint wins below
    params, batch_stats = init_from.load_weights(
        config.model.init_from, params=state.params, batch_stats=state.batch_stats,
        encoder_only=config.model.init_encoder_only)
    state = state.replace(params=params, batch_stats=batch_stats)
    if state.ema is not None:  # the average starts from the fine-tuning start
      state = state.replace(ema=jax.tree.map(jnp.copy, {'params': params,
                                                        'batch_stats': batch_stats}))
  state = jax.device_put(state, parallel.replicated(mesh))
  ckpts = checkpoints.RunCheckpoints(workdir, keep=config.train.keep_checkpoints)
  if ckpts.latest_step() is not None:
    restored = ckpts.restore_intact(_abstract(checkpoint_tree(state)), which='latest')
    ckpts.set_aside(restored.damaged)  # so that those steps can be saved again
    state = from_checkpoint_tree(restored.state)
    logging.info('resumed from step %d in %s', int(state.step), workdir)
  start = int(state.step)
  if is_main:  # the run is known to fit: record its config; forget what came after the restore
    atomic_io.write_text(trained_run.config_path(workdir), trained_run.config_json(config))
    run_log.truncate_after(workdir, start)
  step_fn = compile_train_step(mesh, graphdef=graphdef, tx=tx, schedule=schedule, config=config,
                               steps_per_epoch=steps_per_epoch, total_steps=total_steps)
  # While L_dcs and L_ccl have weight 0 their CAM pass changes no gradient: a second program
  # without it makes those steps as cheap as the base's (the same update; no dcs/ metrics).
  warmup_steps = cam_warmup_steps(config, steps_per_epoch=steps_per_epoch, total_steps=total_steps)
  warm_fn = None
  if start < warmup_steps:
    warm_fn = compile_train_step(mesh, graphdef=graphdef, tx=tx, schedule=schedule,
                                 config=without_cam_losses(config), steps_per_epoch=steps_per_epoch)
  writer = run_log.MetricsWriter(workdir, enabled=is_main)
  validator = evaluate.Validator(fold['val'], graphdef=graphdef, config=config)
  figure_panels = diagnostics.PseudoLabelPanels(graphdef, config=config)

  stop = _StopRequest()
  progress = tqdm(total=total_steps, initial=start, desc='train', disable=not is_main,
                  dynamic_ncols=True)
  pending = None  # metrics of the step before, checked after the next step is dispatched
  tick, tick_step = time.perf_counter(), start
  host_batches = batches.iterate(start)  # built on a host thread, ahead of the device
  try:
    for step in range(start, total_steps):
      batch = parallel.shard_batch(next(host_batches), mesh)
      state, metrics = (warm_fn if step < warmup_steps else step_fn)(state, batch)
      if pending is not None:
        _check_finite(*pending)
      pending = (step + 1, metrics)
      done = step + 1
      evaluate_now = done % eval_every == 0 or done == total_steps
      if done % config.train.log_every == 0 or evaluate_now or stop.requested:
        _check_finite(*pending)
        scalars = jax.device_get(metrics)
        now = time.perf_counter()
        scalars['images_per_second'] = (done - tick_step) * config.data.batch_size / (now - tick)
        tick, tick_step = now, done
        writer.write(done, scalars)
        progress.set_postfix(loss=f"{float(scalars['loss']):.4f}",
                             img_s=f"{scalars['images_per_second']:.2f}")
      progress.update(1)
      meta = {'step': done, 'data_seed': config.data.seed, 'steps_per_epoch': steps_per_epoch}
      if evaluate_now:
        _check_finite(*pending)
        val = validator(*evaluation_weights(state))
        score, margin, sem = selection_score(val, config)
        writer.write(done, {**{f'val/{k}': v for k, v in val['mean'].items()},
                            f'val_sem/{config.train.select_metric}': sem})
        if is_main:
          params, batch_stats = evaluate.local_copy((state.params, state.batch_stats))
          diagnostics.write_pseudo_label_figure(
              workdir / 'figures' / f'step_{done:06d}.png',
              figure_panels(params, batch_stats, fold['val'][0]))
        ckpts.save_latest(done, checkpoint_tree(state), dict(meta, val=val['mean']))
        ckpts.save_best(done, checkpoint_tree(state), dict(meta, val=val['mean']),
                        score=score, margin=margin)
      elif done % config.train.checkpoint_every_steps == 0 or stop.requested:
        _check_finite(*pending)
        ckpts.save_latest(done, checkpoint_tree(state), meta)
      if stop.requested:
        logging.warning('stopping at step %d on %s; rerun to resume', done, stop.requested)
        break
  finally:
    host_batches.close()
    progress.close()
    ckpts.wait()
    writer.close()
    stop.restore()
  summary = {'steps': int(state.step), 'total_steps': total_steps,
             'best_step': ckpts.best_step(), 'latest_step': ckpts.latest_step()}
  ckpts.close()
  return summary


def _abstract(state):
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, 'sharding', None)), state)


def _check_finite(step: int, metrics: dict) -> None:
  """The loss and the gradient norm (non-finite if any gradient is) of `step` must be finite: a
  finite loss can still have NaN gradients, and one such update poisons every parameter."""
  loss, grad_norm = (float(v) for v in jax.device_get((metrics['loss'], metrics['grad_norm'])))
  if np.isfinite(loss) and np.isfinite(grad_norm):
    return
  advice = ('training stopped, the last saved checkpoint is intact (rerun resumes from it; '
            'consider a lower --config.optim.learning_rate)')
  if not np.isfinite(loss):
    terms = {k: float(v) for k, v in jax.device_get(metrics).items()
             if k.startswith('loss') and not np.isfinite(float(v))}
    raise NonFiniteLossError(f'non-finite loss at step {step}: {terms}; {advice}')
  raise NonFiniteLossError(
      f'non-finite gradients at step {step} (grad_norm={grad_norm}) with a finite loss '
      f'({loss:.6g}); {advice}')


class _StopRequest:
  """SIGTERM / SIGINT ask the loop to save a checkpoint and stop at the end of the current step."""

  def __init__(self):
    self.requested = ''
    self._previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread (e.g. called from a test runner thread)
        pass

  def _handle(self, signum, frame):
    del frame
    if self.requested:  # a second signal: stop now
      raise KeyboardInterrupt
    self.requested = signal.Signals(signum).name

  def restore(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
