"""HookedDiT over PixArt, DiT, SD3 (joint attention) and Flux (double- and single-stream) transformers."""

from __future__ import annotations

import pytest
import torch
from diffusers import DiTTransformer2DModel, SD3Transformer2DModel
from sae_lens import StandardSAE, StandardSAEConfig
from sae_lens.saes.sae import SAEMetadata

from sae_lens_multimodal.diffusion import HookedDiT
from tests.diffusion import _tiny


def _dit() -> DiTTransformer2DModel:
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                 num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()


BUILDERS = {"pixart": _tiny.pixart_transformer, "dit": _dit, "sd3": _tiny.sd3_transformer,
            "flux": _tiny.flux_transformer}


def _inputs(family: str) -> dict:
    g = torch.Generator().manual_seed(2)
    ctx = torch.randn(1, 7, _tiny.TEXT_DIM, generator=g)
    if family == "pixart":
        return {"hidden_states": torch.randn(1, 4, 8, 8, generator=g), "encoder_hidden_states": ctx,
                "timestep": torch.tensor([500]), "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
                "encoder_attention_mask": torch.tensor([[1, 1, 1, 1, 1, 0, 0]])}
    if family == "dit":
        return {"hidden_states": torch.randn(1, 4, 8, 8, generator=g), "timestep": torch.tensor([500]),
                "class_labels": torch.tensor([3])}
    if family == "sd3":
        return {"hidden_states": torch.randn(1, 4, 8, 8, generator=g), "encoder_hidden_states": ctx,
                "pooled_projections": torch.randn(1, _tiny.TEXT_DIM, generator=g), "timestep": torch.tensor([500.0])}
    ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1)
    return {"hidden_states": torch.randn(1, 16, 16, generator=g), "encoder_hidden_states": ctx,
            "pooled_projections": torch.randn(1, _tiny.TEXT_DIM, generator=g), "timestep": torch.tensor([0.5]),
            "img_ids": ids.reshape(-1, 3), "txt_ids": torch.zeros(7, 3), "guidance": torch.tensor([3.5])}


@pytest.fixture(scope="module", params=list(BUILDERS))
def model(request):
    torch.manual_seed(0)
    module = BUILDERS[request.param]()
    with torch.no_grad():
        reference = module(**_inputs(request.param)).sample
    return request.param, module, HookedDiT.from_pretrained(module), reference


@torch.no_grad()
def test_bit_identical_without_hooks_and_with_identity_hooks(model):
    family, _, hooked, reference = model
    kwargs = _inputs(family)
    assert torch.equal(hooked(**kwargs).sample, reference)
    identity = [(n, lambda a, hook: a) for n in hooked.hook_dict if "pattern" not in n and "scores" not in n]
    assert torch.equal(hooked.run_with_hooks(fwd_hooks=identity, **kwargs).sample, reference)
    patterns = [(n, lambda a, hook: a) for n in hooked.hook_dict if "pattern" in n or "scores" in n]
    torch.testing.assert_close(hooked.run_with_hooks(fwd_hooks=patterns, **kwargs).sample, reference,
                               atol=1e-5, rtol=1e-5)
    seen = []
    hooked.run_with_hooks(fwd_hooks=[("transformer_blocks.0.hook_out", lambda a, hook: seen.append(hooked.current_timestep))],
                          **kwargs)
    assert seen == [500.0 if family != "dit" else 500]  # Flux gets timestep/1000: reported in scheduler units


@torch.no_grad()
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_two_stream_block_hooks_equal_diffusers_tensors(family):
    torch.manual_seed(0)
    module = BUILDERS[family]()
    hooked = HookedDiT.from_pretrained(module)
    blocks = [p for p, m in module.named_modules() if type(m).__name__ in
              ("JointTransformerBlock", "FluxTransformerBlock", "FluxSingleTransformerBlock")]
    captured = {}
    handles = []
    for path in blocks:
        def grab(mod, a, kw, out, path=path):
            captured[path] = (kw["hidden_states"], kw["encoder_hidden_states"], out[1], out[0])

        handles.append(module.get_submodule(path).register_forward_hook(grab, with_kwargs=True))
    try:
        _, cache = hooked.run_with_cache(names_filter=lambda n: ".hook_in" in n or ".hook_out" in n
                                         or ".hook_update" in n, **_inputs(family))
    finally:
        for h in handles:
            h.remove()
    assert len(captured) == len(blocks) >= 3
    for path, (img_in, txt_in, img_out, txt_out) in captured.items():
        assert torch.equal(cache[f"{path}.hook_in"], img_in)
        assert torch.equal(cache[f"{path}.hook_in_text"], txt_in)
        assert torch.equal(cache[f"{path}.hook_out"], img_out)
        assert torch.equal(cache[f"{path}.hook_update"], img_out - img_in)
        if txt_out is None:  # SD3's last block drops the text stream
            assert f"{path}.hook_out_text" not in hooked.hook_dict
        else:
            assert torch.equal(cache[f"{path}.hook_out_text"], txt_out)
            assert torch.equal(cache[f"{path}.hook_update_text"], txt_out - txt_in)
        assert hooked.hook_width(f"{path}.hook_out") == img_out.shape[-1]


