"""Stage progress for whoever is watching (the CLI's rich display), and stage logs into Prefect.

The flows call :func:`emit` as a stage starts, logs and ends; a display subscribes with
:func:`listening`. While a stage runs, :func:`stage_logs` forwards the INFO messages of
the ``linkage`` and ``synthetic_data`` loggers (counts and timings; the library never logs
a record value) to the Prefect run logger, so they reach the UI, and to the display.

Example:
    >>> seen = []
    >>> with listening(lambda stage, status, detail: seen.append((stage, status))):
    ...     emit("ingest", "running")
    >>> seen
    [('ingest', 'running')]
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator

__all__ = ["emit", "listening", "stage_logs"]

Listener = Callable[[str, str, str], None]
_listeners: list[Listener] = []
_lock = threading.Lock()
LIBRARY_LOGGERS = ("linkage", "synthetic_data")


@contextlib.contextmanager
def listening(fn: Listener) -> Iterator[None]:
    """Call ``fn(stage, status, detail)`` for every event while the block runs.

    Statuses: ``running``, ``log`` (a library message), ``done``, ``cached``, ``failed``.
    """
    with _lock:
        _listeners.append(fn)
    try:
        yield
    finally:
        with _lock:
            _listeners.remove(fn)


def emit(stage: str, status: str, detail: str = "") -> None:
    """Tell every listener about a stage event (a failing listener never stops the run)."""
    with _lock:
        listeners = list(_listeners)
    for fn in listeners:
        try:
            fn(stage, status, detail)
        except Exception:  # noqa: BLE001 - a display problem must not fail a run
            logging.getLogger(__name__).debug("progress listener failed", exc_info=True)


class _Forward(logging.Handler):
    def __init__(self, stage: str, run_logger: logging.Logger | logging.LoggerAdapter | None):
        super().__init__(logging.INFO)
        self.stage, self.run_logger = stage, run_logger

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001
            return
        if self.run_logger is not None:
            self.run_logger.log(record.levelno, "%s: %s", record.name, message)
        emit(self.stage, "log", message)


@contextlib.contextmanager
def stage_logs(stage: str) -> Iterator[None]:
    """Forward the library's INFO+ messages to the Prefect run logger and the display while a stage runs."""
    try:
        from prefect import get_run_logger

        run_logger = get_run_logger()
    except Exception:  # noqa: BLE001 - outside a run (task.fn()): display only
        run_logger = None
    handler = _Forward(stage, run_logger)
    saved = []
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, logger.level, logger.propagate))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        # the run logger prints to the console itself; propagating would print twice
        logger.propagate = False
    try:
        yield
    finally:
        for logger, level, propagate in saved:
            logger.removeHandler(handler)
            logger.setLevel(level)
            logger.propagate = propagate
