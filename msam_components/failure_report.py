"""Bundle runs from the command line: the reason of a failure as the last line a user sees, one traceback, not three.

MONAI wraps a transform error in ``RuntimeError: applying transform ...`` and a config error in ``Failed to instantiate
component ...``; ignite's engines fire ``EXCEPTION_RAISED``, where MONAI's ``StatsHandler`` logs the whole traceback,
once per nested engine (evaluator inside trainer). The bundle configs call :func:`install_failure_report` from their
``install_failure_report`` id (listed in ``initialize``) and put :class:`FailureReport` first in every handler list:
the engines then log one line each and the run ends with the root reason as one line, e.g. ``ERROR: cannot read
.../imaging.nii.gz: ...``; ``MSAM_DEBUG=1`` prints the traceback above it. The hook ends the process, so a program
that embeds a bundle (the MONAI Label server) overrides ``install_failure_report`` to null and never installs it.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from types import TracebackType

from ignite.engine import Engine, Events

from .io import is_disk_full

__all__ = ["FailureReport", "failure_reason", "install_failure_report"]

logger = logging.getLogger("msam_components")
# Messages of exceptions that only wrap the real one (MONAI's transform and config wrappers).
_WRAPPER_PREFIXES = ("applying transform", "Failed to instantiate component", "Failed to evaluate")
_WORKER_MARKER = "Original Traceback"
DEBUG_VARIABLE = "MSAM_DEBUG"  # set (to 1) to get the whole traceback of a failed run


def _chain(err: BaseException) -> list[BaseException]:
    """The exception and its causes/contexts, outermost first."""
    chain, seen = [], set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        chain.append(current)
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return chain


def failure_reason(err: BaseException) -> str:
    """The reason a run failed, in the words of the outermost exception that is not one of MONAI's wrappers."""
    chain = _chain(err)
    reason = next((e for e in chain if not str(e).lstrip().startswith(_WRAPPER_PREFIXES)), chain[-1])
    text = str(reason).strip()
    if _WORKER_MARKER in text:  # re-raised from a DataLoader worker: the message ends with the worker's last line
        text = [line for line in text.splitlines() if line.strip()][-1].strip()
    if is_disk_full(err) and "the disk is full" not in text:  # e.g. torch's "unexpected pos 64 vs 0"
        written = _written_file(chain)
        text = f"{text} (the disk is full{f' while writing {written}' if written else ''})"
    return f"{type(reason).__name__}: {text}" if text else type(reason).__name__


def _written_file(chain: list[BaseException]) -> str | None:
    """The file a failed write was writing: the innermost frame's ``path`` or ``filename`` argument, if any."""
    for exc in chain:
        tb, found = exc.__traceback__, None
        while tb is not None:
            value = tb.tb_frame.f_locals.get("path", tb.tb_frame.f_locals.get("filename"))
            if isinstance(value, (str, os.PathLike)):
                found = os.fspath(value)
            tb = tb.tb_next
        if found:
            return found
    return None


def _report(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    """``sys.excepthook``: the traceback once, then the reason as the last line; frees the frames before exit."""
    if issubclass(exc_type, KeyboardInterrupt):
        sys.__excepthook__(exc_type, exc, tb)
        return
    if os.environ.get(DEBUG_VARIABLE, "").strip().lower() not in ("", "0", "false", "no"):
        traceback.print_exception(exc_type, exc, tb)
        print(f"\nERROR: {failure_reason(exc)}", file=sys.stderr, flush=True)
    else:
        print(f"({DEBUG_VARIABLE}=1 prints the traceback)", file=sys.stderr)
        print(f"ERROR: {failure_reason(exc)}", file=sys.stderr, flush=True)
    # end here: with the error's frames (engines, data loaders, writers) still alive, interpreter teardown can abort
    # the process in native code ("terminate called without an active exception", exit 134) after the message
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


def install_failure_report() -> None:
    """Make an uncaught error end the process with its reason as the last line (a command-line run's ``initialize``)."""
    sys.excepthook = _report


class FailureReport:
    """Ignite handler, first in a handler list: logs one line on an error and re-raises it.

    Ignite stops at the first ``EXCEPTION_RAISED`` handler that raises, so MONAI's ``StatsHandler`` no longer logs the
    whole traceback once per engine; the traceback is printed once at exit (see :func:`install_failure_report`).
    """

    def attach(self, engine: Engine) -> None:
        """Register on ``engine`` (attach before other handlers that react to errors)."""
        engine.add_event_handler(Events.EXCEPTION_RAISED, self)

    def __call__(self, engine: Engine, err: Exception) -> None:
        """Log the reason in one line and re-raise."""
        logger.error(f"{type(engine).__name__} stopped: {failure_reason(err)}")
        raise err
