"""open_clip CLIP ViTs -> HookedViT: exact equivalence against open_clip's own outputs.

Models are built by open_clip at their real configurations with random weights (``pretrained=None``).
open_clip initialises LayerNorms to (1, 0) and attention / MLP biases to 0, which would let a conversion that
drops them pass, so those are randomised before converting.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

open_clip = pytest.importorskip("open_clip")

from sae_lens_multimodal.models import HookedViT  # noqa: E402

TOL = 1e-4


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)

    def rnd(p: torch.Tensor, scale: float, shift: float = 0.0) -> None:
        p.copy_(torch.randn(p.shape, generator=g) * scale + shift)

    with torch.no_grad():
        for m in model.visual.modules():
            if isinstance(m, nn.LayerNorm):
                rnd(m.weight, 0.3, 1.0)
                rnd(m.bias, 0.2)
            elif isinstance(m, nn.MultiheadAttention) and m.in_proj_bias is not None:
                rnd(m.in_proj_bias, 0.05)
            elif isinstance(m, nn.Linear) and m.bias is not None:
                rnd(m.bias, 0.05)
    return model.eval()


def with_block_outputs(transformer: nn.Module, run: Callable[[], torch.Tensor]):
    """Run ``run()`` recording every residual block's output as [batch, pos, d] (hooks always removed)."""
    outs: dict[int, torch.Tensor] = {}

    def record(i: int):
        def hook(_m, _inp, out):
            out = out if transformer.batch_first else out.transpose(0, 1)
            outs[i] = out.detach().clone()

        return hook

    handles = [b.register_forward_hook(record(i)) for i, b in enumerate(transformer.resblocks)]
    try:
        result = run()
    finally:
        for h in handles:
            h.remove()
    return result, outs


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def make_case(name: str):
    model = randomize_(open_clip.create_model(name, pretrained=None))
    size = model.visual.image_size
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, ref_blocks = with_block_outputs(model.visual.transformer, lambda: model.encode_image(x))
    return name, model, x, ref, ref_blocks


@pytest.fixture(
    scope="module",
    params=["ViT-B-32", "ViT-B-16", "ViT-B-32-quickgelu", pytest.param("ViT-L-14", marks=pytest.mark.slow)],
)
def case(request):
    return make_case(request.param)


def test_equivalence_every_block_and_output(case):
    name, model, x, ref, ref_blocks = case
    hooked = HookedViT.from_pretrained(model)
    assert hooked.cfg.act_fn == ("quick_gelu" if "quickgelu" in name else "gelu")
    with torch.no_grad():
        out, cache = hooked.run_with_cache(x, names_filter=lambda n: n.endswith("hook_resid_post"))
    errs = {i: max_err(cache[f"blocks.{i}.hook_resid_post"], ref_blocks[i]) for i in range(hooked.cfg.n_layers)}
    assert len(errs) == len(model.visual.transformer.resblocks)
    assert max(errs.values()) <= TOL, f"{name}: per-block residual errors {errs}"
    assert max_err(out, ref) <= TOL, f"{name}: encode_image error {max_err(out, ref)}"


def test_matches_open_clip_forward_intermediates():
    # open_clip's own intermediates API (patch and prefix tokens returned separately).
    _, model, x, _, _ = make_case("ViT-B-32")
    hooked = HookedViT.from_pretrained(model.visual)  # the vision tower alone converts too
    with torch.no_grad():
        inter = model.visual.forward_intermediates(x, output_fmt="NLC", output_extra_tokens=True)
        _, cache = hooked.run_with_cache(x, names_filter=lambda n: n.endswith("hook_resid_post"))
    for i, (patches, prefix) in enumerate(zip(inter["image_intermediates"], inter["image_intermediates_prefix"])):
        assert max_err(cache[f"blocks.{i}.hook_resid_post"], torch.cat([prefix, patches], dim=1)) <= TOL, i


def test_fold_ln_and_center_writing_weights_keep_outputs(case):
    name, model, x, ref, _ = case
    hooked = HookedViT.from_pretrained(model, fold_ln=True, center_writing_weights=True)
    assert all(not b.ln1.has_weights and not b.ln2.has_weights for b in hooked.blocks)
    assert hooked.blocks[-1].mlp.W_out.mean(-1).abs().max() < 1e-6
    with torch.no_grad():
        assert max_err(hooked(x), ref) <= TOL, name


