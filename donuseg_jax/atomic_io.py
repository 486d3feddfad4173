"""Atomic file writes: a file a user keeps is either the old one or the complete new one.

Everything is written to a hidden temporary name in the destination folder (same file system, so
the final `os.replace` is atomic), flushed and fsynced, then renamed. A crash, a kill or a full disk
leaves at most a `.NAME.tmp-*` file behind, never a truncated file under the final name.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import tempfile
from collections.abc import Iterator
from typing import IO, Any


class OutputError(OSError):
  """A file could not be written; the message names it (the old file, if any, is untouched)."""


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = 'w', **kwargs) -> Iterator[IO]:
  """Opens a temporary file beside `path`; on a clean exit it replaces `path` in one step."""
  if mode not in ('w', 'wb'):
    raise ValueError(f'atomic_open writes whole files (mode "w" or "wb"), got {mode!r}')
  path = pathlib.Path(path)
  try:
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.tmp-')
  except OSError as error:
    raise OutputError(f'cannot write {path}: {error.strerror or error}') from error
  tmp = pathlib.Path(tmp_name)
  try:
    with os.fdopen(fd, mode, **kwargs) as stream:
      yield stream
      stream.flush()
      os.fsync(stream.fileno())
    os.replace(tmp, path)
  except OSError as error:
    tmp.unlink(missing_ok=True)
    raise OutputError(f'cannot write {path}: {error.strerror or error}') from error
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
  with atomic_open(path, 'wb') as stream:
    stream.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
  with atomic_open(path, 'w', encoding='utf-8') as stream:
    stream.write(text)


def write_json(path: str | os.PathLike, value: Any, **dump_kwargs) -> None:
  dump_kwargs.setdefault('indent', 2)
  write_text(path, json.dumps(value, **dump_kwargs) + '\n')
