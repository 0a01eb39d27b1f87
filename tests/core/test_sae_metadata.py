"""core/sae_metadata.py: one vocabulary for SAE metadata, used by saes/, pretrained/ and training/."""

from __future__ import annotations

import pytest
import torch

from sae_lens_multimodal.core import denoising
from sae_lens_multimodal.core.sae_metadata import (
    CFG_BRANCHES,
    INPUT_KINDS,
    MODEL_KINDS,
    TOKEN_POLICIES,
    check_input_kind_matches_hook,
    input_kind_of_hook,
    normalize_cfg_branch,
    normalize_input_kind,
    normalize_model_kind,
    normalize_sae_metadata,
    normalize_token_policy,
)
from sae_lens_multimodal.pretrained import ReleaseFormatError
from sae_lens_multimodal.pretrained.prisma import convert_prisma
from sae_lens_multimodal.pretrained.releases import parse_release


def test_one_vocabulary_shared_by_every_user() -> None:
    from sae_lens_multimodal.training import image_store

    assert set(INPUT_KINDS) == {"block_output", "block_input", "residual_update", "attention_output", "mlp_output",
                                "block_middle", "mlp_pre_activation", "mlp_activation", "attention_heads"}
    assert TOKEN_POLICIES == ("all", "cls", "patches")
    assert MODEL_KINDS == ("vision", "clip", "vlm", "diffusion")
    assert CFG_BRANCHES is denoising.CFG_BRANCHES
    assert image_store.TOKEN_POLICIES is TOKEN_POLICIES


@pytest.mark.parametrize(("hook", "kind"), [
    ("blocks.3.hook_resid_post", "block_output"),
    ("vision.blocks.0.hook_resid_pre", "block_input"),
    ("blocks.1.hook_attn_out", "attention_output"),
    ("blocks.1.hook_mlp_out", "mlp_output"),
    ("up.1.1.hook_out", "block_output"),
    ("down_blocks.2.attentions.1.hook_update", "residual_update"),
    ("blocks.1.attn.hook_z", "attention_heads"),
    ("blocks.1.mlp.hook_post", "mlp_activation"),
    ("blocks.1.mlp.hook_pre", "mlp_pre_activation"),
    ("blocks.1.hook_resid_mid", "block_middle"),
    ("blocks.1.attn.hook_q", None),
    ("blocks.1.ln1.hook_scale", None),
    (None, None),
])
def test_input_kind_of_hook(hook, kind) -> None:
    assert input_kind_of_hook(hook) == kind


def test_normalizers_map_spellings_and_refuse_the_rest() -> None:
    assert normalize_input_kind("mlp_output") == "mlp_output"
    assert normalize_input_kind("hook_resid_post") == "block_output"
    assert normalize_input_kind("resid_post") == "block_output"
    assert normalize_input_kind(None, allow_none=True) is None
    with pytest.raises(ValueError, match=r"my release: input_kind 'other' is not one of .*block_output"):
        normalize_input_kind("other", source="my release")
    with pytest.raises(ValueError, match="input_kind None"):
        normalize_input_kind(None)
    assert normalize_token_policy("cls") == "cls"
    with pytest.raises(ValueError, match="token_policy 'CLS'"):
        normalize_token_policy("CLS")
    assert normalize_cfg_branch(None) is None and normalize_cfg_branch("uncond") == "uncond"
    with pytest.raises(ValueError, match="cfg_branch 'conditional'"):
        normalize_cfg_branch("conditional")
    assert normalize_model_kind("vit") == "vision" and normalize_model_kind("clip") == "clip"
    with pytest.raises(ValueError, match="not a model kind"):
        normalize_model_kind("unet")


