"""Clean interruption of a command (``unlearn``'s SIGTERM and SIGINT handling).

Without it, SIGTERM ends the interpreter at once: no ``finally`` runs, no ``atexit`` handler,
so the temporary Prefect API server that Prefect starts in a subprocess (when no
``PREFECT_API_URL`` is set) keeps listening, orphaned, and the open MLflow run is left as it
was. With :func:`interruptible`:

- SIGTERM raises :class:`Interrupted` and SIGINT ``KeyboardInterrupt`` in the main thread, so
  the command unwinds like any failure: the flows close their MLflow runs (as KILLED, see
  ``tasks.tracking.end_run``), Prefect marks the flow run crashed, and the interpreter exits
  normally, which runs Prefect's own ``atexit`` handler that stops its temporary server, and
  Ray's that stops a local Ray.
- Runs this process started and nobody closed are closed as KILLED on the way out.
- A second signal while that is under way stops the temporary server and exits at once.

During a Prefect flow run Prefect installs its own SIGTERM handler (raising
``TerminationSignal``) and, after handling that, re-sends the signal to the handler it
replaced, ours. ``ray.init`` replaces the SIGTERM handler with one that calls ``sys.exit``;
``tasks.attribution.connect`` puts the previous one back.

Nothing here imports Prefect, Ray or MLflow: a command that never used them pays nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from collections.abc import Iterator

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)

#: Signals received so far (the first one decides the exit code).
_received: list[int] = []


class Interrupted(BaseException):
    """The command was asked to stop (SIGTERM). A BaseException, like KeyboardInterrupt, so
    that ``except Exception`` handlers do not swallow it."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def exit_code(exc: BaseException) -> int:
    """The shell's exit code for an interruption: 128 + the signal number (SIGTERM 143,
    SIGINT 130)."""
    if isinstance(exc, Interrupted):
        return exc.exit_code
    return 128 + (_received[0] if _received else signal.SIGINT)


def stop_temporary_api() -> int:
    """Stop every temporary Prefect API server this process started; returns how many. Only
    looks if Prefect's server module was imported (else none was started)."""
    server_mod = sys.modules.get("prefect.server.api.server")
    if server_mod is None:
        return 0
    # Prefect keeps its temporary servers in this class-level registry (one per port).
    servers = list(getattr(server_mod.SubprocessASGIServer, "_instances", {}).values())
    stopped = 0
    for server in servers:
        if getattr(server, "server_process", None) is not None:
            server.stop()
            stopped += 1
    return stopped


def close_open_runs() -> list[str]:
    """Close as KILLED the MLflow runs this process started and has not closed."""
    tracking = sys.modules.get("tasks.tracking")
    return tracking.close_active_runs("KILLED") if tracking is not None else []


def _handler(signum: int, frame: object) -> None:
    if _received:  # a second signal: do not wait for the unwinding
        print(f"unlearn: {signal.Signals(signum).name} again: stopping now", file=sys.stderr)
        with contextlib.suppress(Exception):
            stop_temporary_api()
        os._exit(128 + _received[0])
    _received.append(signum)
    tracking = sys.modules.get("tasks.tracking")
    if tracking is not None:
        tracking.mark_interrupted(signal.Signals(signum).name)
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Interrupted(signum)


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """Run a command with the handlers above (main thread only; elsewhere a no-op). An
    interruption propagates (as :class:`Interrupted` or ``KeyboardInterrupt``) after the
    runs this process left open are closed as KILLED; the caller turns it into
    :func:`exit_code`. The handlers stay installed after the block, through the
    interpreter's exit, so a signal during Prefect's and Ray's exit handlers is handled too."""
    try:
        for sig in SIGNALS:
            signal.signal(sig, _handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    except (Interrupted, KeyboardInterrupt):
        if not _received:  # a KeyboardInterrupt raised by Python's own means
            _received.append(signal.SIGINT)
        closed = close_open_runs()
        if closed:
            log.warning("closed MLflow run(s) %s as KILLED", ", ".join(closed))
        raise
