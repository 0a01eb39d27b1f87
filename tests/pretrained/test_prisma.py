"""ViT-Prisma SAEs: fixtures in the documented layout, loaded by name offline, checked against Prisma's math.

Format (release-formats.md §1): ``config.json`` (JSON dump of VisionModelSAERunnerConfig) beside a torch pickle
(``weights.pt`` / ``n_images_<N>.pt``) holding a plain state dict or ``{"cfg": VisionModelSAERunnerConfig,
"state_dict": ...}``; tensors ``W_enc (d_in,d_sae)``, ``b_enc``, ``W_dec (d_sae,d_in)`` (unit rows), ``b_dec``.
Math: ``x' = norm_in(x)``; ``h = (x' − b_dec)·W_enc + b_enc``; ReLU, or top-k of h with ReLU on the kept;
``x̂ = norm_out(f·W_dec + b_dec)``; layer_norm = ``(x − mean)/(std_unbiased + 1e-5)`` per token.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import types
from typing import Any, Optional

import open_clip
import pytest
import torch
from sae_lens import SAE

from sae_lens_multimodal import HookedViT
from sae_lens_multimodal.pretrained import ReleaseFormatError
from tests.pretrained.conftest import torch_bytes

CLIP = "open-clip:laion/CLIP-ViT-B-32-DataComp.XL-s13B-b90K"


def prisma_config(layer: int, subtype: str, d_in: int, expansion: int, *, act: str = "relu", k: Optional[int] = None,
                  norm: Optional[str] = None, cls_only: bool = False, patches_only: bool = False,
                  context_size: int = 50, old_style: bool = True, **over: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "model_class_name": "HookedViT", "model_name": CLIP, "hook_point_layer": layer, "layer_subtype": subtype,
        "hook_point_head_index": None, "context_size": context_size, "cls_token_only": cls_only,
        "use_patches_only": patches_only, "d_in": d_in, "expansion_factor": expansion, "d_sae": d_in * expansion,
        "architecture": "standard", "activation_fn_str": act, "activation_fn_kwargs": {"k": k} if k else {},
        "normalize_activations": norm, "initialization_method": "encoder_transpose_decoder",
        "b_dec_init_method": "geometric_median", "vit_model_cfg": None, "model_path": None, "image_size": 224,
        "use_cached_activations": False, "cached_activations_path": f"/activations/layer_{layer + 3}",
        "l1_coefficient": 1e-05, "lp_norm": 1, "lr": 0.0004, "train_batch_size": 4096, "seed": 42,
        "log_to_wandb": True, "wandb_project": "sweep", "n_checkpoints": 10, "checkpoint_path": "/ckpt",
    }
    if old_style:
        cfg["dtype"] = {"__type__": "torch.dtype", "value": "torch.float32"}
        cfg["device"] = {"__type__": "torch.device", "value": "cuda"}
    else:
        cfg.update(_dtype="torch.float32", _device="cuda", hook_point=f"blocks.{layer}.{subtype}", is_transcoder=False)
    cfg.update(over)
    return cfg


def prisma_state(d_in: int, d_sae: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(d_sae, d_in, generator=g)
    W_dec = W_dec / W_dec.norm(dim=1, keepdim=True)  # unit rows, as Prisma saves
    return {
        "W_dec": W_dec,
        "W_enc": torch.randn(d_in, d_sae, generator=g) / d_in**0.5,
        "b_enc": 0.1 * torch.randn(d_sae, generator=g),
        "b_dec": 0.5 * torch.randn(d_in, generator=g),
    }


def prisma_reference(x: torch.Tensor, sd: dict[str, torch.Tensor], act: str, k: Optional[int] = None,
                     layer_norm: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Prisma's encode/decode, written from the format description."""
    if layer_norm:
        mu = x.mean(-1, keepdim=True)
        std = (x - mu).std(-1, keepdim=True)  # unbiased
        x = (x - mu) / (std + 1e-5)
    h = (x - sd["b_dec"]) @ sd["W_enc"] + sd["b_enc"]
    if act == "relu":
        f = torch.relu(h)
    else:
        vals, idx = h.topk(k, dim=-1)
        f = torch.zeros_like(h).scatter(-1, idx, torch.relu(vals))
    x_hat = f @ sd["W_dec"] + sd["b_dec"]
    if layer_norm:
        x_hat = x_hat * std + mu
    return f, x_hat


