"""saev SAEs: every documented header schema, the DINOv3 manifest layout, loaded by name offline.

Format (release-formats.md §2): ``sae.pt`` = one JSON header line + ``\\n`` + ``torch.save(state_dict)``;
tensors ``W_enc (d_in,d_sae)``, ``b_enc``, ``W_dec (d_sae,d_in)`` (unit rows), ``b_dec``, and for BatchTopK files
from 2025-11-16 ``activation.threshold`` (shape ()). Math: no-schema/schema-1 files were trained with
``h = (x − b_dec)·W_enc + b_enc``, schema >= 2 with ``h = x·W_enc + b_enc``; ReLU ``relu(h)``; TopK keeps the
top-k of h WITHOUT ReLU; BatchTopK with θ: ``h if h > θ else 0`` (θ <= 0: ReLU); ``x̂ = f·W_dec + b_dec``.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Optional

import pytest
import torch
from sae_lens import SAE

from sae_lens_multimodal import HookedViT, HookedViTConfig
from sae_lens_multimodal.pretrained import (
    MissingReleaseFileError,
    ReleaseFormatError,
    expand_manifest_release,
    fold_saev_normalization,
    list_releases,
)
from tests.pretrained.conftest import torch_bytes

D_IN, D_SAE, TOP_K = 16, 64, 8


def saev_file(header: dict[str, Any], state: dict[str, torch.Tensor]) -> bytes:
    return json.dumps(header).encode("utf-8") + b"\n" + torch_bytes(state)


def saev_state(d_in: int = D_IN, d_sae: int = D_SAE, seed: int = 0, threshold: Optional[float] = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(d_sae, d_in, generator=g)
    state = {
        "W_enc": torch.randn(d_in, d_sae, generator=g) / d_in**0.5,
        "b_enc": 0.1 * torch.randn(d_sae, generator=g),
        "W_dec": W_dec / W_dec.norm(dim=1, keepdim=True),
        "b_dec": torch.randn(d_in, generator=g),
    }
    if threshold is not None:
        state["activation.threshold"] = torch.tensor(threshold)
    return state


def saev_reference(x: torch.Tensor, sd: dict[str, torch.Tensor], act: str, *, subtract: bool,
                   top_k: Optional[int] = None, theta: Optional[float] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """saev's inference math, written from the format description."""
    h = ((x - sd["b_dec"]) if subtract else x) @ sd["W_enc"] + sd["b_enc"]
    if act == "relu" or (act == "batchtopk" and theta is not None and theta <= 0):
        f = torch.relu(h)
    elif act == "topk":  # top-k values kept as they are (no ReLU)
        vals, idx = h.topk(top_k, dim=-1)
        f = torch.zeros_like(h).scatter(-1, idx, vals)
    else:  # BatchTopK at inference with a stored threshold
        f = torch.where(h > theta, h, torch.zeros_like(h))
    return f, f @ sd["W_dec"] + sd["b_dec"]


