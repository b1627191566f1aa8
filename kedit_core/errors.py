"""kedit's error types. The CLI prints a :class:`KeditError` as one clear line, without a traceback
(``kedit --debug`` or ``KEDIT_TRACEBACK=1`` shows one), and exits with the error's :attr:`exit_code`:
2 for bad input or usage (a file, record, field, flag or setting the user can fix), 1 for a fault while
running (a numerical failure, a full disk)."""
from __future__ import annotations

__all__ = ["KeditError", "RecordError", "PluginError", "AdapterNotFoundError", "HyperParamsError",
           "FingerprintMismatchError", "EditConflictError", "TensorFileError", "KeditRuntimeError",
           "NumericalError", "EXIT_INPUT", "EXIT_RUNTIME"]

EXIT_INPUT = 2     # usage and input errors (argparse uses 2 as well)
EXIT_RUNTIME = 1   # faults while running


class KeditError(Exception):
    """Base class for errors that are the user's input or environment, not a bug in kedit."""

    exit_code = EXIT_INPUT


class RecordError(KeditError, ValueError):
    """A bad record in a data file: names the file, the record index and the field."""

    def __init__(self, message: str, *, source: str | None = None, index: int | None = None,
                 field: str | None = None):
        self.source, self.index, self.field = source, index, field
        where = []
        if source is not None:
            where.append(str(source))
        if index is not None:
            where.append(f"record {index}")
        if field is not None:
            where.append(f"field '{field}'")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)


class PluginError(KeditError):
    """A plugin failed to load, or two plugins registered the same name."""


class AdapterNotFoundError(KeditError):
    """No model adapter is registered for a model's config class."""


class HyperParamsError(KeditError, ValueError):
    """Hyper-parameters that do not validate (unknown key, wrong type, bad value)."""


class FingerprintMismatchError(KeditError):
    """Deltas or statistics computed for one model were offered to another."""


class EditConflictError(KeditError, ValueError):
    """Requests in one batch contradict each other."""


class TensorFileError(KeditError):
    """A tensor file (deltas, statistics, a checkpoint) that cannot be trusted: unreadable, truncated,
    not written by kedit, with metadata or tensor names that do not validate, shapes out of bounds, or
    bytes that do not match the hash recorded when it was written."""


class KeditRuntimeError(KeditError):
    """A fault while running that is not a mistake in the input: the CLI exits with status 1."""

    exit_code = EXIT_RUNTIME


class NumericalError(KeditRuntimeError):
    """A computation produced NaN or infinite values, or a matrix that must be positive definite is not."""
