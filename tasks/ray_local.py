"""A local Ray that listens on 127.0.0.1 only, with a private token file.

``ray.init()`` without an address starts a one-machine cluster. Left to itself, Ray 2.60 turns
a node address of ``127.0.0.1`` into the machine's routable IP and its GCS, raylet, object
manager, agents and workers then listen on every interface (``0.0.0.0``/``::``): anyone who
can reach the machine could submit code. Ray keeps everything on the loopback address only
when ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (Ray's single-machine mode): it must be in the
environment of the processes ``ray.init`` starts, and this process read it when it imported
ray, so :func:`init_local` sets both for the duration of the start (``infra/local-cluster.sh``
uses the same switch for its two-node loopback cluster).

Ray also starts a local cluster with token authentication and writes the token it generates to
``~/.ray/auth_token`` with the default umask (mode 0644 here: readable by every user).
:func:`private_token` writes that file first, mode 0600 (a token like Ray's, 32 random bytes
as hex), or narrows the mode of an existing one; with ``RAY_AUTH_MODE=disabled``,
``RAY_AUTH_TOKEN`` or ``RAY_AUTH_TOKEN_PATH`` set it leaves the token to the user.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

LOOPBACK = "127.0.0.1"
_SINGLE_MACHINE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def token_path() -> Path:
    """Where Ray reads (and writes) its token when no variable names another."""
    return Path.home() / ".ray" / "auth_token"


def private_token() -> Path | None:
    """Make sure the default token file is mode 0600 (created here if Ray would create it);
    returns its path, or None when the environment chooses the token or disables it."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return None
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return None
    path = token_path()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        st = path.stat()
        if st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) & 0o077:
            path.chmod(0o600)
        return path
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_hex(32))
    return path


@contextlib.contextmanager
def _single_machine() -> Iterator[None]:
    from ray._private import ray_constants

    before_env, before_flag = os.environ.get(_SINGLE_MACHINE), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_SINGLE_MACHINE] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before_flag
        if before_env is None:
            os.environ.pop(_SINGLE_MACHINE, None)
        else:
            os.environ[_SINGLE_MACHINE] = before_env


def init_local(**kwargs: Any) -> None:
    """``ray.init(**kwargs)`` of a new local cluster bound to 127.0.0.1, with the token file
    private before and after the start."""
    import ray

    private_token()
    with _single_machine():
        ray.init(_node_ip_address=LOOPBACK, **kwargs)
    private_token()
