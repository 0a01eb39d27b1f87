"""sdxl-unbox / SDLens SAEs: fixtures in the documented layout, loaded by name offline, checked against its math.

Format (release-formats.md §3): folder ``{block}_k{k}_hidden{n}_auxk{a}_bs{bs}_lr{lr}/final/`` (or the repo root
for the FLUX SAE) with ``config.json`` (``n_dirs_local``, ``d_model``, ``k``, ``auxk``, ``dead_steps_threshold``),
``state_dict.pth`` = ``torch.save({"state_dict": {pre_bias, latent_bias, stats_last_nonzero (int64),
encoder.weight (d_sae,d_in), decoder.weight (d_in,d_sae) stored non-contiguous}})``, ``mean.pt``/``std.pt``
(d_sae,). Math: ``z = encoder(x − pre_bias) + latent_bias``; top-k, ReLU on the kept;
``x̂ = z·decoder.weightᵀ + pre_bias``.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from sae_lens import SAE

from sae_lens_multimodal.pretrained import ReleaseFormatError, load_latent_stats
from sae_lens_multimodal.pretrained.sdxl_unbox import hook_from_folder
from tests.pretrained.conftest import torch_bytes


def unbox_files(d_in: int, d_sae: int, k: int, seed: int = 0, with_std: bool = True
                ) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    decoder = torch.randn(d_sae, d_in, generator=g)
    decoder = (decoder / decoder.norm(dim=1, keepdim=True)).T  # (d_in, d_sae), non-contiguous, unit columns
    assert not decoder.is_contiguous() and decoder.T.is_contiguous()
    sd = OrderedDict(
        pre_bias=0.5 * torch.randn(d_in, generator=g),
        latent_bias=0.1 * torch.randn(d_sae, generator=g),
        stats_last_nonzero=torch.randint(0, 100, (d_sae,), generator=g, dtype=torch.int64),
        **{"encoder.weight": torch.randn(d_sae, d_in, generator=g) / d_in**0.5, "decoder.weight": decoder},
    )
    config = {"n_dirs_local": d_sae, "d_model": d_in, "k": k, "auxk": 16, "dead_steps_threshold": 2441}
    stats = {"mean": 20 + 5 * torch.rand(d_sae, generator=g), "std": 3 + torch.rand(d_sae, generator=g)}
    files: dict[str, Any] = {
        "config.json": json.dumps(config),
        "state_dict.pth": torch_bytes({"state_dict": sd}),
        "mean.pt": torch_bytes(stats["mean"]),
    }
    if with_std:
        files["std.pt"] = torch_bytes(stats["std"])
    return files, sd, stats


def unbox_reference(x: torch.Tensor, sd: dict[str, torch.Tensor], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """sdxl-unbox's encode/decode, written from the format description (encoder/decoder are bias-free Linear)."""
    z = F.linear(x - sd["pre_bias"], sd["encoder.weight"]) + sd["latent_bias"]
    vals, idx = z.topk(k, dim=-1)
    z = torch.zeros_like(z).scatter(-1, idx, torch.relu(vals))
    return z, F.linear(z, sd["decoder.weight"]) + sd["pre_bias"]


def unbox_spec(repo: str, sae_id: str, path: str, model_class_name: str = "HookedUNet") -> dict[str, Any]:
    return {"format": "sdxl_unbox", "repo_id": repo, "model": "stabilityai/sdxl-turbo", "model_class_name": model_class_name,
            "defaults": {"token_policy": "all", "input_kind": "residual_update", "cfg_branch": "cond",
                         "guidance_scale": 0.0, "architecture": "topk"},
            "saes": [{"id": sae_id, "path": path}]}


FOLDER = "unet.down_blocks.2.attentions.1_k6_hidden96_auxk16_bs4096_lr0.0001/final"


