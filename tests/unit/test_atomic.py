"""megatron_t1.atomic: a file or folder appears complete under its final name, or not at all."""

from __future__ import annotations

import os
import stat

import pytest

from megatron_t1.atomic import atomic_dir, atomic_file, atomic_path, publish_dir, write_text_atomic


class Boom(Exception):
    pass


def _entries(d):
    return sorted(p.name for p in d.iterdir())


def test_file_replaces_only_on_success_and_leaves_no_temporary(tmp_path):
    p = tmp_path / "sub" / "out.json"
    write_text_atomic(p, "old")
    assert p.read_text() == "old"
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o644
    with pytest.raises(Boom):
        with atomic_file(p) as f:
            f.write("half of the new")
            raise Boom
    assert p.read_text() == "old"
    assert _entries(p.parent) == ["out.json"]
    with atomic_file(p, "wb") as f:
        f.write(b"new")
        assert p.read_text() == "old"  # not visible before the block ends
    assert p.read_bytes() == b"new" and _entries(p.parent) == ["out.json"]


def test_bad_mode_is_refused(tmp_path):
    with pytest.raises(ValueError, match="mode must be"):
        with atomic_file(tmp_path / "x", "a"):
            pass


def test_path_form_keeps_the_suffix_for_writers_that_read_it(tmp_path):
    p = tmp_path / "plot.png"
    with atomic_path(p) as tmp:
        assert tmp.suffix == ".png" and tmp.parent == tmp_path and tmp.name.startswith(".")
        tmp.write_bytes(b"png")
    assert p.read_bytes() == b"png" and _entries(tmp_path) == ["plot.png"]
    with pytest.raises(Boom):
        with atomic_path(p) as tmp:
            tmp.write_bytes(b"partial")
            raise Boom
    assert p.read_bytes() == b"png" and _entries(tmp_path) == ["plot.png"]


def test_dir_refuses_an_existing_folder_unless_replace(tmp_path):
    out = tmp_path / "hf"
    with atomic_dir(out) as d:
        (d / "a").write_text("1")
        assert not out.exists()
    assert (out / "a").read_text() == "1"
    with pytest.raises(FileExistsError, match=str(out)):
        with atomic_dir(out):
            pass
    with pytest.raises(Boom):
        with atomic_dir(out, replace=True) as d:
            (d / "b").write_text("2")
            raise Boom
    assert _entries(out) == ["a"] and _entries(tmp_path) == ["hf"]
    with atomic_dir(out, replace=True) as d:
        (d / "b").write_text("2")
    assert _entries(out) == ["b"] and _entries(tmp_path) == ["hf"]


def test_publish_dir_moves_the_old_folder_aside(tmp_path):
    out, tmp = tmp_path / "step_1", tmp_path / "step_1.tmp"
    out.mkdir()
    (out / "old").write_text("")
    tmp.mkdir()
    (tmp / "new").write_text("")
    with pytest.raises(FileExistsError):
        publish_dir(tmp, out, replace=False)
    assert tmp.exists()
    publish_dir(tmp, out)
    assert _entries(out) == ["new"] and _entries(tmp_path) == ["step_1"]


def test_every_writer_goes_through_this_module():
    """No hand-written temp-then-rename elsewhere: ``os.replace`` / ``os.rename`` / ``.rename(`` appear
    only in megatron_t1/atomic.py (the package and tools/)."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    pattern = re.compile(r"\bos\.(replace|rename)\(|\.rename\(")
    files = sorted([*(root / "megatron_t1").rglob("*.py"), *(root / "tools").glob("*.py")])
    assert len(files) > 50
    found = [
        f"{p.relative_to(root)}:{i}: {line.strip()}"
        for p in files
        if p.name != "atomic.py" or p.parent.name != "megatron_t1"
        for i, line in enumerate(p.read_text().splitlines(), start=1)
        if pattern.search(line)
    ]
    assert not found, "rename outside megatron_t1/atomic.py:\n" + "\n".join(found)
