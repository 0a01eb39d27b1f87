"""HookedUNet: exactness, hook values against diffusers' own tensors, interventions, aliases, SAEs, loading."""

from __future__ import annotations

import pytest
import torch
from sae_lens import StandardSAE, StandardSAEConfig
from sae_lens.saes.sae import SAEMetadata
from transformer_lens.hook_points import HookPoint

from sae_lens_multimodal.diffusion import HookedDiT, HookedUNet, current_timestep
from sae_lens_multimodal.diffusion._attention import HookedAttentionProcessor
from tests.diffusion import _tiny

BUILDERS = {"sd": _tiny.sd_unet, "sdxl": _tiny.sdxl_unet}


def _inputs(kind: str, batch: int = 2) -> tuple[tuple, dict]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, 16, 16, generator=g)
    t = torch.tensor([500] * batch)
    if kind == "sd":
        return (x, t, torch.randn(batch, 7, _tiny.TEXT_DIM, generator=g)), {}
    cond = {"text_embeds": torch.randn(batch, _tiny.TEXT_DIM, generator=g),
            "time_ids": torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]] * batch)}
    return (x, t, torch.randn(batch, 7, 2 * _tiny.TEXT_DIM, generator=g)), {"added_cond_kwargs": cond}


@pytest.fixture(scope="module", params=["sd", "sdxl"])
def model(request):
    torch.manual_seed(0)
    unet = BUILDERS[request.param]()
    args, kwargs = _inputs(request.param)
    with torch.no_grad():
        reference = unet(*args, **kwargs).sample  # the unwrapped diffusers UNet
    return request.param, unet, HookedUNet.from_pretrained(unet), reference


@torch.no_grad()
def test_bit_identical_without_hooks_and_with_identity_hooks(model):
    kind, _, hooked, reference = model
    args, kwargs = _inputs(kind)
    assert torch.equal(hooked(*args, **kwargs).sample, reference)
    # Every hook that does not change the computation path: identity hooks must be bit-identical.
    identity = [(n, lambda a, hook: a) for n in hooked.hook_dict if "pattern" not in n and "scores" not in n]
    assert torch.equal(hooked.run_with_hooks(*args, fwd_hooks=identity, **kwargs).sample, reference)
    # Hooks that return None and leave the activation alone are identity hooks too.
    none_hooks = [(n, lambda a, hook: None) for n in hooked.hook_dict if "pattern" not in n and "scores" not in n]
    assert torch.equal(hooked.run_with_hooks(*args, fwd_hooks=none_hooks, **kwargs).sample, reference)
    # Watching patterns switches SDPA for one explicit softmax: same values up to float rounding.
    patterns = [(n, lambda a, hook: a) for n in hooked.hook_dict if n.endswith(("hook_pattern", "hook_attn_scores"))]
    out = hooked.run_with_hooks(*args, fwd_hooks=patterns, **kwargs).sample
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    assert not any(hp._forward_hooks for hp in hooked.hook_dict.values())


@torch.no_grad()
def test_block_hooks_equal_diffusers_block_tensors(model):
    """hook_in/hook_out/hook_update of every block == the diffusers block's own input/output (channel-last)."""
    kind, unet, hooked, _ = model
    args, kwargs = _inputs(kind)
    captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []
    for path, module in unet.named_modules():
        if f"{path}.hook_in" not in hooked.hook_dict:
            continue

        def grab(mod, a, kw, out, path=path):
            x = a[0] if a else kw.get("hidden_states", kw.get("input_tensor"))
            y = out[0] if isinstance(out, tuple) else getattr(out, "sample", out)
            captured[path] = (x.clone(), y.clone())

        handles.append(module.register_forward_hook(grab, with_kwargs=True))
    try:
        _, cache = hooked.run_with_cache(*args, names_filter=lambda n: n.endswith(("hook_in", "hook_out", "hook_update")),
                                         **kwargs)
    finally:
        for h in handles:
            h.remove()
    assert len(captured) > 20
    for path, (x, y) in captured.items():
        cl = (lambda t: t.permute(0, 2, 3, 1)) if x.ndim == 4 else (lambda t: t)
        assert torch.equal(cache[f"{path}.hook_in"], cl(x)), path
        assert torch.equal(cache[f"{path}.hook_out"], cl(y)), path
        if f"{path}.hook_update" in cache:
            assert torch.equal(cache[f"{path}.hook_update"], cl(y - x)), path
        else:  # no update where the block changes the shape (channel change / up- or down-sampling)
            assert x.shape != y.shape, path
        assert hooked.hook_width(f"{path}.hook_out") == y.shape[1 if y.ndim == 4 else -1]


