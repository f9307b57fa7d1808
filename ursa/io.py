"""Atomic file and folder writes: the one helper every writer in the project goes through.

A file is written to a temporary name in the same folder, flushed and fsync'ed, then renamed over
the target (`os.replace` is atomic on POSIX): a reader, or a rerun after a kill, sees the old file
or the new one, never half of either.

A folder (a model directory, a resume checkpoint, a dataset) is built under `<name>.tmp` and then
swapped in so that a COMPLETE folder exists at every moment:

    final -> final.old      (only when final exists)
    tmp   -> final
    rm -r final.old

`recover_dir(final)` undoes a kill between those steps: if `final` is missing but `final.old` is
complete, `final.old` is moved back; leftover `.tmp` / `.old` folders are removed. Every reader of a
swapped folder calls it first (ursa.trainer on resume, ursa.weights on load).

Append-only logs (metrics.jsonl) are the one exception: `append_jsonl` adds a line in one write; a
kill can cut the last line, which their reader ignores.

JSON is written with `allow_nan=False` after NaN / inf became null: a JSON file of this project is
always JSON (Python's json module would otherwise write the non-standard token NaN).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Iterator, Union

PathLike = Union[str, os.PathLike]

TMP_SUFFIX = ".tmp"
OLD_SUFFIX = ".old"


def _fsync_dir(folder: Path) -> None:
    """Make a rename inside `folder` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(str(folder), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on a clean exit it replaces `path` atomically.

    The caller writes the temporary path by any means (open(), safetensors' save_file, PIL's save).
    On an exception the temporary file is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{TMP_SUFFIX}{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes(path: PathLike, data: bytes) -> None:
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def write_text(path: PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def jsonable(x: Any) -> Any:
    """x with every non-finite float replaced by None (JSON has no NaN or Infinity)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    return x


def dumps(obj: Any, indent: int | None = 1) -> str:
    """Strict JSON text (non-finite floats as null, UTF-8 kept as is)."""
    return json.dumps(jsonable(obj), indent=indent, ensure_ascii=False, allow_nan=False)


def write_json(path: PathLike, obj: Any, indent: int | None = 1) -> None:
    write_text(path, dumps(obj, indent) + "\n")


def write_jsonl(path: PathLike, records: Iterable[dict]) -> None:
    """One JSON object per line; keys starting with "_" (read-time bookkeeping such as "_where")
    are dropped."""
    lines = [dumps({k: v for k, v in r.items() if not str(k).startswith("_")}, None) for r in records]
    write_text(path, "".join(line + "\n" for line in lines))


def append_jsonl(path: PathLike, record: dict) -> None:
    """Append one JSON line (strict JSON, as `dumps`) to an append-only log such as metrics.jsonl,
    in one write. Not atomic: a kill can leave the last line cut; the log's reader ignores a cut
    last line (ursa.trainer.read_metrics) and the writer rewrites the file on resume."""
    line = dumps(record, None) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)


def read_json(path: PathLike, what: str = "JSON file") -> Any:
    """A JSON file, or ValueError naming the file (and line) when it is missing or not JSON."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ValueError(f"{path}: no such {what}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except IsADirectoryError:
        raise ValueError(f"{path}: is a folder, expected a {what}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None


# ---- folders ---------------------------------------------------------------------------------

def _tmp_dir(final: Path) -> Path:
    return final.with_name(final.name + TMP_SUFFIX)


def _old_dir(final: Path) -> Path:
    return final.with_name(final.name + OLD_SUFFIX)


def recover_dir(final: PathLike) -> None:
    """Finish or undo an interrupted swap of `final` (see the module docstring)."""
    final = Path(final)
    old, tmp = _old_dir(final), _tmp_dir(final)
    if not final.exists() and old.exists():
        old.rename(final)                  # killed between "final -> old" and "tmp -> final"
    if old.exists():
        shutil.rmtree(old)                 # killed after the swap, before the delete
    if tmp.exists():
        shutil.rmtree(tmp)                 # killed while building: the old folder stands


def new_tmp_dir(final: PathLike) -> Path:
    """An empty `<final>.tmp` folder to build `final` in (any leftover of a killed build removed)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_dir(final)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def commit_dir(tmp: PathLike, final: PathLike) -> None:
    """Swap the finished folder `tmp` in as `final` so that a complete one exists at every moment."""
    tmp, final = Path(tmp), Path(final)
    old = _old_dir(final)
    if old.exists() and not final.exists():
        old.rename(final)                  # an earlier swap was cut after "final -> old": old is the complete one
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    _fsync_dir(final.parent)
    if old.exists():
        shutil.rmtree(old)


@contextlib.contextmanager
def atomic_dir(final: PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder; on a clean exit it replaces `final` (commit_dir).
    On an exception the temporary folder is removed and `final` is left as it was."""
    tmp = new_tmp_dir(final)
    try:
        yield tmp
        commit_dir(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
