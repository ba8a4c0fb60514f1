"""Outputs committed whole: one file (`atomic_write`) or one folder (`staged_dir`), so a kill leaves the previous
state or a folder whose name marks it incomplete, never a mix of two runs.

A folder is built under `.NAME.XXXX.partial` next to its final place and renamed into place when complete; an
earlier folder of that name is first renamed aside (`.NAME.XXXX.old`) and removed once the new one stands. A kill
between those two renames leaves the earlier folder, complete, under its `.old` name.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

PARTIAL_SUFFIX = ".partial"


def json_default(obj: Any) -> Any:
    """`json.dumps`' fallback for NumPy scalars and arrays (anything else: its `str`)."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


def atomic_write(path: str | os.PathLike, data: str | bytes | dict[str, Any] | list[Any]) -> Path:
    """Replace `path` whole with `data` (text, bytes, or a JSON document): a temporary file, then `os.replace`.

    Returns:
        The path written.
    """
    path = Path(path)
    if isinstance(data, dict | list):
        data = json.dumps(data, indent=2, default=json_default) + "\n"
    payload = data.encode("utf-8") if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(payload)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


@contextlib.contextmanager
def staged_dir(final: str | os.PathLike) -> Iterator[Path]:
    """A fresh folder to build `final` in, renamed into place when the block ends without an error.

    On an error (or Ctrl-C) the staging folder is removed and `final` is left as it was.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=PARTIAL_SUFFIX, dir=final.parent))
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    replace_dir(stage, final)


def replace_dir(source: Path, final: Path) -> None:
    """Put the folder `source` at `final`, replacing a folder there (renamed aside first, then removed)."""
    if not final.exists():
        os.replace(source, final)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=final.parent))
    os.replace(final, aside / final.name)
    os.replace(source, final)
    shutil.rmtree(aside, ignore_errors=True)
