"""Copies what a finished run proves into experiments/runs/NAME/ and writes its README.

  python experiments/record_run.py --workdir=runs/tnbc_cpu_fold0 --name=tnbc_cpu_fold0 \
      --command="python -m donuseg_jax.main --config=configs/tnbc.py:cpu,plus --workdir=..." \
      --commit=f74fb6b --wall_seconds=2400 [--note="..."]

Copied: config.json, metrics.jsonl, eval_test_<protocol>.json, the last pseudo-label figure and
the first overlay. The README holds the command, commit, machine, wall time, the validation
curve, the test metrics and the last logged pseudo-label diagnostics: every figure in it is read
from the copied files.
"""

import argparse
import json
import pathlib
import platform
import shutil

import jax

ROOT = pathlib.Path(__file__).resolve().parents[1]
QUALITY = ('m', 'p', 'pred')


def _records(workdir: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines() if line]


def _number(value) -> str:
  """4 decimals; '-' where a metric is absent or not a number (validation images without masks
  log 'nan')."""
  return f'{value:.4f}' if isinstance(value, (int, float)) and value == value else '-'


def _mean_of_last(records: list[dict], key: str, count: int = 10) -> float | None:
  values = [r[key] for r in records if key in r][-count:]
  return sum(values) / len(values) if values else None


def record(workdir: pathlib.Path, name: str, *, command: str, commit: str, wall_seconds: float,
           note: str = '') -> pathlib.Path:
  target = ROOT / 'experiments' / 'runs' / name
  target.mkdir(parents=True, exist_ok=True)
  for file in ('config.json', 'metrics.jsonl'):
    shutil.copy2(workdir / file, target / file)
  evals = sorted(workdir.glob('eval_test_*.json'))
  for path in evals:
    shutil.copy2(path, target / path.name)
  figures = sorted((workdir / 'figures').glob('step_*.png'))
  if figures:
    shutil.copy2(figures[-1], target / f'pseudo_labels_{figures[-1].name}')
  overlays = sorted((workdir / 'overlays').glob('*.overlay.png'))
  if overlays:
    shutil.copy2(overlays[0], target / overlays[0].name)

  records = _records(workdir)
  config = json.loads((workdir / 'config.json').read_text())
  lines = [f'# {name}', '', f'- command: `{command}`', f'- commit: `{commit}`',
           f'- machine: {jax.device_count()} x {jax.devices()[0].platform} device(s), '
           f'{platform.machine()}, JAX {jax.__version__}; wall time {wall_seconds / 60:.1f} min '
           + ('(training, validations, test fold and overlays)' if evals
              else '(training and validations; the run evaluated no test fold)'),
           f"- config: `config.json` (dataset {config['data']['name']} fold {config['data']['fold']}, "
           f"{config['model']['encoder']}, initial label {config['labels']['initial']}, alpha "
           f"{config['loss']['alpha']}, use_dcs {config['loss']['use_dcs']}, use_ccl "
           f"{config['loss']['use_ccl']}, fixed_cam_block {config['loss']['fixed_cam_block']}, "
           f"checkpoint selected by val {config['train']['select_metric']})"]
  if note:
    lines.append(f'- note: {note}')
  lines += ['', '## Validation', '', '| step | AJI | DICE | PQ | point F1 |', '|---|---|---|---|---|']
  for r in records:
    if 'val/aji' in r:
      lines.append(f"| {r['step']} | " + ' | '.join(
          _number(r.get(f'val/{key}')) for key in ('aji', 'dice', 'pq', 'point_f1')) + ' |')
  for path in evals:
    result = json.loads(path.read_text())
    mean, aggregate = result['mean'], result['aggregate']
    lines += ['', f"## Test fold ({result['protocol']} protocol, {len(result['per_image'])} images, "
              f"{result['checkpoint']} checkpoint), `{path.name}`", '',
              '| | DICE | AJI | AJI+ | DQ | SQ | PQ |', '|---|---|---|---|---|---|---|',
              '| per-image mean | ' + ' | '.join(f'{mean[k]:.4f}' for k in
                                                 ('dice', 'aji', 'aji_plus', 'dq', 'sq', 'pq')) + ' |',
              '| aggregate | ' + ' | '.join(f'{aggregate[k]:.4f}' for k in
                                            ('dice', 'aji', 'aji_plus', 'dq', 'sq', 'pq')) + ' |']
  lines += ['', '## Pseudo-label diagnostics (training crops, mean of the last 10 logged steps)', '',
            '| map | fg fraction | precision | recall | IoU |', '|---|---|---|---|---|']
  truth = _mean_of_last(records, 'quality/true_fraction')
  measured = bool(truth)  # no true mask in the training crops (a user's folder): fractions only
  for key in QUALITY:
    values = [_mean_of_last(records, f'quality/{key}_{q}') for q in
              ('fg_fraction', 'precision', 'recall', 'iou')]
    if values[0] is not None:
      lines.append(f'| {key} | ' + ' | '.join(
          f'{v:.3f}' if measured or n == 0 else '-' for n, v in enumerate(values)) + ' |')
  if truth is not None and not measured:
    lines.append('| truth | - (the training images have no masks) | | | |')
  elif truth is not None:
    lines.append(f'| truth | {truth:.3f} | | | |')
  chosen = [_mean_of_last(records, f'dcs/chosen_block{k}') for k in range(1, 5)]
  if chosen[0] is not None:
    lines += ['', 'DCS choice per block (share of images, last 10 logged steps): '
              + ', '.join(f'block {k + 1} {v:.2f}' for k, v in enumerate(chosen))
              + f"; mean alpha_P {_mean_of_last(records, 'dcs/alpha_p'):.3f}."]
  (target / 'README.md').write_text('\n'.join(lines) + '\n')
  return target


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', required=True, type=pathlib.Path)
  parser.add_argument('--name', required=True)
  parser.add_argument('--command', required=True)
  parser.add_argument('--commit', required=True)
  parser.add_argument('--wall_seconds', required=True, type=float)
  parser.add_argument('--note', default='')
  args = parser.parse_args()
  print(record(args.workdir, args.name, command=args.command, commit=args.commit,
               wall_seconds=args.wall_seconds, note=args.note))


if __name__ == '__main__':
  main()