@pytest.fixture
def fake_vit_prisma(monkeypatch: pytest.MonkeyPatch) -> type:
    """A stand-in ``vit_prisma.sae.config.VisionModelSAERunnerConfig`` so the test can *write* the pickle
    ViT-Prisma writes; it is removed from sys.modules before anything is loaded."""

    @dataclasses.dataclass
    class VisionModelSAERunnerConfig:
        d_in: int = 768
        expansion_factor: int = 64
        hook_point_layer: int = 0
        layer_subtype: str = "hook_resid_post"
        activation_fn_str: str = "relu"
        normalize_activations: Optional[str] = None
        device: Any = None
        dtype: Any = None
        model_name: str = CLIP

    VisionModelSAERunnerConfig.__module__ = "vit_prisma.sae.config"
    VisionModelSAERunnerConfig.__qualname__ = "VisionModelSAERunnerConfig"
    for name in ("vit_prisma", "vit_prisma.sae", "vit_prisma.sae.config"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    sys.modules["vit_prisma.sae.config"].VisionModelSAERunnerConfig = VisionModelSAERunnerConfig  # type: ignore[attr-defined]
    return VisionModelSAERunnerConfig


def _drop_fake_modules() -> None:
    for name in ("vit_prisma.sae.config", "vit_prisma.sae", "vit_prisma"):
        sys.modules.pop(name, None)


def _spec(repo_id: str, sae_id: str, path: str, **defaults: Any) -> dict[str, Any]:
    return {"format": "prisma", "repo_id": repo_id, "model": CLIP, "model_class_name": "HookedViT",
            "defaults": {"token_policy": "all", "input_kind": "block_output", **defaults},
            "saes": [{"id": sae_id, "path": path}]}


# ----------------------------------------------------------------------------------------- tests
def test_topk_cls_only_plain_state_dict(hub, test_release):
    """sae-top_k-*-style repo: plain OrderedDict weights.pt + config.json (old dtype/device dict form)."""
    from collections import OrderedDict

    d_in, exp, k = 16, 4, 5
    sd = prisma_state(d_in, d_in * exp)
    cfg = prisma_config(3, "hook_mlp_out", d_in, exp, act="topk", k=k, cls_only=True, context_size=1)
    hub.write_repo("Prisma-Test/sae-top_k-5-cls_only-layer_3-hook_mlp_out",
                   {"config.json": json.dumps(cfg), "weights.pt": torch_bytes(OrderedDict(sd))})
    # Organisation-level repo_id, as the shipped Prisma releases use: the path starts with the repo name.
    test_release("test-prisma-topk", _spec("Prisma-Test", "blocks.3.hook_mlp_out",
                                           "sae-top_k-5-cls_only-layer_3-hook_mlp_out/weights.pt",
                                           token_policy="cls", input_kind="mlp_output"))
    sae = SAE.from_pretrained("test-prisma-topk", "blocks.3.hook_mlp_out")
    assert sae.cfg.architecture() == "topk" and sae.cfg.k == k and sae.cfg.apply_b_dec_to_input
    meta = sae.cfg.metadata
    assert (meta.hook_name, meta.token_policy, meta.input_kind) == ("blocks.3.hook_mlp_out", "cls", "mlp_output")
    assert meta.context_size == 1 and meta.source_format == "prisma" and meta.model_name == CLIP
    assert meta.sae_lens_version and meta.repo_id == "Prisma-Test/sae-top_k-5-cls_only-layer_3-hook_mlp_out"
    x = 3 * torch.randn(64, d_in)
    f_ref, x_hat_ref = prisma_reference(x, sd, "topk", k)
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), f_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sae(x), x_hat_ref, atol=1e-5, rtol=1e-5)
    assert ((sae.encode(x) > 0).sum(-1) <= k).all()


@pytest.mark.parametrize("with_config_json", [True, False])
def test_cfg_state_dict_pickle_with_layer_norm(hub, test_release, fake_vit_prisma, with_config_json):
    """imagenet-sweep-style weights.pt = {cfg: VisionModelSAERunnerConfig, state_dict}: loads without ViT-Prisma
    (config class unpickled as an inert stub), layer_norm normalisation reproduced."""
    d_in, exp = 16, 3
    sd = prisma_state(d_in, d_in * exp, seed=1)
    cfg_obj = fake_vit_prisma(d_in=d_in, expansion_factor=exp, hook_point_layer=2, normalize_activations="layer_norm",
                              device=torch.device("cpu"), dtype=torch.float32)
    payload = torch_bytes({"cfg": cfg_obj, "state_dict": sd})
    _drop_fake_modules()
    files: dict[str, Any] = {"weights.pt": payload}
    if with_config_json:
        files["config.json"] = json.dumps(prisma_config(2, "hook_resid_post", d_in, exp, norm="layer_norm", old_style=False))
    hub.write_repo("Prisma-Test/imagenet-sweep-ln", files)
    test_release("test-prisma-ln", _spec("Prisma-Test/imagenet-sweep-ln", "blocks.2.hook_resid_post", "weights.pt"))
    sae = SAE.from_pretrained("test-prisma-ln", "blocks.2.hook_resid_post")
    assert "vit_prisma" not in sys.modules
    assert sae.cfg.architecture() == "standard" and sae.cfg.normalize_activations == "layer_norm"
    assert sae.cfg.metadata.normalization["kind"] == "layer_norm"
    assert ("embedded" in sae.cfg.metadata.source_format_version) == (not with_config_json)
    x = 5 + 2 * torch.randn(32, d_in)  # a mean and scale the layer norm must remove and restore
    f_ref, x_hat_ref = prisma_reference(x, sd, "relu", layer_norm=True)
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), f_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sae(x), x_hat_ref, atol=1e-4, rtol=1e-5)


