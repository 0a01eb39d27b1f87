"""core/atomic.py: a writer that fails leaves nothing behind and the previous file or folder intact."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from sae_lens_multimodal.core import atomic
from sae_lens_multimodal.core.atomic import (
    atomic_directory,
    atomic_save,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
)


class Boom(RuntimeError):
    pass


def test_file_writers_write_and_replace(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "a.bin"  # the parent folder is created
    atomic_write_bytes(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    atomic_write_text(target, "héllo")
    assert target.read_text(encoding="utf-8") == "héllo"
    atomic_write_json(target, {"b": 1, "a": [1, 2]}, sort_keys=True)
    assert target.read_text(encoding="utf-8") == '{"a": [1, 2], "b": 1}\n'
    assert json.loads(target.read_text(encoding="utf-8")) == {"a": [1, 2], "b": 1}
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.bin"]


def test_file_gets_ordinary_permissions(tmp_path: Path) -> None:
    umask = os.umask(0o022)
    try:
        path = atomic_write_text(tmp_path / "x.txt", "x")
    finally:
        os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # mkstemp alone would give 0600


def test_atomic_save_passes_temp_path_with_suffix_and_returns_result(tmp_path: Path) -> None:
    seen = []

    def writer(tmp: Path) -> int:
        seen.append(tmp)
        tmp.write_text("data", encoding="utf-8")
        return 7

    assert atomic_save(tmp_path / "fig.png", writer, suffix=".png", fsync=True) == 7
    assert seen[0].parent == tmp_path and seen[0].suffix == ".png" and seen[0].name.startswith(".fig.png.")
    assert (tmp_path / "fig.png").read_text(encoding="utf-8") == "data"
    assert not seen[0].exists()


def test_failing_file_writer_leaves_old_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "a.json"
    target.write_text("old", encoding="utf-8")

    def writer(tmp: Path) -> None:
        tmp.write_text("half", encoding="utf-8")
        raise Boom

    with pytest.raises(Boom):
        atomic_save(target, writer)
    assert target.read_text(encoding="utf-8") == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_failing_file_writer_on_new_path_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        atomic_write_json(tmp_path / "new.json", {"x": object()})  # not JSON-serialisable
    assert list(tmp_path.iterdir()) == []


def test_directory_written_and_replaced(tmp_path: Path) -> None:
    out = tmp_path / "report"
    with atomic_directory(out) as tmp:
        assert tmp.parent == out.parent and tmp.name.startswith(".report.") and not out.exists()
        (tmp / "index.html").write_text("v1", encoding="utf-8")
    assert (out / "index.html").read_text(encoding="utf-8") == "v1"
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    with atomic_directory(out) as tmp:
        (tmp / "other.html").write_text("v2", encoding="utf-8")
    assert sorted(p.name for p in out.iterdir()) == ["other.html"]  # replaced, not merged
    assert [p.name for p in tmp_path.iterdir()] == ["report"]  # no temporary or old folder left


def test_failing_directory_writer_leaves_old_folder(tmp_path: Path) -> None:
    out = tmp_path / "sae"
    out.mkdir()
    (out / "cfg.json").write_text("old", encoding="utf-8")
    with pytest.raises(Boom):
        with atomic_directory(out) as tmp:
            (tmp / "cfg.json").write_text("half", encoding="utf-8")
            raise Boom
    assert [p.name for p in tmp_path.iterdir()] == ["sae"]
    assert [p.name for p in out.iterdir()] == ["cfg.json"]
    assert (out / "cfg.json").read_text(encoding="utf-8") == "old"


def test_failing_directory_writer_on_new_path_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(Boom):
        with atomic_directory(tmp_path / "new") as tmp:
            (tmp / "f").write_text("x", encoding="utf-8")
            raise Boom
    assert list(tmp_path.iterdir()) == []


def test_failed_swap_restores_old_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "site"
    out.mkdir()
    (out / "index.html").write_text("old", encoding="utf-8")
    real_replace = os.replace

    def replace(src: os.PathLike, dst: os.PathLike) -> None:
        if Path(src).name.startswith(".site.new-"):  # the new folder cannot be moved into place
            raise OSError("simulated rename failure")
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(OSError, match="simulated"):
        with atomic_directory(out) as tmp:
            (tmp / "index.html").write_text("new", encoding="utf-8")
    assert [p.name for p in tmp_path.iterdir()] == ["site"]
    assert (out / "index.html").read_text(encoding="utf-8") == "old"
