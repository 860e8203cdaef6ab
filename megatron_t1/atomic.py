"""Atomic writes: a file or folder appears under its final name complete, or not at all.

Every writer of ours goes through this module (stdlib only, importable without torch):

- :func:`atomic_file` — a context manager yielding a file object on a temporary sibling
  (``.NAME.RANDOM.tmp``); on a clean exit it is flushed, made world-readable (``mkstemp`` creates 0600)
  and renamed over ``path``; on an exception (Ctrl-C included) it is deleted and ``path`` is untouched.
- :func:`write_text_atomic` / :func:`write_bytes_atomic` — the one-call forms.
- :func:`atomic_dir` — the same for a folder: yields a temporary sibling folder that becomes ``out``
  when the block completes (replacing an old ``out`` only with ``replace=True``).
- :func:`publish_dir` — the last step alone, for a folder that several processes fill (a distributed
  checkpoint): rename a finished temporary folder over ``out``, moving an old one aside first so that
  at no moment is there a half-replaced folder under the final name.

A killed process leaves only dot-named temporaries, never a partial file under the final name.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

FILE_MODE = 0o644  # results and datasets are meant to be shared


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w", *, encoding: str | None = "utf-8", newline=None
                ) -> Iterator[IO]:  # fmt: skip
    """Open a temporary sibling of ``path`` for writing; it replaces ``path`` when the block ends.

    ``mode``: ``"w"`` (text, ``encoding``/``newline`` apply) or ``"wb"``. Parent folders are created.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_file: mode must be 'w' or 'wb', got {mode!r}")
    kw = {} if mode == "wb" else {"encoding": encoding, "newline": newline}
    with atomic_path(path) as tmp, open(tmp, mode, **kw) as f:
        yield f


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary sibling path (an empty file, same suffix) for writers that take a file name
    (``savefig``, ``torch.save``); it replaces ``path`` when the block ends, or is deleted on an
    exception."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.stem}.", suffix=f".tmp{p.suffix}", dir=p.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text_atomic(path: str | os.PathLike, text: str, *, newline=None) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    with atomic_file(path, "w", newline=newline) as f:
        f.write(text)
    return Path(path)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns the path."""
    with atomic_file(path, "wb") as f:
        f.write(data)
    return Path(path)


def publish_dir(tmp: str | os.PathLike, out: str | os.PathLike, *, replace: bool = True) -> Path:
    """Rename the finished folder ``tmp`` to ``out`` (same file system).

    An existing ``out`` is moved aside (``.NAME.old-PID``) first and deleted after, so ``out`` is at
    every moment either the old folder or the new one. ``replace=False``: an existing ``out`` is an error
    (FileExistsError naming it) and ``tmp`` is left in place for the caller to clean up.
    """
    tmp, out = Path(tmp), Path(out)
    old = None
    if out.exists():
        if not replace:
            raise FileExistsError(f"{out} already exists; not overwriting it")
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, *, replace: bool = False) -> Iterator[Path]:
    """Yield a new temporary sibling folder (``.NAME.incomplete-PID``) that becomes ``out`` on a clean
    exit. On an exception the temporary folder is deleted and ``out`` is untouched.

    ``replace=False`` refuses an existing ``out`` up front and again at the end (it may have appeared
    meanwhile), with FileExistsError naming it.
    """
    out = Path(out)
    if out.exists() and not replace:
        raise FileExistsError(f"{out} already exists; not overwriting it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.incomplete-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        publish_dir(tmp, out, replace=replace)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
