"""What every command does at the command line: short messages for expected errors, quiet logs.

An expected error (bad input, bad usage, a missing or unwritable file) is printed as one or a few
lines, `error: <message naming the file and the problem>`, and the command exits with status 2.
Anything else is a bug: its traceback is printed with a line asking to report it (status 1).
Library INFO logging (absl, Orbax, JAX) is hidden unless `--verbosity` (absl) asks for it;
progress bars, results, warnings and errors are always shown.

  # an absl command (main, evaluate)
  if __name__ == '__main__':
    cli.run_absl(main)
  # an argparse command returning its exit status
  if __name__ == '__main__':
    sys.exit(cli.run(main))

Raise `cli.CommandError` (or a subclass) for a new expected error. `images.DataError`,
`atomic_io.OutputError`, `checkpoints.CheckpointError` and `OSError`s are expected too.
"""

import ast
import logging as python_logging
import sys
import traceback

from absl import app
from absl import flags
from absl import logging

EXIT_BAD_INPUT = 2
EXIT_BUG = 1
EXIT_INTERRUPTED = 130
REPORT_HINT = ('this is a bug in donuseg-jax, not in your input: please report it with the '
               'command line and the traceback above')


class CommandError(Exception):
  """An expected problem with a command's input, usage or environment (exit status 2)."""


class UsageError(CommandError, ValueError):
  """The command line or the config asks for something impossible."""


# Expected errors defined in modules a command may never import: matched by module and class
# name, so that this module imports nothing heavy (and a module never loaded raised nothing).
_EXPECTED_ELSEWHERE = (
    ('donuseg_jax.data.images', 'DataError'),
    ('donuseg_jax.atomic_io', 'OutputError'),
    ('donuseg_jax.checkpoints', 'CheckpointError'),
)


def is_expected(error: BaseException) -> bool:
  if isinstance(error, (CommandError, OSError, app.UsageError)):
    return True
  for module_name, class_name in _EXPECTED_ELSEWHERE:
    module = sys.modules.get(module_name)
    if module is not None and isinstance(error, getattr(module, class_name)):
      return True
  return False


def message(error: BaseException) -> str:
  """The error's own text, without the quoting KeyError and AttributeError add."""
  text = str(error.args[0]) if len(error.args) == 1 else str(error)
  for _ in range(2):  # ml_collections wraps a KeyError's repr in an AttributeError
    if len(text) >= 2 and text[0] == text[-1] and text[0] in '\'"':
      try:
        text = str(ast.literal_eval(text))
      except (ValueError, SyntaxError):
        break
  if isinstance(error, OSError) and error.filename and str(error.filename) not in text:
    text = f'{error.filename}: {text}'
  return text or type(error).__name__


def report(error: BaseException, *, stream=None) -> int:
  """Prints an error the way commands do and returns the exit status for it."""
  stream = stream or sys.stderr
  if isinstance(error, KeyboardInterrupt):
    print('interrupted', file=stream)
    return EXIT_INTERRUPTED
  if is_expected(error):
    print_error(message(error).strip() or type(error).__name__, stream=stream)
    return EXIT_BAD_INPUT
  traceback.print_exception(error, file=stream)
  print(f'error: {type(error).__name__}: {error}\n{REPORT_HINT}', file=stream)
  return EXIT_BUG


def print_error(text: str, *, stream=None) -> None:
  """`error: <first line>`, further lines indented beneath it (so they read as one message)."""
  stream = stream or sys.stderr
  lines = text.strip().splitlines() or ['unknown error']
  print(f'error: {lines[0]}', file=stream)
  for line in lines[1:]:
    print(f'  {line.strip()}' if not line.startswith(' ') else line, file=stream)


def run(main, argv=None) -> int:
  """Calls `main(argv)` and returns its exit status (0 for None), reporting any error."""
  quiet_library_logs()
  try:
    status = main(argv)
  except SystemExit as exit_:
    return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
  except BaseException as error:  # noqa: BLE001 (every outcome becomes a message and a status)
    return report(error)
  return 0 if status is None else int(status)


def run_absl(main) -> None:
  """`absl.app.run(main)` with flag and config errors as one line and status 2, and `main`'s
  expected errors reported as by `run`. Does not return."""
  def guarded(argv):
    if not flags.FLAGS['verbosity'].present:
      quiet_library_logs()
    try:
      status = main(argv)
    except SystemExit:
      raise
    except BaseException as error:  # noqa: BLE001
      sys.stdout.flush()
      sys.exit(report(error))
    sys.exit(0 if status is None else status)

  app.run(guarded, flags_parser=parse_absl_flags)


def parse_absl_flags(argv):
  """absl's flag parsing, but a mistyped flag or config field is one line and exit status 2."""
  try:
    return flags.FLAGS(argv)
  except Exception as error:  # noqa: BLE001 (config files and overrides raise many types)
    prefix = 'bad command line' if isinstance(error, flags.Error) else 'bad config or override'
    # ml_collections adds its 'Did you mean ...' on a second line: indented, it stays one message.
    print_error(f'{prefix}: {message(error)}' + (f'\nsee: {argv[0]} --helpfull' if argv else ''))
    sys.exit(EXIT_BAD_INPUT)


def quiet_library_logs() -> None:
  """Library INFO logs off: absl (and so Orbax and JAX) at WARNING, Orbax's read-only notices
  (warnings about options it adjusts for us) filtered out."""
  logging.set_verbosity(logging.WARNING)
  python_logging.getLogger('absl').addFilter(_drop_orbax_notices)
  logging.get_absl_handler().addFilter(_drop_orbax_notices)


def _drop_orbax_notices(record: python_logging.LogRecord) -> bool:
  if record.levelno >= python_logging.ERROR or '/orbax/' not in record.pathname.replace('\\', '/'):
    return True
  text = record.getMessage()
  return not ('read_only=True' in text or 'is read only' in text)
