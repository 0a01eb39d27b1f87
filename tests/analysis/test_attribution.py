"""Attribution patching on tiny random models, against exact activation patching where the answer is exact.

* Downstream of the last block of a ViT without a final LayerNorm and with mean pooling, the output is
  linear in the last block's MLP activations and residual stream (and, with that block's MLP output
  zeroed, in its attention pattern and z), so the linear estimate must equal exact patching; with AtP*'s
  QK fix the query / key estimates must be exact too (the softmax is recomputed exactly, the rest is
  linear), while the plain linear estimate is not once the attention saturates.
* Anywhere else the estimate is first order: its error must shrink like the corruption squared.
* SAE features plus the error node sum to the position's estimate; at a hook with a linear downstream
  they equal exact feature patching.
"""

from __future__ import annotations

import pytest
import torch
from sae_lens import StandardSAE, StandardSAEConfig

from sae_lens_multimodal.analysis.attribution import attribution_patching, logit_difference
from sae_lens_multimodal.analysis.circuits_exact import exact_patching
from tests.training.conftest import make_vit

TOL = 1e-6


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def tail(zero_mlp: bool = False, query_scale: float = 1.0):
    """2 blocks, mean pooling, no final LayerNorm, linear head: the output is linear in block 1's outputs
    (and in its attention's when its MLP's output weights are zero)."""
    vit = make_vit(3, has_ln_final=False, pool_type="mean")
    with torch.no_grad():
        if zero_mlp:
            vit.blocks[1].mlp.W_out.zero_()
        vit.blocks[1].attn.W_Q.mul_(query_scale)
        vit.blocks[1].attn.b_Q.mul_(query_scale)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 32, 32, generator=g)
    x2 = x + 0.5 * torch.randn(x.shape, generator=g)
    w = torch.randn(16, generator=g)
    # fp64, so that "exact" means agreement to rounding error, not to fp32's
    return vit.double(), x.double(), x2.double(), lambda out: (out @ w.double()).mean()


@pytest.fixture(scope="module")
def linear_tail():
    return tail()


@pytest.fixture(scope="module")
def linear_attention():
    return tail(zero_mlp=True)


def no_hooks_left(model) -> bool:
    return all(not hp.fwd_hooks and not hp.bwd_hooks for hp in model.hook_dict.values())


@pytest.mark.parametrize(
    "hook,per",
    [
        ("blocks.1.attn.hook_pattern", "head_position"),
        ("blocks.1.attn.hook_z", "head_position"),
        ("blocks.1.attn.hook_z", "head"),
        ("blocks.1.mlp.hook_post", "position"),
        ("blocks.1.mlp.hook_post", "feature"),
        ("blocks.1.hook_resid_post", "position"),
        ("blocks.1.hook_attn_out", "hook"),
    ],
)
def test_linear_downstream_is_exact(linear_tail, linear_attention, hook, per):
    vit, x, x2, metric = linear_attention if "attn" in hook else linear_tail
    est = attribution_patching(vit, x, x2, metric, hooks=[hook], per=per)
    ref = exact_patching(vit, x, x2, metric, hooks=[hook], per=per)
    assert est[hook].shape == ref[hook].shape
    assert ref[hook].abs().max() > 1e-3  # the corruption moves this hook
    assert rel_err(est[hook], ref[hook]) < TOL
    assert no_hooks_left(vit)


@pytest.fixture(scope="module")
def saturated():
    """linear_attention with block 1's queries scaled up 8x: its patterns saturate (max weight near 1)."""
    vit, x, x2, metric = tail(zero_mlp=True, query_scale=8.0)
    _, cache = vit.run_with_cache(x, names_filter="blocks.1.attn.hook_pattern")
    assert cache["blocks.1.attn.hook_pattern"].amax(-1).median() > 0.9
    return vit, x, x2, metric


@pytest.mark.parametrize("hook", ["blocks.1.attn.hook_q", "blocks.1.attn.hook_k"])
@pytest.mark.parametrize("per", ["head_position", "head", "position"])
def test_qk_fix_is_exact_where_only_the_softmax_is_nonlinear(saturated, hook, per):
    vit, x, x2, metric = saturated
    ref = exact_patching(vit, x, x2, metric, hooks=[hook], per=per)[hook]
    fixed = attribution_patching(vit, x, x2, metric, hooks=[hook], per=per)
    linear = attribution_patching(vit, x, x2, metric, hooks=[hook], per=per, attention_fix=False)
    assert fixed.methods[hook] == "qk-fix" and linear.methods[hook] == "linear"
    assert rel_err(fixed[hook], ref) < TOL
    # Measured: the linear estimate through the saturated softmax is off by 0.9-4.6x the largest effect.
    assert rel_err(linear[hook], ref) > 0.3


