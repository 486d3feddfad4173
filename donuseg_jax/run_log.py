"""What a training run writes as it goes: metrics.jsonl, TensorBoard events (if installed)."""

import json
import math
import pathlib


class MetricsWriter:
  """Appends one JSON object per line (each with its `step`) and mirrors scalars to TensorBoard."""

  def __init__(self, workdir: str | pathlib.Path, *, enabled: bool = True):
    self.enabled = enabled
    self.path = pathlib.Path(workdir) / 'metrics.jsonl'
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
  path = pathlib.Path(workdir) / 'metrics.jsonl'
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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
