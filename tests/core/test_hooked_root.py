"""MultimodalHookedRootModule: unknown hook names, is_observed, and hooks never left behind."""

from __future__ import annotations

import pytest
import torch
from sae_lens import StandardSAE, StandardSAEConfig
from sae_lens.saes.sae import SAEMetadata
from transformer_lens.hook_points import HookPoint

from sae_lens_multimodal import HookedViT, HookedViTConfig
from sae_lens_multimodal.core import MultimodalHookedRootModule, is_observed


class Boom(RuntimeError):
    pass


def boom(act, hook):
    raise Boom(hook.name)


@pytest.fixture(scope="module")
def model() -> HookedViT:
    m = HookedViT(HookedViTConfig(n_layers=3, d_model=32, n_heads=4, d_mlp=64, image_size=32, patch_size=8, has_ln_pre=True))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_((1.0 if name.endswith(".w") else 0.0) + 0.2 * torch.randn(p.shape, generator=g))
    return m.eval()


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def sae_at(hook_name: str, d_in: int = 32) -> StandardSAE:
    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=64, metadata=SAEMetadata(hook_name=hook_name)))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return sae


def hooks_attached(model: torch.nn.Module) -> list[str]:
    return [
        name
        for name, m in model.named_modules()
        if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
    ]


def test_is_a_multimodal_root(model):
    assert isinstance(model, MultimodalHookedRootModule)


# ----------------------------------------------------------------------------------------------- unknown names
@pytest.mark.parametrize(
    "call",
    [
        lambda m, x, n: m.run_with_hooks(x, fwd_hooks=[(n, lambda a, hook: a)]),
        lambda m, x, n: m.run_with_cache(x, names_filter=n),
        lambda m, x, n: m.run_with_cache(x, names_filter=["blocks.0.hook_resid_post", n]),
        lambda m, x, n: m.add_hook(n, lambda a, hook: a),
        lambda m, x, n: m.hooks(fwd_hooks=[(n, lambda a, hook: a)]).__enter__(),
    ],
    ids=["run_with_hooks", "names_filter_str", "names_filter_list", "add_hook", "hooks_context"],
)
def test_unknown_hook_name_lists_close_matches(model, x, call):
    with pytest.raises(KeyError) as err:
        call(model, x, "blocks.1.hook_resid_pots")
    msg = str(err.value)
    assert "'blocks.1.hook_resid_pots'" in msg and "'blocks.1.hook_resid_post'" in msg
    assert "docs/hooks.md" in msg
    assert hooks_attached(model) == []


def test_unknown_name_without_close_spelling_suggests_same_hook_type(model, x):
    with pytest.raises(KeyError) as err:
        model.run_with_cache(x, names_filter="encoder.layers.7.hook_resid_post")
    assert "blocks.0.hook_resid_post" in str(err.value)


def test_unknown_name_after_a_valid_one_leaves_nothing_attached(model, x):
    with pytest.raises(KeyError):
        model.run_with_hooks(x, fwd_hooks=[("blocks.0.hook_resid_post", boom), ("blocks.9.hook_resid_post", boom)])
    assert hooks_attached(model) == []
    assert model.context_level == 0


# ----------------------------------------------------------------------------------------------- is_observed
def test_is_observed(model):
    hp = model.blocks[0].attn.hook_pattern
    assert not is_observed(hp)
    handle = hp.register_forward_hook(lambda *a: None)  # a raw torch hook counts too
    assert is_observed(hp)
    handle.remove()
    with model.hooks(fwd_hooks=[("blocks.0.attn.hook_pattern", lambda a, hook: a)]):
        assert is_observed(hp)
    assert not is_observed(hp)
    hp._always_observed = True
    try:
        assert is_observed(hp)
    finally:
        del hp._always_observed
    assert not is_observed(hp)
    assert is_observed(torch.nn.Identity())  # anything that replaced a hook point (e.g. an SAE wrapper)
    assert not is_observed(HookPoint())


