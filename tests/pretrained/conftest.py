"""Fixtures for release tests: a temporary Hugging Face hub cache (offline) and test releases.

``hub`` redirects huggingface_hub to an empty cache under tmp_path with HF_HUB_OFFLINE on, and writes
repos in the hub cache layout (``models--org--name/refs/main`` + ``snapshots/<sha>/<files>``), which is what
``hf_hub_download`` reads offline. ``test_release`` registers a release through the same code path as the
shipped YAML (``register_release``) and removes it afterwards.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Union

import pytest
import torch

from sae_lens_multimodal.pretrained import register_release, unregister_release

FileContent = Union[bytes, str, Callable[[Path], None]]


class HubCache:
    """Write repos into a temporary hub cache."""

    def __init__(self, root: Path):
        self.root = root

    def repo_dir(self, repo_id: str) -> Path:
        return self.root / ("models--" + repo_id.replace("/", "--"))

    def write_repo(self, repo_id: str, files: dict[str, FileContent]) -> Path:
        """Create (or extend) ``repo_id`` at one snapshot; returns the snapshot folder."""
        repo = self.repo_dir(repo_id)
        sha = hashlib.sha1(repo_id.encode()).hexdigest()  # any 40-hex commit id
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(sha)
        snapshot = repo / "snapshots" / sha
        for rel, content in files.items():
            path = snapshot / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            if callable(content):
                content(path)
            elif isinstance(content, str):
                path.write_text(content, encoding="utf-8")
            else:
                path.write_bytes(content)
        return snapshot


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> HubCache:
    from huggingface_hub import constants

    cache = tmp_path / "hf_cache"
    cache.mkdir()
    # huggingface_hub reads these env variables at import: patch its constants, which it reads per call.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return HubCache(cache)


@pytest.fixture
def test_release() -> Iterator[Callable[[str, dict[str, Any]], Any]]:
    names: list[str] = []

    def register(name: str, spec: dict[str, Any]) -> Any:
        names.append(name)
        return register_release(name, spec, replace_existing=True)

    yield register
    for name in names:
        unregister_release(name)


def torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()