@pytest.mark.parametrize("hook", ["blocks.0.hook_resid_pre", "blocks.0.attn.hook_z", "blocks.0.mlp.hook_post"])
def test_first_order_error_shrinks_quadratically(linear_tail, hook):
    vit, x, _, _ = linear_tail
    vit_ln = make_vit(5)  # with its final LayerNorm: nothing is linear downstream of block 0
    w = torch.randn(16, generator=torch.Generator().manual_seed(6))
    metric = lambda out: (out @ w.double()).mean()  # noqa: E731
    direction = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    errors = []
    vit_ln, x = vit_ln.double(), x.double()
    direction = direction.double()
    for eps in (0.2, 0.02):
        x2 = x + eps * direction
        est = attribution_patching(vit_ln, x, x2, metric, hooks=[hook])[hook]
        ref = exact_patching(vit_ln, x, x2, metric, hooks=[hook])[hook]
        errors.append(float((est - ref).abs().max()))
    # error ~ eps^2: a 10x smaller corruption gives a >= 30x smaller error (100x in the limit)
    assert errors[1] < errors[0] / 30


def make_sae(d_in: int, hook: str, d_sae: int = 24, seed: int = 0) -> StandardSAE:
    cfg = StandardSAEConfig(d_in=d_in, d_sae=d_sae)
    cfg.metadata.hook_name = hook
    sae = StandardSAE(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.ndim == 2 else 0.05))
    return sae.eval()


def test_sae_features_and_error_node(linear_tail):
    vit, x, x2, metric = linear_tail
    hook = "blocks.1.hook_resid_post"
    sae = make_sae(32, hook).double()
    before = {k: v.clone() for k, v in sae.state_dict().items()}
    est = attribution_patching(vit, x, x2, metric, saes=[sae], per="feature")
    by_pos = attribution_patching(vit, x, x2, metric, hooks=[hook])[hook]
    assert est[hook].shape == (17, 24) and est.errors[hook].shape == (17,)
    assert est.methods[hook] == "sae"
    # features + error = the position's estimate (affine decoder)
    assert rel_err(est[hook].sum(-1) + est.errors[hook], by_pos) < TOL
    ref = exact_patching(vit, x, x2, metric, saes=[sae], per="feature")
    assert (ref[hook] != 0).sum() > 20
    assert rel_err(est[hook], ref[hook]) < TOL and rel_err(est.errors[hook], ref.errors[hook]) < TOL
    assert all(torch.equal(before[k], v) for k, v in sae.state_dict().items())  # the SAE is not modified
    hook_name, unit, value = est.top(1)[0]
    assert hook_name in (hook, hook + ":error")


def test_sae_on_heads_hook(linear_tail):
    vit, x, x2, metric = linear_tail
    hook = "blocks.1.attn.hook_z"
    cfg = StandardSAEConfig(d_in=32, d_sae=16, reshape_activations="hook_z")
    cfg.metadata.hook_name = hook
    sae = StandardSAE(cfg)
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(std=0.3, generator=torch.Generator().manual_seed(1))
    sae = sae.double()
    est = attribution_patching(vit, x, x2, metric, saes=[sae], per="feature")
    by_pos = attribution_patching(vit, x, x2, metric, hooks=[hook])[hook]
    assert est[hook].shape == (17, 16)
    assert rel_err(est[hook].sum(-1) + est.errors[hook], by_pos) < TOL


def test_saes_at_several_hooks(linear_tail):
    """Feature x position and error nodes at two hooks in one pass: the last block's are exact, the first
    block's first-order (a 10x smaller corruption gives a >= 30x smaller error)."""
    vit, x, _, metric = linear_tail
    early, late = make_sae(32, "blocks.0.hook_resid_post", seed=1).double(), make_sae(32, "blocks.1.hook_resid_post", seed=2).double()
    direction = torch.randn(x.shape, generator=torch.Generator().manual_seed(8), dtype=x.dtype)
    errors = []
    for eps in (0.2, 0.02):
        x2 = x + eps * direction
        est = attribution_patching(vit, x, x2, metric, saes=[early, late], per="feature")
        ref = exact_patching(vit, x, x2, metric, saes=[early, late], per="feature")
        assert rel_err(est["blocks.1.hook_resid_post"], ref["blocks.1.hook_resid_post"]) < TOL
        h = "blocks.0.hook_resid_post"
        errors.append(max(float((est[h] - ref[h]).abs().max()), float((est.errors[h] - ref.errors[h]).abs().max())))
    assert errors[1] < errors[0] / 30
    vit.add_sae(late, use_error_term=True)
    try:
        with pytest.raises(ValueError, match="reset_saes"):
            attribution_patching(vit, x, x + 0.1 * direction, metric, saes=[early], per="feature")
    finally:
        vit.reset_saes()