def test_full_width_sae_splices_into_hooked_vit(hub, test_release):
    """An n_images_<N>.pt SAE at d_in 768 loads by name and splices into HookedViT(open_clip ViT-B-32) at its hook:
    the spliced run equals a run whose hook activation is replaced by Prisma's reconstruction."""
    d_in, exp, layer = 768, 1, 5
    sd = prisma_state(d_in, d_in * exp, seed=2)
    repo = "sparse-autoencoder-clip-b-32-sae-vanilla-x64-layer-5-hook_resid_post-l1-1e-05"
    hub.write_repo(f"Prisma-Test/{repo}", {
        "config.json": json.dumps(prisma_config(layer, "hook_resid_post", d_in, exp)),
        "n_images_2600058.pt": torch_bytes({"cfg": None, "state_dict": sd}),
    })
    test_release("test-prisma-vanilla", _spec("Prisma-Test", "blocks.5.hook_resid_post",
                                              f"{repo}/n_images_2600058.pt", context_size=50))
    sae = SAE.from_pretrained("test-prisma-vanilla", "blocks.5.hook_resid_post")
    torch.manual_seed(0)
    model = HookedViT.from_pretrained(open_clip.create_model("ViT-B-32", pretrained=None))
    images = torch.randn(2, 3, 224, 224)
    hook = sae.cfg.metadata.hook_name

    def replace_with_reference(act, hook):  # noqa: ANN001
        return prisma_reference(act, sd, "relu")[1]

    with torch.no_grad():
        expected = model.run_with_hooks(images, fwd_hooks=[(hook, replace_with_reference)])
        spliced = model.run_with_saes(images, saes=[sae])
        clean = model(images)
        exact = model.run_with_saes(images, saes=[sae], use_error_term=True)
    torch.testing.assert_close(spliced, expected, atol=1e-4, rtol=1e-4)
    assert (spliced - clean).abs().max() > 1e-3  # the SAE really was in the path
    torch.testing.assert_close(exact, clean, atol=1e-4, rtol=1e-4)
    assert not model._acts_to_saes  # run_with_saes removed it again


@pytest.mark.parametrize(
    "override, message",
    [
        ({"architecture": "gated"}, "gated"),
        ({"activation_fn_str": "tanh-relu"}, "tanh-relu"),
        ({"normalize_activations": "constant_norm_rescale"}, "constant_norm_rescale"),
        ({"hook_point_head_index": 3}, "per-head"),
        ({"expansion_factor": 5}, "expansion_factor"),
        ({"hook_point_layer": 4}, "release directory says hook_name"),
    ],
)
def test_unsupported_or_inconsistent_configs_are_refused(hub, test_release, override, message):
    d_in, exp = 8, 2
    hub.write_repo("Prisma-Test/bad", {
        "config.json": json.dumps(prisma_config(2, "hook_resid_post", d_in, exp, **override)),
        "weights.pt": torch_bytes(prisma_state(d_in, d_in * exp)),
    })
    test_release("test-prisma-bad", _spec("Prisma-Test/bad", "blocks.2.hook_resid_post", "weights.pt"))
    with pytest.raises(ReleaseFormatError, match=message):
        SAE.from_pretrained("test-prisma-bad", "blocks.2.hook_resid_post")


def test_missing_tensor_is_named(hub, test_release):
    sd = prisma_state(8, 16)
    del sd["b_dec"]
    hub.write_repo("Prisma-Test/missing", {"config.json": json.dumps(prisma_config(1, "hook_resid_post", 8, 2)),
                                            "weights.pt": torch_bytes(sd)})
    test_release("test-prisma-missing", _spec("Prisma-Test/missing", "blocks.1.hook_resid_post", "weights.pt"))
    with pytest.raises(ReleaseFormatError, match=r"missing \['b_dec'\]"):
        SAE.from_pretrained("test-prisma-missing", "blocks.1.hook_resid_post")