BASE_2 = {"exp_factor": 4, "n_reinit_samples": 524288, "remove_parallel_grads": True, "normalize_w_dec": True, "seed": 17}
SCHEMAS: dict[str, tuple[dict[str, Any], str, dict[str, Any]]] = {
    # name: (header, expected SAELens architecture, reference kwargs)
    "none-relu": (
        {"d_vit": D_IN, "exp_factor": 4, "sparsity_coeff": 0.0004, "n_reinit_samples": 524288, "ghost_grads": False,
         "remove_parallel_grads": True, "normalize_w_dec": True, "seed": 42},
        "standard", {"act": "relu", "subtract": True}),
    "1A-topk": (
        {"schema": 1, "cls": "TopK", "commit": "0a1b2c3", "lib": "saev",
         "cfg": {"d_vit": D_IN, "exp_factor": 4, "top_k": TOP_K, "sparsity_coeff": 0.0, "seed": 1}},
        "topk", {"act": "topk", "subtract": True, "top_k": TOP_K}),
    "1B-relu": (
        {"schema": 1, "cls": "SparseAutoencoderConfig", "commit": "0a1b2c3", "lib": "saev",
         "cfg": {"d_vit": D_IN, "exp_factor": 4, "activation": {"cls": "Relu", "params": {}}}},
        "standard", {"act": "relu", "subtract": True}),
    "2-topk-d_vit": (
        {"schema": 2, "commit": "4d5e6f7", "lib": "saev",
         "cfg": {"d_vit": D_IN, **BASE_2, "activation": {"cls": "TopK", "params": {"top_k": TOP_K}}}},
        "topk", {"act": "topk", "subtract": False, "top_k": TOP_K}),
    "3-batchtopk-no-threshold-legacy-kind": (
        {"schema": 3, "commit": "4d5e6f7", "lib": "saev",
         "cfg": {"d_model": D_IN, **BASE_2,
                 "activation": {"cls": "BatchTopK", "params": {"kind": "batch-top-k", "top_k": TOP_K}}}},
        "topk", {"act": "topk", "subtract": False, "top_k": TOP_K}),
    "4-early-relu": (
        {"schema": 4, "commit": "8a9b0c1", "lib": "saev",
         "cfg": {"d_model": D_IN, "d_sae": D_SAE, "n_reinit_samples": 524288, "remove_parallel_grads": True,
                 "normalize_w_dec": True, "seed": 3, "activation": {"cls": "Relu", "params": {}}}},
        "standard", {"act": "relu", "subtract": False}),
    "4-late-topk": (
        {"schema": 4, "commit": "8a9b0c1", "lib": "saev",
         "cfg": {"d_model": D_IN, "d_sae": D_SAE, "reinit_blend": 0.8, "reinit_enc_dec_tranpose": True,
                 "remove_parallel_grads": True, "normalize_w_dec": True,
                 "activation": {"cls": "TopK", "params": {"top_k": TOP_K}}}},
        "topk", {"act": "topk", "subtract": False, "top_k": TOP_K}),
    "5-batchtopk-threshold": (
        {"schema": 5, "commit": "d2e3f4a", "lib": "saev",
         "cfg": {"d_model": D_IN, "d_sae": D_SAE, "reinit_blend": 0.8, "reinit_enc_dec_tranpose": True,
                 "remove_parallel_grads": True, "normalize_w_dec": True,
                 "activation": {"cls": "BatchTopK", "params": {
                     "key": "batch-top-k", "top_k": TOP_K, "momentum": 0.1,
                     "sparsity": {"cls": "NoSparsity", "params": {"key": "none", "coeff": 0.0}},
                     "aux": {"cls": "AuxK", "params": {"key": "auxk", "k_aux": 512, "alpha": 0.03125}}}}}},
        "jumprelu", {"act": "batchtopk", "subtract": False, "theta": 0.35}),
    "5-batchtopk-nonpositive-threshold": (
        {"schema": 5, "commit": "d2e3f4a", "lib": "saev",
         "cfg": {"d_model": D_IN, "d_sae": D_SAE, "reinit_blend": 0.8, "reinit_enc_dec_tranpose": True,
                 "remove_parallel_grads": True, "normalize_w_dec": True,
                 "activation": {"cls": "BatchTopK", "params": {"key": "batch-top-k", "top_k": TOP_K}}}},
        "standard", {"act": "batchtopk", "subtract": False, "theta": -0.2}),
    "5-relu-l1": (
        {"schema": 5, "commit": "d2e3f4a", "lib": "saev",
         "cfg": {"d_model": D_IN, "d_sae": D_SAE, "reinit_blend": 0.8, "reinit_enc_dec_tranpose": True,
                 "remove_parallel_grads": True, "normalize_w_dec": True,
                 "activation": {"cls": "Relu", "params": {
                     "key": "relu", "sparsity": {"cls": "L1Sparsity", "params": {"key": "l1", "coeff": 0.0004}},
                     "aux": {"cls": "NoAux", "params": {"key": "none"}}}}}},
        "standard", {"act": "relu", "subtract": False}),
}


def _spec(repo_id: str, **defaults: Any) -> dict[str, Any]:
    return {"format": "saev", "repo_id": repo_id, "model": "open-clip:ViT-B-16/openai", "model_class_name": "HookedViT",
            "defaults": {"token_policy": "patches", "input_kind": "block_output", **defaults},
            "saes": [{"id": "blocks.10.hook_resid_post", "path": "sae.pt"}]}


@pytest.mark.parametrize("schema", list(SCHEMAS))
def test_every_header_schema_loads_by_name_with_saev_math(hub, test_release, schema):
    header, arch, ref = SCHEMAS[schema]
    theta = ref.get("theta")
    sd = saev_state(seed=len(schema), threshold=theta)
    repo = f"osunlp-test/SAE_{schema}"
    hub.write_repo(repo, {"sae.pt": saev_file(header, sd)})
    test_release(f"test-saev-{schema}", _spec(repo))
    sae = SAE.from_pretrained(f"test-saev-{schema}", "blocks.10.hook_resid_post")
    assert sae.cfg.architecture() == arch
    assert sae.cfg.apply_b_dec_to_input == ref["subtract"]
    meta = sae.cfg.metadata
    assert meta.hook_name == "blocks.10.hook_resid_post" and meta.token_policy == "patches"
    assert meta.source_format == "saev" and meta.b_dec_subtracted_in_encoder == ref["subtract"]
    x = torch.randn(128, D_IN)
    f_ref, x_hat_ref = saev_reference(x, sd, **ref)
    if ref["act"] == "topk":  # SAELens ReLUs the kept values: identical when >= k pre-activations are positive
        h = ((x - sd["b_dec"]) if ref["subtract"] else x) @ sd["W_enc"] + sd["b_enc"]
        assert ((h > 0).sum(-1) >= TOP_K).all()
        assert meta.deviations
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), f_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sae(x), x_hat_ref, atol=1e-5, rtol=1e-5)
        if ref["subtract"]:  # the era rule matters: the no-subtraction reading would be wrong for these files
            wrong, _ = saev_reference(x, sd, **{**ref, "subtract": False})
            assert (sae.encode(x) - wrong).abs().max() > 1e-2


