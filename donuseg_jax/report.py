"""What the main job leaves after training: test-fold metrics of the best checkpoint, and overlays.

The best checkpoint was chosen on the validation fold; the test fold is only reported here.
"""

import pathlib

from absl import logging

from donuseg_jax import atomic_io
from donuseg_jax import evaluate
from donuseg_jax import predict
from donuseg_jax import trained_run
from donuseg_jax.data import folds
from donuseg_jax.inference import predictor


def write_final_report(workdir: str | pathlib.Path) -> dict:
  """Writes DIR/eval_test_<protocol>.json, DIR/overlays/<id>.*, and returns the test metrics."""
  workdir = pathlib.Path(workdir)
  config, graphdef, params, batch_stats = trained_run.load_trained_model(workdir, which='best')
  examples = folds.load_fold_examples(config)['test']
  if not examples:
    print(f'test step skipped: {config.data.name} ({config.data.split_scheme} scheme) has no test '
          'images here (MoNuSeg: put MoNuSegTestData/ under the data root)', flush=True)
    return {}
  predict_windows = predictor.make_predict_windows(graphdef, params, batch_stats,
                                                   flips=config.eval.flip_tta)
  if config.eval.max_images:
    examples = examples[:config.eval.max_images]
  result = evaluate.evaluate_examples(examples, predict_windows=predict_windows, config=config,
                                      protocol=config.eval.protocol)
  result.update(split='test', checkpoint='best', dataset=config.data.name, fold=config.data.fold)
  path = workdir / f"eval_test_{result['protocol']}.json"
  atomic_io.write_json(path, result)
  print(f'test fold {config.data.fold} of {config.data.name} ({len(examples)} images), best checkpoint:')
  print(evaluate.format_table(result))

  overlays = workdir / 'overlays'
  overlays.mkdir(exist_ok=True)
  for example in examples[:config.eval.write_overlays]:
    output = predictor.predict_image(example['image'], predict_windows=predict_windows,
                                     config=config)
    predict.write_outputs(example['image'], output, overlays, example['id'])
  logging.info('wrote %s and %d overlays in %s', path, config.eval.write_overlays, overlays)
  return result
