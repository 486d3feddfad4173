"""Fine-tuning: start a run from another run's trained weights (`config.model.init_from=WORKDIR`).

The weights are those of WORKDIR's best checkpoint (its latest when it has no best yet), read
with Orbax without a target, so nothing of the source run's config has to match except the
weights taken:

  - `config.model.init_encoder_only=False` (default): every parameter and BatchNorm statistic.
    The new model must have the source's architecture (same `config.model` sizes); any missing,
    extra or differently shaped weight is an error naming it.
  - `init_encoder_only=True`: the encoder (ResNet) only, with its running BatchNorm statistics;
    FPN and heads start as `create_model` made them. Only the encoder has to match, so a TNBC
    model's encoder can start a model with other head sizes.

The optimiser state and the step start afresh (a new schedule over the new run's steps): this is a
new training run, not a resume. A work dir that already holds checkpoints of its own resumes from
them, and `init_from` is then ignored.
"""

import pathlib

import jax
import jax.numpy as jnp


ENCODER = 'encoder'  # attribute of the DoNuSeg module holding the ResNet


def load_weights(workdir, *, params, batch_stats, encoder_only: bool = False):
  """(params, batch_stats) like the given ones, with the weights of `workdir`'s best checkpoint.

  `params` / `batch_stats` are the new model's nnx.State trees (they give the structure, shapes
  and dtypes); the result holds the source's values where `encoder_only` says, theirs elsewhere.
  """
  workdir = pathlib.Path(workdir).expanduser()
  if not (workdir / 'checkpoints').is_dir():
    raise FileNotFoundError(f'model.init_from={workdir}: no checkpoints/ folder there; expected the '
                            'work dir of a finished training run')
  source = _restore_raw(workdir)
  params = _overwrite(params, source['params'], workdir=workdir, kind='parameter',
                      encoder_only=encoder_only)
  batch_stats = _overwrite(batch_stats, source.get('batch_stats', {}), workdir=workdir,
                           kind='BatchNorm statistic', encoder_only=encoder_only)
  return params, batch_stats


def _restore_raw(workdir: pathlib.Path) -> dict:
  """The best (else latest) intact checkpoint's params and batch_stats, as the run's own model
  (built from its recorded config) holds them. Read-only: the source run is not touched."""
  from donuseg_jax import trained_run  # noqa: PLC0415 (trained_run imports the model package)

  _, _, params, batch_stats = trained_run.load_trained_model(workdir, which='best')
  return {'params': params, 'batch_stats': batch_stats}


def _flat(tree) -> tuple[dict, object]:
  """{path of names: leaf} and the treedef; names are dict keys, attributes and list indices."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  return {tuple(_name(k) for k in path): leaf for path, leaf in leaves}, treedef


def _name(key) -> str:
  for attribute in ('key', 'name', 'idx'):
    if hasattr(key, attribute):
      return str(getattr(key, attribute))
  return str(key)


def _overwrite(target, source, *, workdir, kind: str, encoder_only: bool):
  """`target` with its leaves replaced by `source`'s (all, or those under ENCODER)."""
  wanted, treedef = _flat(target)
  given, _ = _flat(source)
  chosen = [k for k in wanted if not encoder_only or k[0] == ENCODER]
  missing = [k for k in chosen if k not in given]
  extra = [] if encoder_only else sorted(set(given) - set(wanted))
  wrong = [k for k in chosen if k in given and tuple(given[k].shape) != tuple(wanted[k].shape)]
  if missing or extra or wrong:
    problems = []
    if missing:
      problems.append(f'{len(missing)} {kind}(s) missing there, e.g. {"/".join(missing[0])}')
    if extra:
      problems.append(f'{len(extra)} {kind}(s) this model lacks, e.g. {"/".join(extra[0])}')
    if wrong:
      k = wrong[0]
      problems.append(f'{len(wrong)} of another shape, e.g. {"/".join(k)} is '
                      f'{tuple(given[k].shape)} there and {tuple(wanted[k].shape)} here')
    raise ValueError(f'model.init_from={workdir}: its weights do not fit this model '
                     f'({"; ".join(problems)}); use the source run\'s model settings'
                     + ('' if encoder_only else ', or model.init_encoder_only=True to take the '
                        'encoder alone'))
  leaves = [jnp.asarray(given[k], wanted[k].dtype) if k in chosen else wanted[k] for k in wanted]
  return jax.tree_util.tree_unflatten(treedef, leaves)
