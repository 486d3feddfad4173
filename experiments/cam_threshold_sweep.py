"""Why does DCS add little? The pseudo label P of a trained run, for several thresholds theta.

For every validation image of a run's fold (256 x 256 tiles, no augmentation), the four block
Grad-CAMs of the trained network (running statistics, as in training) are binarised at each theta
(Eq. 3), scored against the initial label M (Eq. 4, the run's alpha form) and selected (Eq. 5).
Printed per theta and per block (and for the dynamic choice): P's foreground fraction and its
precision / recall / IoU against the TRUE masks (a diagnostic only; training never reads them),
the share of nucleus pixels P calls background (the harmful part), the ignored share, and alpha.

  python experiments/cam_threshold_sweep.py --workdir=runs/tnbc_cpu_plus_fold0 \
      --thetas=0.8,0.7,0.6,0.5 --out=experiments/runs/tnbc_cpu_plus_both_fold0/cam_threshold_sweep.json
"""

import argparse
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
  sys.path.insert(0, str(REPO_ROOT))

from donuseg_jax import losses  # noqa: E402
from donuseg_jax import models  # noqa: E402
from donuseg_jax import trained_run  # noqa: E402
from donuseg_jax.data import folds  # noqa: E402
from donuseg_jax.data import pseudo_labels  # noqa: E402

TILE = 256


def tiles(example: dict, *, labels) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """(image, M, true foreground) tiles of TILE x TILE covering the image (edge tiles dropped)."""
  image = np.asarray(example['image'])
  label_m = pseudo_labels.make_initial_label(image, example['points'], labels=labels)
  truth = np.asarray(example['instances']) > 0
  out = []
  for y in range(0, image.shape[0] - TILE + 1, TILE):
    for x in range(0, image.shape[1] - TILE + 1, TILE):
      window = np.s_[y:y + TILE, x:x + TILE]
      out.append((image[window], label_m[window], truth[window]))
  return out


def score(pseudo: np.ndarray, truth: np.ndarray) -> dict:
  """Pooled over tiles: P (N, H, W) int8 in {1, 0, -1}, truth (N, H, W) bool."""
  fg, bg = pseudo == 1, pseudo == 0
  hit = np.sum(fg & truth)
  return {
      'fg_fraction': float(np.mean(fg)),
      'ignored_fraction': float(np.mean(pseudo < 0)),
      'precision': float(hit / max(np.sum(fg), 1)),
      'recall': float(hit / max(np.sum(truth), 1)),
      'iou': float(hit / max(np.sum(fg | truth), 1)),
      'nucleus_called_background': float(np.sum(bg & truth) / max(np.sum(truth), 1)),
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--thetas', default='0.8,0.7,0.6,0.5')
  parser.add_argument('--which', default='best', choices=('best', 'latest'))
  parser.add_argument('--out', default='')
  args = parser.parse_args()
  thetas = [float(t) for t in args.thetas.split(',')]

  config, graphdef, params, batch_stats = trained_run.load_trained_model(args.workdir, which=args.which)
  examples = folds.load_fold_examples(config)['val']
  items = [t for example in examples for t in tiles(example, labels=config.labels)]
  images = np.stack([t[0] for t in items])
  label_m = np.stack([t[1] for t in items])
  truth = np.stack([t[2] for t in items])
  cams_fn = jax.jit(lambda x: models.compute_cams(graphdef, params, batch_stats, x, train=False))
  cams = np.concatenate([np.asarray(cams_fn(jnp.asarray(images[i:i + 8])))
                         for i in range(0, len(images), 8)])  # (N, 4, H, W)

  results = {'workdir': args.workdir, 'which': args.which, 'tiles': len(items),
             'alpha_form': config.loss.alpha, 'm': score(label_m, truth), 'thetas': {}}
  print(f'{len(items)} validation tiles of {TILE}; M: ' +
        ', '.join(f'{k} {v:.3f}' for k, v in results['m'].items()))
  header = 'theta  map      fg      ign     prec    recall  iou     nuc->bg alpha'
  print(header)
  for theta in thetas:
    binary = np.asarray(losses.binarize_cam(cam=jnp.asarray(cams), theta=theta))
    pseudo, alpha, index = losses.dynamic_cam_selection(
        cams=jnp.asarray(cams), label=jnp.asarray(label_m), theta=theta, alpha_form=config.loss.alpha)
    alpha, index = np.asarray(alpha), np.asarray(index)
    rows = {f'block{k + 1}': dict(score(binary[:, k], truth), alpha=float(alpha[:, k].mean()))
            for k in range(cams.shape[1])}
    rows['dcs'] = dict(score(np.asarray(pseudo), truth),
                       alpha=float(np.take_along_axis(alpha, index[:, None], 1).mean()),
                       chosen=np.bincount(index, minlength=cams.shape[1]).tolist())
    results['thetas'][str(theta)] = rows
    for name, row in rows.items():
      print(f'{theta:<6.2f} {name:<8} ' + ' '.join(
          f'{row[k]:<7.3f}' for k in ('fg_fraction', 'ignored_fraction', 'precision', 'recall',
                                       'iou', 'nucleus_called_background', 'alpha')))
  if args.out:
    pathlib.Path(args.out).write_text(json.dumps(results, indent=2) + '\n')
    print('wrote', args.out)


if __name__ == '__main__':
  main()