@torch.no_grad()
def test_attention_hooks_equal_diffusers_attention(model):
    """q/k/v/pattern/z/result against diffusers' own projections, get_attention_scores and output layer."""
    kind, unet, hooked, _ = model
    args, kwargs = _inputs(kind)
    block = "up_blocks.1.attentions.1.transformer_blocks.0" if kind == "sd" else "up_blocks.0.attentions.1.transformer_blocks.9"
    names = [f"{block}.{a}.{h}" for a in ("attn1", "attn2")
             for h in ("hook_q", "hook_k", "hook_v", "hook_pattern", "hook_z", "hook_result")]
    seen: dict[str, dict] = {}
    handles = []
    for attn_name in ("attn1", "attn2"):
        attn = unet.get_submodule(f"{block}.{attn_name}")

        def grab_in(mod, a, kw, attn_name=attn_name):
            seen.setdefault(attn_name, {})["x"] = a[0] if a else kw["hidden_states"]
            seen[attn_name]["ctx"] = kw.get("encoder_hidden_states")

        def grab_out(mod, a, out, attn_name=attn_name):
            seen[attn_name]["out"] = out

        handles += [attn.register_forward_pre_hook(grab_in, with_kwargs=True),
                    attn.to_out[0].register_forward_hook(grab_out)]
    try:
        _, cache = hooked.run_with_cache(*args, names_filter=names, **kwargs)
    finally:
        for h in handles:
            h.remove()
    for attn_name in ("attn1", "attn2"):
        attn = unet.get_submodule(f"{block}.{attn_name}")
        x, ctx = seen[attn_name]["x"], seen[attn_name]["ctx"]
        ctx = x if ctx is None else ctx
        b, heads = x.shape[0], attn.heads
        q, k, v = attn.to_q(x), attn.to_k(ctx), attn.to_v(ctx)
        split = lambda t: t.view(b, t.shape[1], heads, -1)  # noqa: E731
        pre = f"{block}.{attn_name}."
        torch.testing.assert_close(cache[pre + "hook_q"], split(q), atol=1e-6, rtol=0)
        torch.testing.assert_close(cache[pre + "hook_k"], split(k), atol=1e-6, rtol=0)
        torch.testing.assert_close(cache[pre + "hook_v"], split(v), atol=1e-6, rtol=0)
        probs = attn.get_attention_scores(attn.head_to_batch_dim(q), attn.head_to_batch_dim(k))
        torch.testing.assert_close(cache[pre + "hook_pattern"], probs.view(b, heads, *probs.shape[1:]),
                                   atol=1e-6, rtol=1e-5)
        z = torch.bmm(probs, attn.head_to_batch_dim(v))
        torch.testing.assert_close(cache[pre + "hook_z"], attn.batch_to_head_dim(z).view(b, -1, heads, z.shape[-1]),
                                   atol=1e-5, rtol=1e-5)
        result = cache[pre + "hook_result"]
        assert result.shape == (b, x.shape[1], heads, attn.to_out[0].out_features)
        torch.testing.assert_close(result.sum(2) + attn.to_out[0].bias, seen[attn_name]["out"], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_interventions_match_manual_diffusers_edits(model):
    kind, unet, hooked, reference = model
    args, kwargs = _inputs(kind)
    path = "up_blocks.1.attentions.1" if kind == "sd" else "up_blocks.0.attentions.1"
    module = unet.get_submodule(path)
    # Zeroing channel 3 at hook_out (channel-last) == zeroing channel 3 of the diffusers block's output.
    def manual_zero(mod, a, out):
        y = out[0].clone()
        y[:, 3] = 0
        return (y,) + tuple(out[1:])

    handle = module.register_forward_hook(manual_zero)
    try:
        expected = unet(*args, **kwargs).sample
    finally:
        handle.remove()

    def zero_channel(act, hook):
        assert act.shape[-1] == module.in_channels  # channel-last
        act = act.clone()
        act[..., 3] = 0
        return act

    out = hooked.run_with_hooks(*args, fwd_hooks=[(f"{path}.hook_out", zero_channel)], **kwargs).sample
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    assert not torch.allclose(out, reference)
    # In-place edits (hook returns None) act the same way.
    def zero_inplace(act, hook):
        act[..., 3] = 0

    out_inplace = hooked.run_with_hooks(*args, fwd_hooks=[(f"{path}.hook_out", zero_inplace)], **kwargs).sample
    torch.testing.assert_close(out_inplace, expected, atol=1e-6, rtol=0)
    # Zeroing hook_update skips the block: same as replacing the diffusers block by the identity.
    handle = module.register_forward_hook(lambda mod, a, kw, out: (a[0] if a else kw["hidden_states"],),
                                          with_kwargs=True)
    try:
        skipped = unet(*args, **kwargs).sample
    finally:
        handle.remove()
    out = hooked.run_with_hooks(*args, fwd_hooks=[(f"{path}.hook_update", lambda a, hook: torch.zeros_like(a))],
                                **kwargs).sample
    torch.testing.assert_close(out, skipped, atol=1e-6, rtol=0)
    # hook_in edits reach the block.
    def manual_in(mod, a, kw):
        x = a[0] if a else kw["hidden_states"]
        return ((x * 2,) + a[1:], kw) if a else (a, {**kw, "hidden_states": x * 2})

    handle = module.register_forward_pre_hook(manual_in, with_kwargs=True)
    try:
        doubled = unet(*args, **kwargs).sample
    finally:
        handle.remove()
    out = hooked.run_with_hooks(*args, fwd_hooks=[(f"{path}.hook_in", lambda a, hook: a * 2)], **kwargs).sample
    torch.testing.assert_close(out, doubled, atol=1e-6, rtol=0)


@torch.no_grad()
def test_aliases_resolve_everywhere():
    torch.manual_seed(0)
    hooked = HookedUNet.from_pretrained(_tiny.sd_unet())
    args, kwargs = _inputs("sd")
    assert hooked.canonical_hook_name("up.1.1.hook_out") == "up_blocks.1.attentions.1.hook_out"
    assert hooked.canonical_hook_name("down.2.1.hook_in") == "down_blocks.2.attentions.1.hook_in"
    assert hooked.canonical_hook_name("mid.0.hook_out") == "mid_block.attentions.0.hook_out"
    assert hooked.aliases()["up.1.2"] == "up_blocks.1.attentions.2"
    _, cache = hooked.run_with_cache(*args, names_filter=["up.1.1.hook_out"], **kwargs)
    assert list(cache.keys()) == ["up_blocks.1.attentions.1.hook_out"]  # keyed by canonical name
    seen = []
    hooked.run_with_hooks(*args, fwd_hooks=[("up.1.1.transformer_blocks.0.attn2.hook_pattern",
                                             lambda a, hook: seen.append(hook.name))], **kwargs)
    assert seen == ["up_blocks.1.attentions.1.transformer_blocks.0.attn2.hook_pattern"]
    with pytest.raises(KeyError, match="up_blocks.1.attentions.1.hook_out") as err:
        hooked.run_with_cache(*args, names_filter=["up.1.1.hook_outt"], **kwargs)
    assert "docs/hooks-diffusion.md" in str(err.value)  # the denoisers' hook document, not the ViT one
    with pytest.raises(KeyError, match="docs/hooks-diffusion.md"):
        hooked.hook_spec("down_blocks.9.hook_out")
    with pytest.raises(KeyError, match="alias of 'up_blocks.7.attentions.0.hook_out'"):
        hooked.run_with_hooks(*args, fwd_hooks=[("up.7.0.hook_out", lambda a, hook: a)], **kwargs)


@torch.no_grad()
def test_sae_splicing_with_alias_and_width_check():
    torch.manual_seed(0)
    unet = _tiny.sd_unet()
    hooked = HookedUNet.from_pretrained(unet)
    args, kwargs = _inputs("sd")
    reference = hooked(*args, **kwargs).sample
    sae = StandardSAE(StandardSAEConfig(d_in=64, d_sae=128, metadata=SAEMetadata(hook_name="up.1.1.hook_out")))
    for p in sae.parameters():
        p.normal_(0, 0.1)
    spliced = hooked.run_with_saes(*args, saes=[sae], **kwargs).sample
    assert not torch.allclose(spliced, reference, atol=1e-3)
    with_error = hooked.run_with_saes(*args, saes=[sae], use_error_term=True, **kwargs).sample
    torch.testing.assert_close(with_error, reference, atol=1e-5, rtol=1e-5)
    assert sae.cfg.metadata.hook_name == "up.1.1.hook_out"  # the user's SAE config is left as it was
    assert isinstance(unet.up_blocks[1].attentions[1].hook_out, HookPoint)  # SAE removed again
    _, cache = hooked.run_with_cache_with_saes(*args, saes=[sae], names_filter=lambda n: "hook_sae_acts_post" in n,
                                               **kwargs)
    assert cache["up_blocks.1.attentions.1.hook_out.hook_sae_acts_post"].shape == (2, 4, 4, 128)
    wrong = StandardSAE(StandardSAEConfig(d_in=32, d_sae=64, metadata=SAEMetadata(hook_name="up.1.1.hook_out")))
    with pytest.raises(ValueError, match="width 64"):
        hooked.add_sae(wrong)
    per_head = StandardSAE(StandardSAEConfig(d_in=64, d_sae=64, reshape_activations="hook_z",
                                             metadata=SAEMetadata(hook_name="up.1.1.transformer_blocks.0.attn2.hook_z")))
    hooked.add_sae(per_head)  # 4 heads x 16: accepted
    assert hooked(*args, **kwargs).sample.shape == reference.shape
    hooked.reset_saes()
    assert torch.equal(hooked(*args, **kwargs).sample, reference)


@torch.no_grad()
def test_hooks_removed_when_a_hook_raises_and_timestep_visible():
    torch.manual_seed(0)
    hooked = HookedUNet.from_pretrained(_tiny.sd_unet())
    args, kwargs = _inputs("sd")
    reference = hooked(*args, **kwargs).sample

    def boom(act, hook):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        hooked.run_with_hooks(*args, fwd_hooks=[("mid.0.hook_out", boom)], **kwargs)
    assert not any(hp._forward_hooks for hp in hooked.hook_dict.values())
    assert hooked.current_timestep is None and current_timestep() is None
    assert torch.equal(hooked(*args, **kwargs).sample, reference)
    seen = []
    hooked.run_with_hooks(*args, fwd_hooks=[("mid.0.hook_out", lambda a, hook: seen.append(
        (current_timestep(), hooked.current_timestep, hooked.current_branch)))], **kwargs)
    assert seen == [(500, 500, None)]  # a bare denoiser call does not know its CFG branch


def test_from_pretrained_local_layouts_restore_and_unsupported(tmp_path):
    torch.manual_seed(0)
    unet = _tiny.sd_unet()
    unet.save_pretrained(tmp_path / "component")
    unet.save_pretrained(tmp_path / "pipeline" / "unet")
    args, kwargs = _inputs("sd")
    with torch.no_grad():
        reference = unet(*args, **kwargs).sample
    for path in (tmp_path / "component", tmp_path / "pipeline", str(tmp_path / "pipeline")):
        hooked = HookedUNet.from_pretrained(path)
        assert not any(p.data_ptr() == q.data_ptr() for p, q in zip(hooked.parameters(), unet.parameters()))
        with torch.no_grad():
            assert torch.equal(hooked(*args, **kwargs).sample, reference)
        assert set(hooked.state_dict()) == set(unet.state_dict())
    hooked = HookedUNet.from_pretrained(unet)
    assert hooked.config is unet.config and hooked.denoiser is unet  # original module kept, no copies
    assert all(p is q for p, q in zip(hooked.parameters(), unet.parameters()))
    with pytest.raises(FileNotFoundError, match="config.json"):
        HookedUNet.from_pretrained(tmp_path)
    with pytest.raises(TypeError, match="UNet2DConditionModel"):
        HookedUNet.from_pretrained(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="HookedDiT"):
        HookedUNet(_tiny.pixart_transformer())
    with pytest.raises(TypeError, match="FluxTransformer2DModel"):
        HookedDiT(unet)
    restored = hooked.restore()
    assert restored is unet
    assert not any(isinstance(m, HookPoint) for m in unet.modules())
    assert not any(isinstance(m.processor, HookedAttentionProcessor) for m in unet.modules() if hasattr(m, "processor"))
    assert not unet._forward_hooks and not unet._forward_pre_hooks
    with torch.no_grad():
        assert torch.equal(unet(*args, **kwargs).sample, reference)


@torch.no_grad()
def test_replaced_processor_is_rewrapped():
    from diffusers.models.attention_processor import AttnProcessor2_0

    torch.manual_seed(0)
    unet = _tiny.sd_unet()
    hooked = HookedUNet.from_pretrained(unet)
    unet.set_attn_processor(AttnProcessor2_0())  # a user swaps processors after wrapping
    args, kwargs = _inputs("sd")
    _, cache = hooked.run_with_cache(*args, names_filter=["mid.0.transformer_blocks.0.attn2.hook_pattern"], **kwargs)
    assert cache["mid_block.attentions.0.transformer_blocks.0.attn2.hook_pattern"].shape[-1] == 7