@torch.no_grad()
@pytest.mark.parametrize("family,attn_path,single", [
    ("sd3", "transformer_blocks.1.attn", False),
    ("sd3", "transformer_blocks.0.attn2", False),  # SD3.5 dual attention: image-only self-attention
    ("flux", "transformer_blocks.1.attn", False),
    ("flux", "single_transformer_blocks.0.attn", True),
])
def test_joint_attention_hooks_equal_diffusers_tensors(family, attn_path, single):
    torch.manual_seed(0)
    module = BUILDERS[family]()
    hooked = HookedDiT.from_pretrained(module)
    attn = module.get_submodule(attn_path)
    got: dict = {}
    handles = [attn.register_forward_pre_hook(lambda m, a, kw: got.update(x=kw["hidden_states"],
                                                                          ctx=kw.get("encoder_hidden_states")),
                                              with_kwargs=True),
               attn.register_forward_hook(lambda m, a, out: got.update(out=out))]
    if hasattr(attn, "to_out") and not single:
        handles += [attn.to_out[0].register_forward_pre_hook(lambda m, a: got.update(z_img=a[0])),
                    attn.to_out[0].register_forward_hook(lambda m, a, out: got.update(res_img=out))]
    if getattr(attn, "to_add_out", None) is not None:
        handles += [attn.to_add_out.register_forward_pre_hook(lambda m, a: got.update(z_txt=a[0])),
                    attn.to_add_out.register_forward_hook(lambda m, a, out: got.update(res_txt=out))]
    if single:  # the single-stream block concatenates [text, image]; its text length is needed below
        block = module.get_submodule(attn_path.rsplit(".", 1)[0])
        handles.append(block.register_forward_pre_hook(
            lambda m, a, kw: got.update(n_txt=kw["encoder_hidden_states"].shape[1]), with_kwargs=True))
    names = [n for n in hooked.hook_dict if n.startswith(attn_path + ".")]
    try:
        _, cache = hooked.run_with_cache(names_filter=names, **_inputs(family))
    finally:
        for h in handles:
            h.remove()
    c = {n.rsplit(".", 1)[1]: cache[n] for n in names}
    heads, x, ctx = attn.heads, got["x"], got["ctx"]
    split = lambda t: t.unflatten(-1, (heads, -1))  # noqa: E731
    q, k, v = attn.norm_q(split(attn.to_q(x))), attn.norm_k(split(attn.to_k(x))), split(attn.to_v(x))
    if single:  # queries of text tokens come first
        n_txt = got["n_txt"]
        q_txt, q, k_txt, k, v_txt, v = q[:, :n_txt], q[:, n_txt:], k[:, :n_txt], k[:, n_txt:], v[:, :n_txt], v[:, n_txt:]
    elif ctx is not None:
        q_txt = attn.norm_added_q(split(attn.add_q_proj(ctx)))
        k_txt = attn.norm_added_k(split(attn.add_k_proj(ctx)))
        v_txt = split(attn.add_v_proj(ctx))
    two_streams = single or ctx is not None
    for name, ref in (("hook_q", q), ("hook_k", k), ("hook_v", v)):
        torch.testing.assert_close(c[name], ref, atol=1e-6, rtol=0)
    if two_streams:
        for name, ref in (("hook_q_text", q_txt), ("hook_k_text", k_txt), ("hook_v_text", v_txt)):
            torch.testing.assert_close(c[name], ref, atol=1e-6, rtol=0)
    else:
        assert "hook_q_text" not in c and "hook_cross_pattern" not in c
    # z against diffusers' own pre-projection tensors (or the pre-only attention's output).
    if single:
        z_txt, z_img = split(got["out"])[:, :n_txt], split(got["out"])[:, n_txt:]
    else:
        z_img = split(got["z_img"])
        z_txt = split(got["z_txt"]) if "z_txt" in got else None
    torch.testing.assert_close(c["hook_z"], z_img, atol=1e-5, rtol=1e-5)
    if two_streams and z_txt is not None:
        torch.testing.assert_close(c["hook_z_text"], z_txt, atol=1e-5, rtol=1e-5)
    # The pattern is what produced diffusers' z: pattern @ V (V in the processor's sequence order).
    text_first = family == "flux"
    if two_streams:
        v_all = torch.cat([v_txt, v], 1) if text_first else torch.cat([v, v_txt], 1)
        z_all = torch.cat([c["hook_z_text"], c["hook_z"]], 1) if text_first else torch.cat([c["hook_z"], c["hook_z_text"]], 1)
    else:
        v_all, z_all = v, c["hook_z"]
    pattern = c["hook_pattern"]
    torch.testing.assert_close(pattern.sum(-1), torch.ones(pattern.shape[:-1]), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.einsum("bhqk,bkhd->bqhd", pattern, v_all), z_all, atol=1e-5, rtol=1e-5)
    if two_streams:
        n_t, n_i = v_txt.shape[1], v.shape[1]
        img_q, txt_k = (slice(n_t, None), slice(0, n_t)) if text_first else (slice(0, n_i), slice(n_i, None))
        assert torch.equal(c["hook_cross_pattern"], pattern[:, :, img_q, txt_k])
        assert c["hook_cross_pattern"].shape == (1, heads, n_i, n_t)
    if "res_img" in got:
        torch.testing.assert_close(c["hook_result"].sum(2) + attn.to_out[0].bias, got["res_img"], atol=1e-5, rtol=1e-5)
    if "res_txt" in got:
        torch.testing.assert_close(c["hook_result_text"].sum(2) + attn.to_add_out.bias, got["res_txt"],
                                   atol=1e-5, rtol=1e-5)
    if single:
        assert "hook_result" not in c  # pre-only attention: the block's proj_out mixes it with the MLP


