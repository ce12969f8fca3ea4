"""The first check of a params file, before it is parsed: UTF-8 text of bounded size.

Kept apart from :mod:`pipeline_lib.validation` (which imports the data modules, numpy and
pyarrow) so that every ``unlearn`` command can run it at start-up for almost nothing;
``pipeline_lib.validation`` re-exports both names."""

from __future__ import annotations

from pathlib import Path

from pipeline_lib.schema import ConfigError

#: A params file larger than this is not a params file.
MAX_PARAMS_BYTES = 1_000_000


def check_params_file(path: str | Path) -> None:
    """A params file that exists must be UTF-8 text of at most :data:`MAX_PARAMS_BYTES`
    (YAML errors, a missing file and bad keys are reported when it is parsed)."""
    path = Path(path)
    if not path.is_file():
        return
    size = path.stat().st_size
    if size > MAX_PARAMS_BYTES:
        raise ConfigError(
            f"{path}: params file is {size:,} bytes; the limit is {MAX_PARAMS_BYTES:,} bytes"
        )
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a text file (not UTF-8 at byte {exc.start})") from None
    if b"\0" in data:
        raise ConfigError(f"{path}: not a text file (NUL bytes)")
