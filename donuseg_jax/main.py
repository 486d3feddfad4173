"""The main job: train DoNuSeg from points, evaluate, and write overlays.

  python -m donuseg_jax.main --config=configs/tnbc.py --workdir=runs/tnbc_fold0
  python -m donuseg_jax.main --config=configs/demo.py:lite --workdir=runs/demo  # no download

Overrides: --config.data.fold=2 --config.optim.learning_rate=0.005 ... Rerun with the same
--workdir to resume from its last intact checkpoint; a rerun with another config stops and lists
the differences (--allow_config_change lets a longer step budget or other safe changes through).
Exit status: 0 done, 2 bad input (one-line message), 3 stopped early (SIGTERM/SIGINT; rerun to
resume), 1 a bug (traceback). Library INFO logs need --verbosity=0.
"""

from absl import flags
from absl import logging
from ml_collections import config_flags

from donuseg_jax import cli
from donuseg_jax import parallel

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (configs/<name>.py[:lite|:smoke]).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for config, metrics, checkpoints, outputs.')
_SKIP_REPORT = flags.DEFINE_bool('skip_report', False,
                                 'Only train: no test-fold evaluation or overlays at the end.')
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    'allow_config_change', False,
    'Continue a run whose recorded config differs only in safe fields (step budget, logging, '
    'checkpoint/eval frequency, eval settings, data location); see trained_run.SAFE_CHANGES.')
flags.mark_flags_as_required(['config', 'workdir'])

EXIT_STOPPED = 3


def main(argv):
  if len(argv) > 1:
    raise cli.UsageError(f'unexpected arguments: {argv[1:]}')
  parallel.maybe_initialize_distributed()  # before any other JAX call
  from donuseg_jax import train  # noqa: PLC0415 (imports JAX)
  summary = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value,
                                     allow_config_change=_ALLOW_CONFIG_CHANGE.value)
  print(f'training done: {summary}', flush=True)
  if summary['steps'] < summary['total_steps']:
    logging.warning('training stopped early at step %d of %d: no final report (rerun to resume)',
                    summary['steps'], summary['total_steps'])
    return EXIT_STOPPED
  if not _SKIP_REPORT.value:
    from donuseg_jax import report  # noqa: PLC0415
    report.write_final_report(_WORKDIR.value)
  return 0


if __name__ == '__main__':
  cli.run_absl(main)
