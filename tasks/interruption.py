"""Clean interruption of a command (``unlearn``'s SIGTERM and SIGINT handling).

Without it, SIGTERM ends the interpreter at once: no ``finally`` runs, no ``atexit`` handler,
so the temporary Prefect API server that Prefect starts in a subprocess (when no
``PREFECT_API_URL`` is set) keeps listening, orphaned, and the open MLflow run is left as it
was. With :func:`interruptible`:

- SIGTERM raises :class:`Interrupted` (a ``KeyboardInterrupt``) and SIGINT
  ``KeyboardInterrupt`` in the main thread, so the command unwinds like any failure: the flows
  close their MLflow runs (as KILLED, see ``tasks.tracking.end_run``), Prefect marks the flow
  run crashed, and the interpreter exits normally, which runs Prefect's own ``atexit``
  handler that stops its temporary server, and Ray's that stops a local Ray.
- Runs this process started and nobody closed are closed as KILLED on the way out.
- A second signal while that is under way stops the temporary server and exits at once.

The signal is recorded before anything is raised, and that record (:func:`received`), not the
exception's type, says the command was interrupted: ``ray.get``/``ray.wait`` re-raise a
handler's exception as a plain ``KeyboardInterrupt`` (any other type as ``SystemError``),
which is also why :class:`Interrupted` is a ``KeyboardInterrupt``.

During a Prefect flow run Prefect installs its own SIGTERM handler (raising
``TerminationSignal``) and, after handling that, re-sends the signal to the handler it
replaced, ours. ``ray.init`` replaces the SIGTERM handler with one that calls ``sys.exit``
(and a ``TerminationSignal`` would not survive ``ray.get``): ``tasks.attribution.connect``
calls :func:`reinstall` after it.

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


class Interrupted(KeyboardInterrupt):
    """The command was asked to stop (SIGTERM). A KeyboardInterrupt: ``except Exception``
    handlers do not swallow it, and Ray and Prefect treat it as the interruption it is."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


def received() -> int | None:
    """The first SIGTERM/SIGINT this process received under :func:`interruptible`, if any."""
    return _received[0] if _received else None


def is_interruption(exc: BaseException) -> bool:
    """Whether ``exc`` ends the command because it was asked to stop: a signal was received
    (whatever exception it turned into on its way up), or ``exc`` is a KeyboardInterrupt or
    Prefect's TerminationSignal."""
    return (
        bool(_received)
        or isinstance(exc, KeyboardInterrupt)
        or (type(exc).__name__ == "TerminationSignal")
    )


def _signum(exc: BaseException | None) -> int:
    if _received:
        return _received[0]
    if type(exc).__name__ == "TerminationSignal":
        return signal.SIGTERM
    return signal.SIGINT


def exit_code(exc: BaseException | None = None) -> int:
    """The shell's exit code for an interruption: 128 + the signal number (SIGTERM 143,
    SIGINT 130)."""
    return 128 + _signum(exc)


def describe(exc: BaseException | None = None) -> str:
    """``interrupted by SIGTERM`` (or the signal received)."""
    return f"interrupted by {signal.Signals(_signum(exc)).name}"


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


_installed: list[bool] = []


def reinstall() -> None:
    """Put this module's handlers back after a library replaced them (``ray.init`` does);
    a no-op outside :func:`interruptible` or off the main thread."""
    if not _installed:
        return
    with contextlib.suppress(ValueError):
        for sig in SIGNALS:
            signal.signal(sig, _handler)


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
    _installed.append(True)
    try:
        yield
    except BaseException as exc:
        if is_interruption(exc):
            closed = close_open_runs()
            if closed:
                log.warning("closed MLflow run(s) %s as KILLED", ", ".join(closed))
        raise
