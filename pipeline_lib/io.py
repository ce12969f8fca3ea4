"""Atomic writes, content hashes, and weight files (safetensors)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import safe_open

if TYPE_CHECKING:  # torch is imported where tensors are handled: `unlearn lineage` needs none
    import torch


def pid_alive(pid: int) -> bool:
    """Whether a process with ``pid`` exists on this host (signal 0 probes without killing)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, owned by another user
    return True


def _owner_tag() -> str:
    """``<pid>@<host>`` of this process, as written into atomic_path's temporary names."""
    host = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"
    return f"{os.getpid()}@{host}"


_TEMP_NAME = re.compile(r"^\.(?P<name>.+?)\.(?P<pid>\d+)@(?P<host>[A-Za-z0-9-]+)\..*\.tmp$")


def stale_temps(folder: str | Path) -> list[Path]:
    """Temporary siblings that :func:`atomic_path` left in ``folder`` when its process died
    mid-write (SIGKILL, power loss): those named by a process of this host that no longer
    exists. A live writer's, or another host's, are never listed."""
    folder = Path(folder)
    host = _owner_tag().split("@", 1)[1]
    out = []
    for entry in sorted(folder.iterdir()) if folder.is_dir() else []:
        m = _TEMP_NAME.match(entry.name)
        if m is None or m["host"] != host:
            continue
        try:
            if not pid_alive(int(m["pid"])):
                out.append(entry)
        except OverflowError:
            pass  # not a pid
    return out


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path; move it onto ``target`` only if the block succeeds.

    Works for files and directories: a crash leaves the previous ``target`` (or nothing), never
    a half-written one.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # the name says whose it is, so a crashed writer's leftovers can be told apart from a live
    # one's (stale_temps)
    tmp = Path(
        tempfile.mkdtemp(prefix=f".{target.name}.{_owner_tag()}.", suffix=".tmp", dir=target.parent)
    )
    work = tmp / target.name
    try:
        yield work
        if not work.exists() and not work.is_symlink():
            raise FileNotFoundError(
                f"atomic write of {target}: the block wrote nothing; {target} left as it was"
            )
        if target.is_dir() and not target.is_symlink():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            target.rename(old)
            work.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(work, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str | Path, payload: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def state_dict_digest(state: dict[str, torch.Tensor]) -> str:
    """Order-independent sha256 over names, dtypes, shapes and bytes of a state dict."""
    import torch

    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        arr = t.numpy() if t.dtype != torch.bfloat16 else t.view(torch.int16).numpy()
        h.update(memoryview(arr.reshape(-1)).cast("B"))  # the same bytes, without a copy
    return h.hexdigest()


def save_weights(
    state: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> str:
    """Write a state dict as safetensors (atomically); return its content digest."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    digest = state_dict_digest(tensors)
    meta = {"digest": digest, **(metadata or {})}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return digest


class WeightsError(ValueError):
    """A weights file that cannot be read or whose tensors do not match its content digest
    (truncated, corrupted, edited). The message names the file."""


#: (resolved path, size, mtime_ns) of files verified in this process, with their digest: a
#: file is hashed once per process however often it is loaded.
_VERIFIED: dict[tuple[str, int, int], str] = {}

_NAMED_DIGEST = re.compile(r"-([0-9a-f]{16})\.safetensors$")


def read_weights(path: str | Path, verify: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, metadata) of a safetensors file. With ``verify`` (the default), a file whose
    metadata carries a ``digest`` (every file :func:`save_weights` writes) must hash to it,
    and a file named ``<stem>-<digest[:16]>.safetensors`` (:func:`save_model`) must match its
    name: otherwise :class:`WeightsError`, as for a file safetensors cannot parse."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = dict(fh.metadata() or {})
            state = {name: fh.get_tensor(name) for name in fh.keys()}
    except Exception as exc:  # safetensors raises its own error types for a damaged file
        raise WeightsError(f"{path}: unreadable weights file ({exc}); delete it") from exc
    if verify:
        expected = meta.get("digest")
        # save_model's files: <role>-<digest[:16]>.safetensors, with the role in the metadata
        named = _NAMED_DIGEST.search(path.name) if "role" in meta else None
        if named and path.name != f"{meta['role']}-{named.group(1)}.safetensors":
            named = None
        if expected and named and not expected.startswith(named.group(1)):
            raise WeightsError(
                f"{path}: its name says digest {named.group(1)}, its metadata {expected[:16]}"
            )
        if expected:
            st = path.stat()
            key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
            if _VERIFIED.get(key) != expected:
                actual = state_dict_digest(state)
                if actual != expected:
                    raise WeightsError(
                        f"{path}: tensors hash to {actual[:16]}, the file says {expected[:16]} "
                        "(corrupted or edited); delete it"
                    )
                _VERIFIED[key] = expected
    return state, meta


def load_weights(path: str | Path, verify: bool = True) -> dict[str, torch.Tensor]:
    """The state dict of a safetensors file, verified against its content digest
    (:func:`read_weights`)."""
    return read_weights(path, verify)[0]


def weights_ok(path: str | Path, digest: str | None = None) -> bool:
    """True when ``path`` is a readable weights file matching its own digest and, if given,
    ``digest`` (what a cache record says it holds). For cache look-ups: a False file is to be
    removed and recomputed."""
    try:
        _, meta = read_weights(path)
    except (FileNotFoundError, WeightsError):
        return False
    return digest is None or meta.get("digest") == digest


def save_model(
    model: torch.nn.Module, out_dir: str | Path, stem: str, meta: dict[str, str]
) -> tuple[str, str]:
    """Save ``model``'s weights as ``<out_dir>/models/<stem>-<digest[:16]>.safetensors``
    (content-addressed, atomic); returns (path, digest). Tensors are cloned first: tied
    weights (GPT-2's embedding and head) share storage, which safetensors refuses."""
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    digest = state_dict_digest(state)
    path = Path(out_dir) / "models" / f"{stem}-{digest[:16]}.safetensors"
    save_weights(state, path, {"role": stem, **meta})
    return str(path), digest


def load_into(model: torch.nn.Module, path: str | Path) -> torch.nn.Module:
    """Load safetensors weights into ``model`` (verified against their digest,
    :func:`read_weights`); returns it in eval mode."""
    model.load_state_dict(load_weights(path))
    return model.eval()


def check_same_data(
    manifests_summary: dict, content_hash: str, manifests_dir: str | Path, prepared_dir: str | Path
) -> None:
    """Refuse manifests extracted from other prepared data than ``prepared_dir``."""
    theirs = manifests_summary["data_content_hash"]
    if theirs != content_hash:
        raise ValueError(
            f"{manifests_dir} was extracted from other data ({theirs[:12]}) than "
            f"{prepared_dir} ({content_hash[:12]}); re-run the extract stage"
        )


def code_version() -> str:
    """sha256 over pipeline_lib's sources: part of every cache key, so caches follow code."""
    h = hashlib.sha256()
    root = Path(__file__).resolve().parent
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()