def test_pil_input_goes_through_open_clip_preprocess():
    from PIL import Image

    model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)
    randomize_(model)
    hooked = HookedViT.from_pretrained(model)
    gen = torch.Generator().manual_seed(2)
    images = [
        Image.fromarray(torch.randint(0, 256, (250, 300, 3), generator=gen, dtype=torch.uint8).numpy()),
        Image.fromarray(torch.randint(0, 256, (320, 240, 3), generator=gen, dtype=torch.uint8).numpy()),
    ]
    assert torch.equal(hooked.preprocess(images[0]), preprocess(images[0]))
    with torch.no_grad():
        ref = model.encode_image(torch.stack([preprocess(i) for i in images]))
        assert max_err(hooked(images), ref) <= TOL
        assert max_err(hooked(images[0]), ref[:1]) <= TOL  # a single PIL image is a batch of one


# ---------------------------------------------------------------- loading from open_clip's hub / local layout
# Loading is about files and names, not numerics, so a small custom model config keeps these tests cheap; the
# non-default preprocess config checks that HookedViT takes its preprocessing from the saved repo.
TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 128, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 100, "width": 64, "heads": 2, "layers": 1},
}
TINY_PREPROCESS = {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3], "interpolation": "bilinear", "resize_mode": "squash"}


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    """A tiny CLIP saved as open_clip's hub repos are: open_clip_config.json + weights, two weight formats."""
    import safetensors.torch
    from open_clip.push_to_hf_hub import save_config_for_hf

    config_only = tmp_path_factory.mktemp("oc_config")
    (config_only / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": TINY_CFG, "preprocess_cfg": TINY_PREPROCESS})
    )
    model = randomize_(open_clip.create_model(f"local-dir:{config_only}"))  # no weights there: random init
    assert model.visual.preprocess_cfg["resize_mode"] == "squash"
    folders = {}
    for fmt, weights in (("safetensors", "open_clip_model.safetensors"), ("bin", "open_clip_pytorch_model.bin")):
        folder = tmp_path_factory.mktemp(f"oc_{fmt}")
        save_config_for_hf(model, folder / "open_clip_config.json", model_config=TINY_CFG)  # open_clip's writer
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if fmt == "safetensors":
            safetensors.torch.save_file(state, str(folder / weights))
        else:
            torch.save(state, folder / weights)
        folders[fmt] = folder
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model.encode_image(x)
    return folders, x, ref


@pytest.fixture
def offline_hub_cache(tmp_path, monkeypatch):
    """An empty, offline Hugging Face cache (huggingface_hub reads these constants at call time)."""
    import huggingface_hub.constants as hf_constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    return cache


def make_hub_cache(cache: Path, repo_id: str, folder: Path) -> None:
    """Lay a folder's files out as huggingface_hub's cache stores a downloaded snapshot of ``repo_id``."""
    commit = "89abcdef0123456789abcdef0123456789abcdef"
    repo_dir = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for src in folder.iterdir():
        (snapshot / src.name).write_bytes(src.read_bytes())
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("prefix", ["open-clip:local-dir:", ""], ids=["open_clip_local_dir", "bare_path"])
def test_load_from_local_dir(saved_tiny, prefix, fmt):
    folders, x, ref = saved_tiny
    hooked = HookedViT.from_pretrained(f"{prefix}{folders[fmt]}")
    with torch.no_grad():
        assert max_err(hooked(x), ref) <= TOL


@pytest.mark.parametrize("name", ["open-clip:hf-hub:test-org/tiny-clip", "test-org/tiny-clip"], ids=["hf_hub", "bare_repo_id"])
def test_load_from_offline_hub_cache(saved_tiny, offline_hub_cache, name):
    from PIL import Image

    folders, x, ref = saved_tiny
    make_hub_cache(offline_hub_cache, "test-org/tiny-clip", folders["safetensors"])
    hooked = HookedViT.from_pretrained(name)
    with torch.no_grad():
        assert max_err(hooked(x), ref) <= TOL
    _, _, preprocess = open_clip.create_model_and_transforms("hf-hub:test-org/tiny-clip")
    image = Image.fromarray(torch.randint(0, 256, (50, 90, 3), dtype=torch.uint8).numpy())
    assert torch.equal(hooked.preprocess(image), preprocess(image))
