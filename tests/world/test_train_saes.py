"""The bundled-SAE training script on tiny runs: it writes SAELens folders that load, with their figures in
the metadata, the same seed gives the same SAE, and folders are replaced atomically."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from sae_lens import SAE

from sae_lens_multimodal.world.training import train_saes
from sae_lens_multimodal.world.training.train_saes import (
    CLIP_HOOK,
    CLIP_RELEASE,
    DIFFUSION_HOOK,
    DIFFUSION_RELEASE,
    ClipSAERecipe,
    DiffusionSAERecipe,
    write_sae_folder,
)

TINY_CLIP = ClipSAERecipe(n_images=48, d_sae=32, k=4, total_training_samples=4096, batch_size=256,
                          lr_warm_up_steps=2, eval_images=8)
TINY_DIFF = DiffusionSAERecipe(n_prompts=2, num_inference_steps=4, d_sae=16, k=4, total_training_samples=1024,
                               batch_size=128, lr_warm_up_steps=2, eval_prompts=1, batch_prompts=2)


def test_clip_sae_is_written_loads_and_is_reproducible(tmp_path: Path):
    meta = train_saes.train_clip_sae(tmp_path / "a", seed=3, recipe=TINY_CLIP, progress=False)
    folder = tmp_path / "a" / CLIP_RELEASE / CLIP_HOOK
    assert sorted(p.name for p in folder.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    sae = SAE.load_from_disk(folder)
    assert sae.cfg.architecture() == "topk" and (sae.cfg.d_in, sae.cfg.d_sae, sae.cfg.k) == (64, 32, 4)
    md = sae.cfg.metadata
    assert md.hook_name == CLIP_HOOK and md.model_name == "shapes-clip"
    assert md.evaluation == meta["evaluation"] and 0 < md.evaluation["l0"] <= 4
    assert md.training["seed"] == 3 and md.training["rows"] == 48 * 65 and md.training["wall_seconds"] > 0
    assert md.model_fingerprint.startswith("sha256:")

    train_saes.train_clip_sae(tmp_path / "b", seed=3, recipe=TINY_CLIP, progress=False)
    a = load_file(folder / "sae_weights.safetensors")
    b = load_file(tmp_path / "b" / CLIP_RELEASE / CLIP_HOOK / "sae_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_diffusion_sae_is_written_and_loads(tmp_path: Path):
    from sae_lens_multimodal.saes import TimestepBucketedSAE

    meta = train_saes.train_diffusion_sae(tmp_path, seed=0, recipe=TINY_DIFF, progress=False)
    sae = SAE.load_from_disk(tmp_path / DIFFUSION_RELEASE / DIFFUSION_HOOK)
    assert isinstance(sae, TimestepBucketedSAE) and sae.n_buckets == 4
    assert sae.cfg.metadata.cfg_branch == "cond" and sae.cfg.metadata.hook_name == DIFFUSION_HOOK
    assert sae.cfg.bucket_scaling_factors is not None
    # 4 DPM-Solver steps (999, 749, 500, 250): one per bucket, each 2 prompts x 64 tokens
    assert meta["training"]["rows"] == 2 * 4 * 64
    assert [b["n_rows"] for b in meta["evaluation"]["buckets"]] == [64, 64, 64, 64]


def test_quick_run_refuses_to_overwrite_the_shipped_saes(capsys):
    with pytest.raises(SystemExit):
        train_saes.main(["--quick"])
    assert "--out" in capsys.readouterr().err


class _FailingSAE:
    def save_inference_model(self, path):
        (Path(path) / "cfg.json").write_text("{half")
        raise RuntimeError("disk full")


class _GoodSAE:
    def save_inference_model(self, path):
        (Path(path) / "cfg.json").write_text(json.dumps({"architecture": "topk", "metadata": {}}))
        (Path(path) / "sae_weights.safetensors").write_bytes(b"new")


def test_folder_is_replaced_atomically(tmp_path: Path):
    target = tmp_path / "rel" / "sae"
    write_sae_folder(_GoodSAE(), target, {"note": "first"})
    assert json.loads((target / "cfg.json").read_text())["metadata"] == {"note": "first"}
    with pytest.raises(RuntimeError, match="disk full"):
        write_sae_folder(_FailingSAE(), target, {"note": "second"})
    # the old folder is untouched and no temporary folder is left behind
    assert json.loads((target / "cfg.json").read_text())["metadata"] == {"note": "first"}
    assert sorted(p.name for p in (tmp_path / "rel").iterdir()) == ["sae"]
    write_sae_folder(_GoodSAE(), target, {"note": "third"})
    assert json.loads((target / "cfg.json").read_text())["metadata"] == {"note": "third"}
    assert sorted(p.name for p in (tmp_path / "rel").iterdir()) == ["sae"]
