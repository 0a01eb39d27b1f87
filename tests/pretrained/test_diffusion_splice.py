"""Diffusion SAEs loaded by name splice into HookedUNet / HookedDiT at the hook their release names.

Tiny diffusers denoisers (random weights, real block types) stand in for SDXL-Turbo / SD 1.5 / FLUX: the SAE
fixtures have the width of the tiny model's hook. A spliced run must equal a run whose hook activation is
replaced by the source format's own reconstruction (written in the sibling tests from the format description).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save
from sae_lens import SAE

diffusion = pytest.importorskip("sae_lens_multimodal.diffusion")

from tests.pretrained.test_sdxl_unbox import unbox_files, unbox_reference, unbox_spec  # noqa: E402
from tests.pretrained.test_sparsify import saeuron_cfg, sparsify_reference, sparsify_state, spec  # noqa: E402

WIDTH = 32


@pytest.fixture(scope="module")
def tiny_unet():
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng():
        torch.manual_seed(0)
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, WIDTH),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8,
        ).eval()
    return diffusion.HookedUNet.from_pretrained(unet)


def _unet_inputs():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(2, 4, 8, 8, generator=g), 10), {"encoder_hidden_states": torch.randn(2, 3, 16, generator=g)}


def _check_splice(model, sae, reference, args, kwargs, get=lambda out: out.sample):
    hook = sae.cfg.metadata.hook_name
    with torch.no_grad():
        expected = get(model.run_with_hooks(*args, fwd_hooks=[(hook, lambda act, hook: reference(act))], **kwargs))
        spliced = get(model.run_with_saes(*args, saes=[sae], **kwargs))
        clean = get(model(*args, **kwargs))
        exact = get(model.run_with_saes(*args, saes=[sae], use_error_term=True, **kwargs))
    torch.testing.assert_close(spliced, expected, atol=1e-4, rtol=1e-4)
    assert (spliced - clean).abs().max() > 1e-4  # the SAE was in the path
    torch.testing.assert_close(exact, clean, atol=1e-4, rtol=1e-4)


def test_sdxl_unbox_residual_update_sae_in_hooked_unet(hub, test_release, tiny_unet):
    k = 4
    folder = "unet.down_blocks.1.attentions.0_k4_hidden128_auxk16_bs4096_lr0.0001/final"
    files, sd, _ = unbox_files(WIDTH, 128, k, seed=4)
    hub.write_repo("sdxl-test/tiny-unbox", {f"{folder}/{n}": d for n, d in files.items()})
    test_release("test-unbox-unet", unbox_spec("sdxl-test/tiny-unbox", "down_blocks.1.attentions.0.hook_update", folder))
    sae = SAE.from_pretrained("test-unbox-unet", "down_blocks.1.attentions.0.hook_update")
    args, kwargs = _unet_inputs()
    _check_splice(tiny_unet, sae, lambda act: unbox_reference(act, sd, k)[1], args, kwargs)


def test_saeuron_block_output_sae_in_hooked_unet(hub, test_release, tiny_unet):
    k = 6
    sd = sparsify_state(WIDTH, WIDTH * 4, seed=5)
    folder = "unet.up_blocks.0.attentions.1"
    hub.write_repo("saeuron-test/tiny", {f"{folder}/cfg.json": json.dumps(saeuron_cfg(WIDTH, k, unit_norm=True)),
                                        f"{folder}/sae.safetensors": save(sd)})
    test_release("test-saeuron-unet", spec("saeuron-test/tiny", "up_blocks.0.attentions.1.hook_out", folder))
    sae = SAE.from_pretrained("test-saeuron-unet", "up_blocks.0.attentions.1.hook_out")
    args, kwargs = _unet_inputs()
    _check_splice(tiny_unet, sae, lambda act: sparsify_reference(act, sd, k, unit_norm=True)[1], args, kwargs)


def test_flux_image_stream_update_sae_in_hooked_dit(hub, test_release):
    from diffusers import FluxTransformer2DModel

    with torch.random.fork_rng():
        torch.manual_seed(0)
        flux = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                      attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                      pooled_projection_dim=16, axes_dims_rope=(2, 2, 4)).eval()
    model = diffusion.HookedDiT.from_pretrained(flux)
    k, d = 3, 16
    files, sd, _ = unbox_files(d, 64, k, seed=6, with_std=False)
    hub.write_repo("flux-test/tiny", files)
    release = unbox_spec("flux-test/tiny", "transformer_blocks.0.hook_update", "", model_class_name="HookedDiT")
    test_release("test-unbox-flux-dit", release)
    sae = SAE.from_pretrained("test-unbox-flux-dit", "transformer_blocks.0.hook_update")
    g = torch.Generator().manual_seed(2)
    kwargs = dict(hidden_states=torch.randn(2, 16, 4, generator=g), encoder_hidden_states=torch.randn(2, 5, 16, generator=g),
                  pooled_projections=torch.randn(2, 16, generator=g), timestep=torch.tensor([0.5, 0.5]),
                  img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(5, 3))
    _check_splice(model, sae, lambda act: unbox_reference(act, sd, k)[1], (), kwargs)