def test_topk_with_few_positive_preactivations_differs_only_by_relu(hub, test_release):
    header, _, _ = SCHEMAS["2-topk-d_vit"]
    sd = saev_state(seed=5)
    sd["b_enc"] = sd["b_enc"] - 10.0  # almost every pre-activation negative
    hub.write_repo("osunlp-test/SAE_negative", {"sae.pt": saev_file(header, sd)})
    test_release("test-saev-negative", _spec("osunlp-test/SAE_negative"))
    sae = SAE.from_pretrained("test-saev-negative", "blocks.10.hook_resid_post")
    x = torch.randn(16, D_IN)
    f_saev, _ = saev_reference(x, sd, "topk", subtract=False, top_k=TOP_K)
    assert (f_saev < 0).any()  # saev keeps negative top-k values here
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), torch.relu(f_saev), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("schema", ["none-relu", "4-early-relu"])
def test_fold_saev_normalization(hub, test_release, schema):
    """SAE-V SAEs read (x − μ)/s; after folding μ, s the SAE reads raw activations exactly."""
    header, _, ref = SCHEMAS[schema]
    sd = saev_state(seed=9)
    hub.write_repo(f"osunlp-test/SAE_norm_{schema}", {"sae.pt": saev_file(header, sd)})
    test_release(f"test-saev-norm-{schema}", _spec(f"osunlp-test/SAE_norm_{schema}"))
    sae = SAE.from_pretrained(f"test-saev-norm-{schema}", "blocks.10.hook_resid_post")
    mu, s = 3 * torch.randn(D_IN), 7.5
    fold_saev_normalization(sae, mu, s)
    x = mu + s * torch.randn(64, D_IN)
    f_ref, x_hat_norm = saev_reference((x - mu) / s, sd, **ref)
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), f_ref, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(sae(x), s * x_hat_norm + mu, atol=1e-4, rtol=1e-4)
    assert sae.cfg.metadata.normalization["status"] == "folded into the weights"


