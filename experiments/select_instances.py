"""Choose the instance assembly (boxes | watershed), the detection threshold, the growth of box
instances (config.eval.grow_px) and flip test-time augmentation (config.eval.flip_tta) on the
VALIDATION fold, and whether unclaimed foreground blobs become instances (config.eval.unclaimed_min_px).

Runs the network once per window and flip setting (outputs are memoised), then evaluates every
combination of `--flip_tta`, `--grow_px`, `--unclaimed_min_px`, `--methods` and `--thresholds`
(grow_px and unclaimed_min_px apply to boxes only) with the same probabilities and detections, and writes
DIR/select_instances_<split>.json with the table and the best combination by `--select_by`:
`point_f1` (default: the validation clicks only, no true mask, as the training's checkpoint
selection) or a mask metric such as `aji` (the fully supervised protocol). The test fold is never
looked at.

  python experiments/select_instances.py --workdir runs/tnbc_lite_fold0 [--split val] \
      [--grow_px 0,2,4] [--flip_tta 0,1] [--thresholds 0.5]
"""

import argparse
import hashlib
import json
import pathlib
import subprocess
import sys
import time

import numpy as np

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from donuseg_jax import evaluate  # noqa: E402
from donuseg_jax import trained_run  # noqa: E402
from donuseg_jax.data import folds  # noqa: E402
from donuseg_jax.inference import predictor  # noqa: E402


def memoised(predict_windows):
  """predict_windows whose outputs are kept on the host, keyed by the window batch's bytes."""
  cache = {}

  def cached(images):
    key = hashlib.sha1(np.ascontiguousarray(images).tobytes()).hexdigest()
    if key not in cache:
      outputs = predict_windows(images)
      cache[key] = {'segmentation': np.asarray(outputs['segmentation']),
                    'detection': [{k: np.asarray(v) for k, v in level.items()}
                                  for level in outputs['detection']]}
    return cache[key]
  return cached


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--split', default='val', choices=['val'])  # selection never sees test
  parser.add_argument('--methods', default='boxes,watershed')
  parser.add_argument('--thresholds', default='0.5,0.3,0.2,0.1,0.05')
  parser.add_argument('--grow_px', default='0', help='config.eval.grow_px values (boxes only)')
  parser.add_argument('--unclaimed_min_px', default='0',
                      help='config.eval.unclaimed_min_px values (boxes only)')
  parser.add_argument('--flip_tta', default='0', help='config.eval.flip_tta values: 0, 1 or 0,1')
  parser.add_argument('--select_by', default='point_f1', help='point_f1 (no masks) | aji | dice | pq')
  args = parser.parse_args()
  workdir = pathlib.Path(args.workdir)
  config, graphdef, params, batch_stats = trained_run.load_trained_model(workdir, which='best')
  examples = folds.load_fold_examples(config)[args.split]
  rows = []
  for flips in [bool(int(f)) for f in args.flip_tta.split(',')]:
    predict_windows = memoised(predictor.make_predict_windows(graphdef, params, batch_stats,
                                                              flips=flips))
    for threshold in sorted({float(t) for t in args.thresholds.split(',')}, reverse=True):
      for method in args.methods.split(','):
        boxes = method in ('boxes', 'cells')
        for grow in ([float(g) for g in args.grow_px.split(',')] if boxes else [0.0]):
          for unclaimed in ([int(u) for u in args.unclaimed_min_px.split(',')] if boxes else [0]):
            config.eval.update(score_threshold=threshold, instance_method=method, grow_px=grow,
                               unclaimed_min_px=unclaimed, flip_tta=flips)
            start = time.perf_counter()
            result = evaluate.evaluate_examples(examples, predict_windows=predict_windows,
                                                config=config, protocol='image', progress=False)
            rows.append({'method': method, 'score_threshold': threshold, 'grow_px': grow,
                         'unclaimed_min_px': unclaimed, 'flip_tta': flips, 'mean': result['mean'],
                         'aggregate': result['aggregate'], 'seconds': time.perf_counter() - start})
            print(f"{method:9s} threshold {threshold:4.2f} grow {grow:3.1f} unclaimed {unclaimed:3d} "
                  f"flips {int(flips)}  " +
                  '  '.join(f"{k} {v:.4f}" for k, v in result['mean'].items()), flush=True)
  best = max(rows, key=lambda r: r['mean'][args.select_by])
  commit = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=REPO_ROOT, capture_output=True,
                          text=True).stdout.strip()
  record = {'workdir': str(workdir), 'split': args.split, 'images': len(examples),
            'command': ' '.join(sys.argv), 'commit': commit, 'rows': rows,
            'select_by': args.select_by,
            'best': {'method': best['method'], 'score_threshold': best['score_threshold'],
                     'grow_px': best['grow_px'], 'unclaimed_min_px': best['unclaimed_min_px'],
                     'flip_tta': best['flip_tta'],
                     args.select_by: best['mean'][args.select_by], 'aji': best['mean']['aji']}}
  path = workdir / f'select_instances_{args.split}.json'
  path.write_text(json.dumps(record, indent=2) + '\n')
  print(f"best by validation {args.select_by}: {best['method']} at threshold "
        f"{best['score_threshold']}, grow_px {best['grow_px']}, unclaimed_min_px "
        f"{best['unclaimed_min_px']}, flip_tta {best['flip_tta']} "
        f"({args.select_by} {best['mean'][args.select_by]:.4f}, AJI "
        f"{best['mean']['aji']:.4f}); wrote {path}")


if __name__ == '__main__':
  main()