@torch.no_grad()
def test_text_stream_intervention_and_sae_on_flux():
    torch.manual_seed(0)
    module = _tiny.flux_transformer()
    hooked = HookedDiT.from_pretrained(module)
    kwargs = _inputs("flux")
    reference = hooked(**kwargs).sample
    block = module.transformer_blocks[1]
    handle = block.register_forward_hook(lambda m, a, kw, out: (torch.zeros_like(out[0]), out[1]), with_kwargs=True)
    try:
        expected = module(**kwargs).sample
    finally:
        handle.remove()
    out = hooked.run_with_hooks(fwd_hooks=[("transformer_blocks.1.hook_out_text", lambda a, hook: torch.zeros_like(a))],
                                **kwargs).sample
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    assert not torch.allclose(out, reference)
    sae = StandardSAE(StandardSAEConfig(d_in=16, d_sae=32, metadata=SAEMetadata(hook_name="transformer_blocks.1.hook_out")))
    for p in sae.parameters():
        p.normal_(0, 0.1)
    torch.testing.assert_close(hooked.run_with_saes(saes=[sae], use_error_term=True, **kwargs).sample, reference,
                               atol=1e-5, rtol=1e-5)
    assert not torch.allclose(hooked.run_with_saes(saes=[sae], **kwargs).sample, reference, atol=1e-4)


def test_from_pretrained_directories(tmp_path):
    torch.manual_seed(0)
    module = _tiny.sd3_transformer()
    module.save_pretrained(tmp_path / "pipe" / "transformer")
    module.save_pretrained(tmp_path / "component")
    _tiny.sd_unet().save_pretrained(tmp_path / "unet_only")
    kwargs = _inputs("sd3")
    with torch.no_grad():  # (a loaded model differs from the in-memory one by float rounding in its buffers)
        reference = SD3Transformer2DModel.from_pretrained(tmp_path / "component")(**kwargs).sample
    for path in (tmp_path / "pipe", tmp_path / "component"):
        hooked = HookedDiT.from_pretrained(path)
        assert type(hooked.denoiser).__name__ == "SD3Transformer2DModel"
        with torch.no_grad():
            assert torch.equal(hooked(**kwargs).sample, reference)
    with pytest.raises(TypeError, match="UNet2DConditionModel; HookedDiT supports"):
        HookedDiT.from_pretrained(tmp_path / "unet_only")
