"""sparsify-format (SAeUron) SAEs: fixtures in the documented layout, loaded by name offline, checked against its math.

Format (release-formats.md §4): one folder per hookpoint (``unet.up_blocks.1.attentions.1``, optionally under a
prefix such as ``coco/``) with ``cfg.json`` + ``sae.safetensors`` (``encoder.weight (d_sae,d_in)``,
``encoder.bias``, ``W_dec (d_sae,d_in)``, ``b_dec``, ``W_skip`` with a skip connection); optional parent
``config.json``. Math: ``pre = ReLU(encoder(x − b_dec))`` (no subtraction when ``transcode``); top-k per token;
``x̂ = acts·W_dec + b_dec``; ``input_unit_norm``: ``(x − mean)/(std_unbiased + 1e-5)`` per token, inverted on
output. ``num_latents: 0`` means ``d_in·expansion_factor``.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save

from sae_lens import SAE
from sae_lens_multimodal.pretrained import ReleaseFormatError
from sae_lens_multimodal.pretrained.sparsify import hook_from_folder


def sparsify_state(d_in: int, d_sae: int, seed: int = 0, skip: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(d_sae, d_in, generator=g)
    state = {
        "encoder.weight": torch.randn(d_sae, d_in, generator=g) / d_in**0.5,
        "encoder.bias": 0.1 * torch.randn(d_sae, generator=g),
        "W_dec": W_dec / W_dec.norm(dim=1, keepdim=True),
        "b_dec": 0.3 * torch.randn(d_in, generator=g),
    }
    if skip:
        state["W_skip"] = torch.randn(d_in, d_in, generator=g)
    return state


def saeuron_cfg(d_in: int, k: int, *, unit_norm: bool, expansion: int = 4, num_latents: int = 0, **over: Any) -> dict[str, Any]:
    cfg = {"expansion_factor": expansion, "normalize_decoder": True, "num_latents": num_latents, "k": k,
           "batch_topk": True, "sample_topk": False, "input_unit_norm": unit_norm, "multi_topk": False, "d_in": d_in}
    cfg.update(over)
    return cfg


def sparsify_reference(x: torch.Tensor, sd: dict[str, torch.Tensor], k: int, *, unit_norm: bool,
                       transcode: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """sparsify / SAeUron inference (per-token TopK), written from the format description."""
    if unit_norm:
        mu = x.mean(-1, keepdim=True)
        std = x.std(-1, keepdim=True)
        x = (x - mu) / (std + 1e-5)
    pre = F.relu(F.linear(x if transcode else x - sd["b_dec"], sd["encoder.weight"], sd["encoder.bias"]))
    vals, idx = pre.topk(k, dim=-1)
    acts = torch.zeros_like(pre).scatter(-1, idx, vals)
    out = acts @ sd["W_dec"] + sd["b_dec"]
    if unit_norm:
        out = out * std + mu
    return acts, out


def spec(repo: str, sae_id: str, path: str) -> dict[str, Any]:
    return {"format": "sparsify", "repo_id": repo, "model": "stable-diffusion-v1-5/stable-diffusion-v1-5",
            "model_class_name": "HookedUNet",
            "defaults": {"token_policy": "all", "input_kind": "block_output", "cfg_branch": "cond",
                         "guidance_scale": 9.0, "architecture": "topk"},
            "saes": [{"id": sae_id, "path": path}]}


@pytest.mark.parametrize("unit_norm", [True, False])
def test_saeuron_folder_loads_by_name(hub, test_release, unit_norm):
    d_in, k, exp = 16, 5, 4
    sd = sparsify_state(d_in, d_in * exp, seed=int(unit_norm))
    folder = "coco/unet.up_blocks.1.attentions.1"
    hub.write_repo("saeuron-test/SAeUron", {
        f"{folder}/cfg.json": json.dumps(saeuron_cfg(d_in, k, unit_norm=unit_norm)),  # num_latents 0 -> d_in * 4
        f"{folder}/sae.safetensors": save(sd),
        "coco/config.json": json.dumps({"model": "unlearn-canvas-sd15", "dataset": "coco", "ctx_len": 256,
                                        "batch_size": 4096, "hookpoints": ["unet.up_blocks.1.attentions.1"]}),
    })
    test_release("test-saeuron", spec("saeuron-test/SAeUron", "up_blocks.1.attentions.1.hook_out", folder))
    sae = SAE.from_pretrained("test-saeuron", "up_blocks.1.attentions.1.hook_out")
    assert sae.cfg.architecture() == "topk" and sae.cfg.k == k and sae.cfg.d_sae == d_in * exp
    assert sae.cfg.apply_b_dec_to_input
    assert sae.cfg.normalize_activations == ("layer_norm" if unit_norm else "none")
    meta = sae.cfg.metadata
    assert meta.hook_name == "up_blocks.1.attentions.1.hook_out" and meta.input_kind == "block_output"
    assert meta.training_config == {"model": "unlearn-canvas-sd15", "dataset": "coco", "ctx_len": 256}
    assert meta.inference_note  # trained with BatchTopK, inference per token
    x = 2 + 3 * torch.randn(2, 4, 4, d_in)
    acts_ref, out_ref = sparsify_reference(x, sd, k, unit_norm=unit_norm)
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), acts_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sae(x), out_ref, atol=1e-4, rtol=1e-5)


def test_sparsify_transcoder_and_explicit_num_latents(hub, test_release):
    d_in, d_sae, k = 12, 40, 3
    sd = sparsify_state(d_in, d_sae, seed=7)
    cfg = {"activation": "topk", "expansion_factor": 32, "normalize_decoder": True, "num_latents": d_sae, "k": k,
           "multi_topk": False, "skip_connection": False, "transcode": True, "d_in": d_in}
    hub.write_repo("sparsify-test/transcoder", {"unet.mid_block.attentions.0/cfg.json": json.dumps(cfg),
                                               "unet.mid_block.attentions.0/sae.safetensors": save(sd)})
    test_release("test-sparsify-tc", spec("sparsify-test/transcoder", "mid_block.attentions.0.hook_out",
                                          "unet.mid_block.attentions.0"))
    sae = SAE.from_pretrained("test-sparsify-tc", "mid_block.attentions.0.hook_out")
    assert sae.cfg.d_sae == d_sae and not sae.cfg.apply_b_dec_to_input and sae.cfg.metadata.transcode
    x = torch.randn(7, d_in)
    with torch.no_grad():
        torch.testing.assert_close(sae(x), sparsify_reference(x, sd, k, unit_norm=False, transcode=True)[1],
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "cfg_over, skip, message",
    [
        ({"skip_connection": True}, True, "skip connection"),
        ({}, True, "skip connection"),  # a W_skip tensor without the flag is refused too
        ({"activation": "groupmax"}, False, "groupmax"),
        ({"expansion_factor": 3}, False, "encoder.weight"),
    ],
)
def test_unsupported_files_are_refused(hub, test_release, cfg_over, skip, message):
    d_in = 8
    hub.write_repo("sparsify-test/bad", {
        "unet.mid_block.attentions.0/cfg.json": json.dumps(saeuron_cfg(d_in, 2, unit_norm=False, **cfg_over)),
        "unet.mid_block.attentions.0/sae.safetensors": save(sparsify_state(d_in, d_in * 4, skip=skip)),
    })
    test_release("test-sparsify-bad", spec("sparsify-test/bad", "mid_block.attentions.0.hook_out",
                                           "unet.mid_block.attentions.0"))
    with pytest.raises(ReleaseFormatError, match=message):
        SAE.from_pretrained("test-sparsify-bad", "mid_block.attentions.0.hook_out")


def test_hook_from_folder_name():
    assert hook_from_folder("unet.up_blocks.1.attentions.2") == "up_blocks.1.attentions.2.hook_out"
    assert hook_from_folder("coco/unet.up_blocks.1.attentions.1") == "up_blocks.1.attentions.1.hook_out"
    assert hook_from_folder("layers.3") is None
