"""What a training run writes as it goes: metrics.jsonl, TensorBoard events (if installed).

metrics.jsonl is appended one line per record. A resumed run first cuts it back to the restored
step (`truncate_after`, an atomic rewrite), so that each step's records appear once; a line torn
by a kill is dropped there and skipped by `read_metrics`.
"""

import json
import math
import pathlib

from donuseg_jax import atomic_io

METRICS_NAME = 'metrics.jsonl'


class MetricsWriter:
  """Appends one JSON object per line (each with its `step`) and mirrors scalars to TensorBoard."""

  def __init__(self, workdir: str | pathlib.Path, *, enabled: bool = True):
    self.enabled = enabled
    self.path = pathlib.Path(workdir) / METRICS_NAME
    self._tb = _tensorboard_writer(pathlib.Path(workdir) / 'tensorboard') if enabled else None

  def write(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    record = {'step': int(step)}
    record.update({k: _jsonable(v) for k, v in scalars.items()})
    with self.path.open('a') as f:
      f.write(json.dumps(record) + '\n')
    if self._tb is not None:
      for key, value in record.items():
        if key != 'step' and isinstance(value, float):
          self._tb.add_scalar(key, value, int(step))

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir: str | pathlib.Path) -> list[dict]:
  """Every complete record of DIR/metrics.jsonl, in file order."""
  return _read_records(pathlib.Path(workdir) / METRICS_NAME)


def truncate_after(workdir: str | pathlib.Path, step: int) -> int:
  """Keeps only the records of steps <= `step` (a run resumed from that step), atomically.

  Returns how many records were dropped."""
  path = pathlib.Path(workdir) / METRICS_NAME
  if not path.exists():
    return 0
  records = _read_records(path)
  kept = [r for r in records if int(r.get('step', 0)) <= step]
  lines = path.read_text().splitlines()
  if len(kept) == len(records) and len(lines) == len(records):
    return 0
  atomic_io.write_text(path, ''.join(json.dumps(r) + '\n' for r in kept))
  return len(records) - len(kept)


def _read_records(path: pathlib.Path) -> list[dict]:
  if not path.exists():
    return []
  records = []
  for line in path.read_text().splitlines():
    if not line.strip():
      continue
    try:
      records.append(json.loads(line))
    except ValueError:  # a line torn by a kill (only the last can be): not a record
      continue
  return records


def _jsonable(value):
  try:
    value = float(value)
  except (TypeError, ValueError):
    return value
  return value if math.isfinite(value) else str(value)


def _tensorboard_writer(logdir: pathlib.Path):
  """TensorBoard is optional: use tensorboardX or torch's writer when one is installed."""
  for module, name in (('tensorboardX', 'SummaryWriter'), ('torch.utils.tensorboard', 'SummaryWriter')):
    try:
      writer_cls = getattr(__import__(module, fromlist=[name]), name)
      return writer_cls(str(logdir))
    except Exception:  # not installed, or installed without its own dependencies
      continue
  return None