def test_hooks_removed_on_error_and_bad_arguments(linear_tail):
    vit, x, x2, metric = linear_tail

    def broken(out):
        raise RuntimeError("metric failed")

    with pytest.raises(RuntimeError, match="metric failed"):
        attribution_patching(vit, x, x2, broken, hooks=["blocks.0.hook_resid_pre"])
    assert no_hooks_left(vit)
    with pytest.raises(ValueError, match="per must be one of"):
        attribution_patching(vit, x, x2, metric, hooks=["blocks.0.hook_resid_pre"], per="token")
    with pytest.raises(ValueError, match="has no 'head' units"):
        attribution_patching(vit, x, x2, metric, hooks=["blocks.0.hook_resid_pre"], per="head")
    with pytest.raises(KeyError, match="hook_resid_pre"):
        attribution_patching(vit, x, x2, metric, hooks=["blocks.0.hook_resid_pree"])
    with pytest.raises(ValueError, match="scalar"):
        attribution_patching(vit, x, x2, lambda out: out, hooks=["blocks.0.hook_resid_pre"])
    with pytest.raises(ValueError, match="denoiser"):
        attribution_patching(vit, x, x2, metric, hooks=["blocks.0.hook_resid_pre"], timestep=10)
    with pytest.raises(ValueError, match="at least one hook"):
        attribution_patching(vit, x, x2, metric)
    assert no_hooks_left(vit)


def test_fp32_required():
    vit = make_vit(0).half()
    x = torch.randn(1, 3, 32, 32).half()
    with pytest.raises(TypeError, match="fp32"):
        attribution_patching(vit, x, x, lambda o: o.sum(), hooks=["blocks.0.hook_resid_pre"])


def test_logit_difference():
    logits = torch.tensor([[1.0, 4.0, 2.0], [0.0, -1.0, 3.0]])
    assert float(logit_difference(1, 2)(logits)) == pytest.approx(((4 - 2) + (-1 - 3)) / 2)
    assert float(logit_difference(torch.tensor([0, 2]), 1)(logits)) == pytest.approx(((1 - 4) + (3 + 1)) / 2)


def test_edges_between_two_saes_sum_to_the_node_estimates(linear_tail):
    """Edges from every node at block 0 into block 1's top features sum, to first order, to those features'
    node estimates (block 1's input is block 0's residual stream: every path runs through those nodes)."""
    from sae_lens_multimodal.analysis.circuits_edges import edge_attribution

    vit, x, _, metric = linear_tail
    up, down = make_sae(32, "blocks.0.hook_resid_post", seed=1).double(), make_sae(32, "blocks.1.hook_resid_post", seed=2).double()
    direction = torch.randn(x.shape, generator=torch.Generator().manual_seed(9), dtype=x.dtype)
    gaps, targets, runs = [], None, []
    for eps in (0.1, 0.01):
        edges = edge_attribution(vit, x, x + eps * direction, metric, upstream=up, downstream=down, top_k=5,
                                 targets=targets, freeze_attention=False)
        targets = edges.targets
        runs.append(edges)
        assert edges.feature_edges.shape == (5, 17, 24) and edges.error_edges.shape == (5, 17)
        assert edges.target_scores.abs().min() > 0
        gaps.append(float((edges.totals() - edges.target_scores).abs().max() / edges.target_scores.abs().max()))
    # relative gap ~ eps: a 10x smaller corruption gives a >= 5x smaller relative gap (measured 0.077 -> 0.0081)
    assert gaps[1] < gaps[0] / 5 and gaps[1] < 0.05
    frozen = edge_attribution(vit, x, x + 0.1 * direction, metric, upstream=up, downstream=down, targets=targets)
    # frozen patterns / scales: the same forward, the gradient through the values and MLPs only
    assert torch.allclose(frozen.target_scores, runs[0].target_scores)
    assert not torch.allclose(frozen.feature_edges, runs[0].feature_edges)
    assert no_hooks_left(vit)
