"""Pickled release files never run code; offline loads never touch the network and say what is missing."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
from sae_lens import SAE

from sae_lens_multimodal.pretrained import MissingReleaseFileError, UnsafePickleError
from tests.pretrained.conftest import torch_bytes
from tests.pretrained.test_prisma import prisma_config, prisma_state
from tests.pretrained.test_saev import saev_file, saev_state
from tests.pretrained.test_sdxl_unbox import unbox_files


class MakesDirectoryWhenUnpickled:
    """A pickle payload whose __reduce__ would call os.mkdir(marker) at load time."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _prisma_spec(repo: str) -> dict:
    return {"format": "prisma", "repo_id": repo, "model": "open-clip:ViT-B-32/openai", "model_class_name": "HookedViT",
            "defaults": {"token_policy": "all", "input_kind": "block_output"},
            "saes": [{"id": "blocks.1.hook_resid_post", "path": "weights.pt"}]}


def _malicious_fixtures(marker: Path) -> dict[str, tuple[str, dict, dict]]:
    evil = MakesDirectoryWhenUnpickled(marker)
    unbox, _, _ = unbox_files(8, 16, 2)
    unbox["state_dict.pth"] = torch_bytes({"state_dict": {"pre_bias": evil}})
    return {
        "prisma": ("test-evil-prisma", {
            "config.json": json.dumps(prisma_config(1, "hook_resid_post", 8, 2)),
            "weights.pt": torch_bytes({"cfg": evil, "state_dict": prisma_state(8, 16)}),
        }, _prisma_spec("evil-test/prisma")),
        "saev": ("test-evil-saev", {"sae.pt": saev_file({"d_vit": 8, "exp_factor": 2}, {**saev_state(8, 16), "W_enc": evil})},
                 {"format": "saev", "repo_id": "evil-test/saev", "model": "open-clip:ViT-B-16/openai",
                  "model_class_name": "HookedViT", "defaults": {"token_policy": "patches", "input_kind": "block_output"},
                  "saes": [{"id": "blocks.1.hook_resid_post", "path": "sae.pt"}]}),
        "sdxl_unbox": ("test-evil-unbox", unbox,
                       {"format": "sdxl_unbox", "repo_id": "evil-test/sdxl_unbox", "model": "stabilityai/sdxl-turbo",
                        "model_class_name": "HookedUNet",
                        "defaults": {"token_policy": "all", "input_kind": "residual_update"},
                        "saes": [{"id": "blocks.1.hook_resid_post", "path": ""}]}),
    }


@pytest.mark.parametrize("fmt", ["prisma", "saev", "sdxl_unbox"])
def test_malicious_pickle_is_refused_and_runs_nothing(hub, test_release, tmp_path, no_network, fmt):
    marker = tmp_path / "pwned"
    release, files, spec = _malicious_fixtures(marker)[fmt]
    hub.write_repo(f"evil-test/{fmt}", files)
    test_release(release, spec)
    with pytest.raises(UnsafePickleError) as err:
        SAE.from_pretrained(release, "blocks.1.hook_resid_post")
    message = str(err.value)
    assert "Nothing from the file was executed" in message and "mkdir" in message
    assert not marker.exists()
    # The fixture really is malicious: an unrestricted unpickler would have created the marker.
    payload = files["weights.pt" if fmt == "prisma" else "state_dict.pth" if fmt == "sdxl_unbox" else "sae.pt"]
    if fmt == "saev":
        payload = payload[payload.index(b"\n") + 1:]
    import io

    torch.load(io.BytesIO(payload), weights_only=False)
    assert marker.is_dir()


def test_offline_uncached_shipped_release_names_repo_file_and_fix(hub, no_network):
    """A shipped release, empty cache, HF_HUB_OFFLINE=1: no download attempt, a clear message."""
    with pytest.raises(MissingReleaseFileError) as err:
        SAE.from_pretrained("prisma-clip-vit-b-32-vanilla-x64", "blocks.11.hook_resid_post")
    message = str(err.value)
    repo = "Prisma-Multimodal/sparse-autoencoder-clip-b-32-sae-vanilla-x64-layer-11-hook_resid_post-l1-1e-05"
    assert repo in message and "n_images_2600058.pt" in message
    assert f"huggingface-cli download {repo} n_images_2600058.pt" in message
    assert "HF_HUB_OFFLINE" in message


@pytest.mark.parametrize(
    "release, sae_id, missing",
    [
        ("saev-clip-vit-b-16-in1k", "blocks.10.hook_resid_post", "sae.pt"),
        ("sdxl-unbox-sdxl-turbo", "mid_block.attentions.0.hook_update",
         "unet.mid_block.attentions.0_k10_hidden5120_auxk256_bs4096_lr0.0001/final/config.json"),
        ("saeuron-sd15-unlearncanvas", "up_blocks.1.attentions.2.hook_out", "unet.up_blocks.1.attentions.2/cfg.json"),
        ("saev-dinov3-vit-b-16-in1k", "blocks.9.hook_resid_post/abcd1234", "manifest.jsonl"),
    ],
)
def test_offline_uncached_every_format(hub, no_network, release, sae_id, missing):
    with pytest.raises(MissingReleaseFileError, match="HF_HUB_OFFLINE") as err:
        SAE.from_pretrained(release, sae_id)
    assert missing in str(err.value)


def test_partially_cached_sae_names_the_missing_file(hub, test_release, no_network):
    hub.write_repo("partial-test/prisma", {"config.json": json.dumps(prisma_config(1, "hook_resid_post", 8, 2))})
    test_release("test-partial", _prisma_spec("partial-test/prisma"))
    with pytest.raises(MissingReleaseFileError, match=r"'weights\.pt' of Hugging Face repo 'partial-test/prisma'"):
        SAE.from_pretrained("test-partial", "blocks.1.hook_resid_post")


def test_force_download_offline_is_a_clear_error(hub, test_release):
    hub.write_repo("partial-test/prisma2", {"config.json": json.dumps(prisma_config(1, "hook_resid_post", 8, 2)),
                                            "weights.pt": torch_bytes(prisma_state(8, 16))})
    test_release("test-force", _prisma_spec("partial-test/prisma2"))
    assert SAE.from_pretrained("test-force", "blocks.1.hook_resid_post") is not None  # cached: loads
    with pytest.raises(ValueError, match="force_download=True .*HF_HUB_OFFLINE"):
        SAE.from_pretrained("test-force", "blocks.1.hook_resid_post", force_download=True)