def test_small_vit_splice(hub, test_release):
    """A saev SAE spliced into a HookedViT at its hook replaces the activation with saev's reconstruction."""
    header, _, ref = SCHEMAS["none-relu"]
    sd = saev_state(seed=11)
    hub.write_repo("osunlp-test/SAE_splice", {"sae.pt": saev_file(header, sd)})
    spec = _spec("osunlp-test/SAE_splice")
    spec["saes"] = [{"id": "blocks.1.hook_resid_post", "path": "sae.pt"}]
    test_release("test-saev-splice", spec)
    sae = SAE.from_pretrained("test-saev-splice", "blocks.1.hook_resid_post")
    model = HookedViT(HookedViTConfig(n_layers=2, d_model=D_IN, n_heads=2, d_mlp=32, image_size=16, patch_size=8))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.3 * torch.randn_like(p))
        images = torch.randn(2, 3, 16, 16)
        expected = model.run_with_hooks(
            images, fwd_hooks=[("blocks.1.hook_resid_post", lambda a, hook: saev_reference(a, sd, **ref)[1])]
        )
        torch.testing.assert_close(model.run_with_saes(images, saes=[sae]), expected, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------- DINOv3 manifest layout
def _manifest_repo(hub, repo: str, runs: list[tuple[int, str, float]], header_key: str = "5-relu-l1",
                   bad_sha: Optional[str] = None) -> dict[str, dict[str, torch.Tensor]]:
    header, _, _ = SCHEMAS[header_key]
    files: dict[str, Any] = {"README.md": "# DINOv3 SAEs\n"}
    rows, states = [], {}
    for i, (layer, run_id, l0) in enumerate(sorted(runs, key=lambda r: (r[0], r[2]))):
        sd = saev_state(seed=100 + i)
        data = saev_file(header, sd)
        path = f"layer_{layer}/{run_id}/sae.pt"
        files[path] = data
        states[run_id] = sd
        sha = bad_sha if run_id == "zz000bad" and bad_sha else hashlib.sha256(data).hexdigest()
        rows.append({"run_id": run_id, "layer": layer, "l0": l0, "mse": 0.012345, "sha256": sha, "path": path})
    files["manifest.jsonl"] = "".join(json.dumps(r) + "\n" for r in rows)
    hub.write_repo(repo, files)
    return states


def _manifest_spec(repo: str) -> dict[str, Any]:
    return {"format": "saev", "repo_id": repo, "model": "facebook/dinov3-vitb16-pretrain-lvd1689m",
            "model_class_name": "HookedViT", "manifest": "manifest.jsonl", "layers": [7, 9],
            "sae_id_template": "blocks.{layer}.hook_resid_post/{run_id}",
            "hook_name_template": "blocks.{layer}.hook_resid_post", "path_template": "layer_{layer}/{run_id}/sae.pt",
            "defaults": {"token_policy": "patches", "input_kind": "block_output", "d_in": D_IN}}


def test_manifest_release_runs_load_by_name(hub, test_release):
    repo = "osunlp-test/SAE_DINOv3_fixture"
    test_release("test-saev-dinov3", _manifest_spec(repo))  # registered before the manifest is cached
    states = _manifest_repo(hub, repo, [(7, "abcd1234", 31.5), (7, "efgh5678", 120.25), (9, "ijkl9012", 64.0)])
    sae = SAE.from_pretrained("test-saev-dinov3", "blocks.7.hook_resid_post/efgh5678")
    meta = sae.cfg.metadata
    assert meta.hook_name == "blocks.7.hook_resid_post" and meta.manifest["run_id"] == "efgh5678"
    assert meta.expected_l0 == 120.25 and meta.manifest["sha256"]
    x = torch.randn(8, D_IN)
    with torch.no_grad():
        torch.testing.assert_close(sae(x), saev_reference(x, states["efgh5678"], "relu", subtract=False)[1],
                                   atol=1e-5, rtol=1e-5)
    with pytest.raises(ReleaseFormatError, match="abcd1234"):  # a run not in the manifest lists the real ones
        SAE.from_pretrained("test-saev-dinov3", "blocks.7.hook_resid_post/nosuchrun")
    with pytest.raises(ValueError, match="not found"):  # a layer outside the release
        SAE.from_pretrained("test-saev-dinov3", "blocks.8.hook_resid_post/abcd1234")
    before = list_releases(release="test-saev-dinov3")
    assert [r.sae_id for r in before] == ["blocks.7.hook_resid_post/<run_id>", "blocks.9.hook_resid_post/<run_id>"]
    expand_manifest_release("test-saev-dinov3", download=False)
    after = list_releases(release="test-saev-dinov3")
    assert {(r.sae_id, r.l0) for r in after} == {
        ("blocks.7.hook_resid_post/abcd1234", 31.5), ("blocks.7.hook_resid_post/efgh5678", 120.25),
        ("blocks.9.hook_resid_post/ijkl9012", 64.0)}
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    assert get_pretrained_saes_directory()["test-saev-dinov3"].expected_l0["blocks.9.hook_resid_post/ijkl9012"] == 64.0


def test_manifest_sha256_mismatch_is_refused(hub, test_release):
    repo = "osunlp-test/SAE_DINOv3_badsha"
    _manifest_repo(hub, repo, [(9, "zz000bad", 10.0)], bad_sha="0" * 64)
    test_release("test-saev-badsha", _manifest_spec(repo))
    with pytest.raises(ReleaseFormatError, match="sha256"):
        SAE.from_pretrained("test-saev-badsha", "blocks.9.hook_resid_post/zz000bad")


def test_manifest_missing_offline_names_repo_and_file(hub, test_release):
    test_release("test-saev-nomanifest", _manifest_spec("osunlp-test/SAE_DINOv3_absent"))
    with pytest.raises(MissingReleaseFileError, match=r"manifest\.jsonl.*osunlp-test/SAE_DINOv3_absent.*huggingface-cli download"):
        SAE.from_pretrained("test-saev-nomanifest", "blocks.9.hook_resid_post/abcd1234")


@pytest.mark.parametrize(
    "data, message",
    [
        (torch_bytes(saev_state()), "JSON header"),  # a bare torch zip, no header line
        (json.dumps({"schema": 9, "cfg": {}}).encode() + b"\n" + torch_bytes(saev_state()), "schema 9"),
        (json.dumps({"schema": 2, "cfg": {"d_model": D_IN, "exp_factor": 4, "activation": {"cls": "TopK", "params": {}}}}).encode()
         + b"\n" + torch_bytes(saev_state()), "top_k"),
        (json.dumps({"d_vit": D_IN, "exp_factor": 2}).encode() + b"\n" + torch_bytes(saev_state()), "W_enc"),
    ],
)
def test_malformed_files_are_refused(hub, test_release, data, message):
    hub.write_repo("osunlp-test/SAE_bad", {"sae.pt": data})
    test_release("test-saev-bad", _spec("osunlp-test/SAE_bad"))
    with pytest.raises(ReleaseFormatError, match=message):
        SAE.from_pretrained("test-saev-bad", "blocks.10.hook_resid_post")