def test_sdxl_unbox_folder_loads_by_name(hub, test_release):
    d_in, d_sae, k = 24, 96, 6
    files, sd, stats = unbox_files(d_in, d_sae, k)
    hub.write_repo("sdxl-test/sdxl-saes", {f"{FOLDER}/{name}": data for name, data in files.items()})
    test_release("test-unbox", unbox_spec("sdxl-test/sdxl-saes", "down_blocks.2.attentions.1.hook_update", FOLDER))
    sae = SAE.from_pretrained("test-unbox", "down_blocks.2.attentions.1.hook_update")
    assert sae.cfg.architecture() == "topk" and sae.cfg.k == k and sae.cfg.apply_b_dec_to_input
    assert sae.cfg.normalize_activations == "none"
    meta = sae.cfg.metadata
    assert meta.hook_name == "down_blocks.2.attentions.1.hook_update" and meta.input_kind == "residual_update"
    assert meta.cfg_branch == "cond" and meta.guidance_scale == 0.0 and meta.model_class_name == "HookedUNet"
    assert set(meta.latent_stats["files"]) == {"mean", "std"}
    assert "stats_last_nonzero" not in dict(sae.named_parameters())
    x = torch.randn(2, 4, 4, d_in)  # channel-last feature map tokens (b, h, w, c)
    z_ref, x_hat_ref = unbox_reference(x, sd, k)
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), z_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sae(x), x_hat_ref, atol=1e-5, rtol=1e-5)
    loaded = load_latent_stats(sae)  # the fixture's own statistics come back
    torch.testing.assert_close(loaded["mean"], stats["mean"])
    torch.testing.assert_close(loaded["std"], stats["std"])


def test_flux_root_layout_without_std(hub, test_release):
    """antoniomari/SAE_flux_18-style: files at the repo root, mean.pt only."""
    d_in, d_sae, k = 32, 128, 4
    files, sd, _ = unbox_files(d_in, d_sae, k, seed=3, with_std=False)
    hub.write_repo("flux-test/SAE_flux_18", files)
    spec = unbox_spec("flux-test/SAE_flux_18", "transformer_blocks.18.hook_update", "", model_class_name="HookedDiT")
    spec["model"] = "black-forest-labs/FLUX.1-schnell"
    test_release("test-unbox-flux", spec)
    sae = SAE.from_pretrained("test-unbox-flux", "transformer_blocks.18.hook_update")
    assert sae.cfg.metadata.model_class_name == "HookedDiT"
    assert set(sae.cfg.metadata.latent_stats["files"]) == {"mean"}
    x = torch.randn(3, 10, d_in)
    with torch.no_grad():
        torch.testing.assert_close(sae(x), unbox_reference(x, sd, k)[1], atol=1e-5, rtol=1e-5)


def test_hook_from_folder_name():
    assert hook_from_folder(FOLDER) == "down_blocks.2.attentions.1.hook_update"
    assert hook_from_folder("unet.mid_block.attentions.0_k10_hidden5120_auxk256_bs4096_lr0.0001/final") == (
        "mid_block.attentions.0.hook_update")
    assert hook_from_folder("transformer.transformer_blocks.18_k20_hidden12288") == "transformer_blocks.18.hook_update"
    assert hook_from_folder("something_else") is None


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda sd, cfg: sd.pop("pre_bias"), r"missing \['pre_bias'\]"),
        (lambda sd, cfg: sd.__setitem__("decoder.weight", sd["decoder.weight"].T.contiguous()), "decoder.weight"),
        (lambda sd, cfg: cfg.__setitem__("k", 0), "k=0"),
        (lambda sd, cfg: sd.__setitem__("extra_tensor", torch.zeros(3)), "extra_tensor"),
    ],
)
def test_bad_files_are_refused(hub, test_release, mutate, message):
    files, sd, _ = unbox_files(8, 32, 4)
    cfg = json.loads(files["config.json"])
    mutate(sd, cfg)
    files["config.json"] = json.dumps(cfg)
    files["state_dict.pth"] = torch_bytes({"state_dict": sd})
    hub.write_repo("sdxl-test/bad", files)
    test_release("test-unbox-bad", unbox_spec("sdxl-test/bad", "mid_block.attentions.0.hook_update", ""))
    with pytest.raises(ReleaseFormatError, match=message):
        SAE.from_pretrained("test-unbox-bad", "mid_block.attentions.0.hook_update")