def test_input_kind_must_match_its_hook() -> None:
    check_input_kind_matches_hook("residual_update", "up.0.hook_update")
    check_input_kind_matches_hook("block_output", "blocks.1.attn.hook_q")  # hook without a known kind: no check
    with pytest.raises(ValueError, match="contradicts hook 'up.0.hook_update', which carries a residual_update"):
        check_input_kind_matches_hook("block_output", "up.0.hook_update")
    md = {"hook_name": "blocks.2.hook_mlp_out", "input_kind": "hook_mlp_out", "token_policy": "all", "cfg_branch": None}
    assert normalize_sae_metadata(md) is md and md["input_kind"] == "mlp_output"
    with pytest.raises(ValueError, match="contradicts hook"):
        normalize_sae_metadata({"hook_name": "blocks.2.hook_mlp_out", "input_kind": "block_output"})


def _prisma_config(subtype: str) -> dict:
    return {"d_in": 4, "expansion_factor": 2, "hook_point_layer": 1, "layer_subtype": subtype,
            "architecture": "standard", "activation_fn_str": "relu"}


def _prisma_state() -> dict:
    return {"W_enc": torch.zeros(4, 8), "b_enc": torch.zeros(8), "W_dec": torch.zeros(8, 4), "b_dec": torch.zeros(4)}


def test_prisma_hooks_map_into_the_schema() -> None:
    _, _, facts = convert_prisma(_prisma_config("hook_attn_out"), _prisma_state())
    assert facts["input_kind"] == "attention_output"
    _, _, facts = convert_prisma(_prisma_config("hook_resid_pre"), _prisma_state())
    assert facts["input_kind"] == "block_input"


def test_prisma_value_no_one_accepted_is_mapped_or_refused_clearly() -> None:
    # Before the schema, a Prisma SAE at an MLP-hidden hook got input_kind "other", which neither
    # saes/ nor the release table accepted. MLP-hidden, mid-residual and per-head SAEs now map into the
    # schema (they loaded before, so they still load); a hook the schema has no kind for is refused,
    # naming the hook and the kinds.
    _, _, facts = convert_prisma(_prisma_config("mlp.hook_post"), _prisma_state(), what="test SAE")
    assert facts["input_kind"] == "mlp_activation"
    with pytest.raises(ReleaseFormatError, match=r"hook 'blocks\.1\.attn\.hook_q'.*no input kind.*block_output"):
        convert_prisma(_prisma_config("attn.hook_q"), _prisma_state(), what="test SAE")


def test_release_table_uses_the_schema() -> None:
    spec = {"format": "prisma", "repo_id": "org/repo", "model": "m", "model_class_name": "HookedViT",
            "saes": [{"id": "blocks.1.hook_resid_post", "path": "w.pt", "token_policy": "all",
                      "input_kind": "resid_post", "cfg_branch": None}]}
    release = parse_release("r", spec)
    assert release.saes["blocks.1.hook_resid_post"].input_kind == "block_output"
    bad = {**spec, "saes": [{**spec["saes"][0], "input_kind": "other"}]}
    with pytest.raises(ValueError, match=r"Release 'r', SAE 'blocks.1.hook_resid_post': input_kind 'other'"):
        parse_release("r", bad)
    bad_branch = {**spec, "saes": [{**spec["saes"][0], "cfg_branch": "positive"}]}
    with pytest.raises(ValueError, match="cfg_branch 'positive'"):
        parse_release("r", bad_branch)


def test_timestep_saes_use_the_schema() -> None:
    from sae_lens_multimodal.saes import TimestepBucketedSAEConfig

    kw = dict(d_in=4, d_sae=8, timestep_ranges=[[0, 1000]], num_train_timesteps=1000)
    cfg = TimestepBucketedSAEConfig(**kw, metadata={"hook_name": "blocks.0.hook_mlp_out", "input_kind": "mlp_output"})
    assert cfg.metadata.input_kind == "mlp_output"  # accepted now that there is one vocabulary
    with pytest.raises(ValueError, match="input_kind 'other'"):
        TimestepBucketedSAEConfig(**kw, metadata={"input_kind": "other"})
    with pytest.raises(ValueError, match="cfg_branch 'sideways'"):
        TimestepBucketedSAEConfig(**kw, metadata={"cfg_branch": "sideways"})