# ----------------------------------------------------------------------------------------------- raising hooks
def test_raising_hook_in_run_with_hooks(model, x):
    clean = model(x)
    with pytest.raises(Boom):
        model.run_with_hooks(x, fwd_hooks=[("blocks.0.hook_resid_pre", lambda a, hook: a * 0), ("blocks.1.hook_mlp_out", boom)])
    assert hooks_attached(model) == [] and model.context_level == 0
    torch.testing.assert_close(model(x), clean, rtol=0, atol=0)


def test_raising_hook_in_run_with_cache_with_sae_attached(model, x):
    clean = model(x)
    hook = "blocks.1.hook_resid_post"
    model.add_sae(sae_at(hook))
    try:
        spliced = model(x)
        # Caching hooks on every hook point (the SAE's too) plus one that raises on an SAE hook.
        with pytest.raises(Boom, match="hook_sae_acts_post"):
            with model.hooks(fwd_hooks=[(f"{hook}.hook_sae_acts_post", boom)]):
                model.run_with_cache(x)
        assert hooks_attached(model) == [] and model.context_level == 0
        # Caching only the SAE's hooks, with a hook that raises later in the forward.
        with pytest.raises(Boom, match="blocks.2.hook_resid_pre"):
            with model.hooks(fwd_hooks=[("blocks.2.hook_resid_pre", boom)]):
                model.run_with_cache(x, names_filter=lambda n: "sae" in n)
        assert hooks_attached(model) == []
        assert set(model.acts_to_saes) == {hook}  # add_sae's SAE stays until reset_saes
        torch.testing.assert_close(model(x), spliced, rtol=0, atol=0)
    finally:
        model.reset_saes()
    assert hooks_attached(model) == [] and not model.acts_to_saes
    torch.testing.assert_close(model(x), clean, rtol=0, atol=0)


def test_raising_hook_in_run_with_saes_removes_the_sae(model, x):
    clean = model(x)
    hook = "blocks.2.hook_mlp_out"
    with pytest.raises(Boom):
        with model.hooks(fwd_hooks=[(lambda n: n == "blocks.2.hook_resid_post", boom)]):
            model.run_with_saes(x, saes=[sae_at(hook)])
    assert not model.acts_to_saes and isinstance(model.blocks[2].hook_mlp_out, HookPoint)
    assert hook in model.hook_dict and hooks_attached(model) == []
    torch.testing.assert_close(model(x), clean, rtol=0, atol=0)
    with pytest.raises(Boom):
        with model.hooks(fwd_hooks=[("blocks.2.hook_resid_post", boom)]):
            model.run_with_cache_with_saes(x, saes=[sae_at(hook)])
    assert not model.acts_to_saes and hooks_attached(model) == []
    torch.testing.assert_close(model(x), clean, rtol=0, atol=0)


def test_raising_hook_in_hooks_context(model, x):
    clean = model(x)
    with pytest.raises(Boom):
        with model.hooks(fwd_hooks=[("blocks.0.attn.hook_pattern", boom)], bwd_hooks=[("blocks.0.hook_resid_post", boom)]):
            assert len(hooks_attached(model)) == 2
            model(x)
    assert hooks_attached(model) == [] and model.context_level == 0
    # The pattern is no longer observed, so the fast path is back and the output is clean.
    assert not is_observed(model.blocks[0].attn.hook_pattern)
    torch.testing.assert_close(model(x), clean, rtol=0, atol=0)


def test_raising_hook_keeps_permanent_hooks(model, x):
    seen = []
    model.add_perma_hook("blocks.0.hook_resid_post", lambda a, hook: seen.append(1))
    try:
        with pytest.raises(Boom):
            model.run_with_hooks(x, fwd_hooks=[("blocks.1.hook_resid_post", boom)])
        assert hooks_attached(model) == ["blocks.0.hook_resid_post"]
    finally:
        model.reset_hooks(including_permanent=True)
    assert seen == [1] and hooks_attached(model) == []
