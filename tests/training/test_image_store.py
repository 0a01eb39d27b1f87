"""Image activation store: token policies against the model's own run_with_cache, image sources
(tensor, folder, datasets, streaming), HookedCLIP, caching with resume."""

from __future__ import annotations

import pytest
import torch

from sae_lens_multimodal.training import ActivationCacheReader, CacheMismatchError, ImageActivationStore, cache_activations

from .conftest import make_vit

HOOK = "blocks.1.hook_resid_post"


def store_rows(store, hook):
    chunks = [c[hook] for _, _, c in store.iter_chunks()]
    return torch.cat([c.acts for c in chunks]), torch.cat([c.sample for c in chunks])


@pytest.mark.parametrize("policy", ["all", "cls", "patches"])
def test_token_policies_match_run_with_cache(vit, images, policy):
    hooks = [HOOK, "blocks.0.attn.hook_z", "hook_pooled"] if policy != "patches" else [HOOK, "blocks.0.attn.hook_z"]
    store = ImageActivationStore(vit, hooks, images, token_policy=policy, batch_size=10, progress=False)
    _, cache = vit.run_with_cache(images)
    n_prefix = vit.cfg.n_prefix_tokens
    for hook in hooks:
        ref = cache[hook]
        if ref.ndim == 4:  # (batch, tokens, heads, d_head) -> heads * d_head
            ref = ref.flatten(-2)
        if ref.ndim == 3:
            ref = {"all": ref, "cls": ref[:, :1], "patches": ref[:, n_prefix:]}[policy]
        else:
            ref = ref[:, None]
        acts, sample = store_rows(store, hook)
        torch.testing.assert_close(acts, ref.reshape(-1, ref.shape[-1]), rtol=1e-5, atol=1e-5)
        assert torch.equal(sample, torch.arange(len(images)).repeat_interleave(ref.shape[1]))
        assert store.d_in(hook) == ref.shape[-1]
    # the forward stops after the last block a hook needs
    assert ImageActivationStore(vit, "blocks.0.hook_resid_post", images, progress=False).stop_at_layer == 1


def test_bad_requests_name_the_problem(vit, images):
    with pytest.raises(KeyError, match="Did you mean"):
        ImageActivationStore(vit, "blocks.1.hook_resid_pots", images)
    with pytest.raises(ValueError, match="attention scores/patterns"):
        ImageActivationStore(vit, "blocks.0.attn.hook_pattern", images)
    no_cls = make_vit(has_cls_token=False, n_pos_prefix_tokens=0, pool_type="mean")
    with pytest.raises(ValueError, match="no CLS token"):
        next(ImageActivationStore(no_cls, HOOK, images, token_policy="cls", progress=False).iter_chunks())
    with pytest.raises(ValueError, match="one vector per image"):
        next(ImageActivationStore(vit, "hook_pooled", images, token_policy="patches", progress=False).iter_chunks())
    with pytest.raises(ValueError, match="preprocess"):
        ImageActivationStore(vit, HOOK, [object()], progress=False)  # PIL-like input, no preprocess known


def _pil_images(n):
    from PIL import Image

    g = torch.Generator().manual_seed(7)
    return [Image.fromarray((torch.rand(40, 40, 3, generator=g) * 255).to(torch.uint8).numpy()) for _ in range(n)]


def _preprocess(im):
    from torchvision.transforms.functional import pil_to_tensor, resize

    return resize(pil_to_tensor(im).float() / 255, [32, 32], antialias=True)


def test_folder_and_datasets_sources_give_the_same_rows(vit, tmp_path):
    import datasets

    pils = _pil_images(7)
    for i, im in enumerate(pils):
        im.save(tmp_path / f"img_{i:02d}.png")
    ref_pixels = torch.stack([_preprocess(im) for im in pils])
    ref, _ = store_rows(ImageActivationStore(vit, HOOK, ref_pixels, batch_size=3, progress=False), HOOK)

    folder = ImageActivationStore(vit, HOOK, str(tmp_path), preprocess=_preprocess, batch_size=3, progress=False)
    torch.testing.assert_close(store_rows(folder, HOOK)[0], ref, rtol=1e-5, atol=1e-5)
    assert folder.describe(HOOK)["source"]["kind"] == "folder"

    ds = datasets.Dataset.from_dict({"label": list(range(7)), "picture": [str(p) for p in sorted(tmp_path.glob("*.png"))]})
    ds = ds.cast_column("picture", datasets.Image())  # found as the image column by its feature type
    from_ds = ImageActivationStore(vit, HOOK, ds, preprocess=_preprocess, batch_size=3, progress=False)
    torch.testing.assert_close(store_rows(from_ds, HOOK)[0], ref, rtol=1e-5, atol=1e-5)

    stream = ds.to_iterable_dataset()
    streamed = ImageActivationStore(vit, HOOK, stream, preprocess=_preprocess, batch_size=3, progress=False)
    assert streamed.n_items is None
    torch.testing.assert_close(store_rows(streamed, HOOK)[0], ref, rtol=1e-5, atol=1e-5)
    # resuming mid-stream skips the first items
    start, _, chunk = next(streamed.iter_chunks(start_item=4))
    assert start == 4 and chunk[HOOK].sample[0] == 4
    torch.testing.assert_close(chunk[HOOK].acts, ref[4 * vit.cfg.n_ctx:7 * vit.cfg.n_ctx], rtol=1e-5, atol=1e-5)


def test_hooked_clip_vision_tower(tiny_clip, images):
    store = ImageActivationStore(tiny_clip, "vision.blocks.1.hook_resid_post", images[:6], token_policy="cls",
                                 progress=False)
    _, cache = tiny_clip.run_with_cache(images[:6], return_type="embeddings")
    acts, _ = store_rows(store, "vision.blocks.1.hook_resid_post")
    torch.testing.assert_close(acts, cache["vision.blocks.1.hook_resid_post"][:, 0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="text tower"):
        ImageActivationStore(tiny_clip, "text.blocks.0.hook_resid_post", images)


def test_cache_activations_resumes_after_interruption(vit, images, tmp_path, monkeypatch):
    hooks = [HOOK, "hook_pooled"]
    full = cache_activations(ImageActivationStore(vit, hooks, images, batch_size=4, progress=False),
                             tmp_path / "full", items_per_shard=8)
    store = ImageActivationStore(vit, hooks, images, batch_size=4, progress=False)
    original = store.source.batches
    calls = []

    def failing(batch_size, start=0, stop=None, align=None):
        for i, item in enumerate(original(batch_size, start, stop, align)):
            if i == 3:  # after 12 images: shard 0 (items 0..7) complete, shard 1 half done
                raise KeyboardInterrupt
            calls.append(item[0])
            yield item

    monkeypatch.setattr(store.source, "batches", failing)
    with pytest.raises(KeyboardInterrupt):
        cache_activations(store, tmp_path / "part", items_per_shard=8)
    monkeypatch.undo()
    assert [s.index for s in ActivationCacheReader(tmp_path / "part" / HOOK).shards] == [0]
    resumed_from = []
    store2 = ImageActivationStore(vit, hooks, images, batch_size=4, progress=False)
    orig2 = store2.iter_chunks

    def spy(start_item=0, stop_item=None, align=None):
        resumed_from.append(start_item)
        return orig2(start_item, stop_item, align)

    monkeypatch.setattr(store2, "iter_chunks", spy)
    part = cache_activations(store2, tmp_path / "part")  # items_per_shard read back from the cache
    assert resumed_from == [8]
    for hook in hooks:
        a, b = part[hook].read_all(), full[hook].read_all()
        assert torch.equal(a.acts, b.acts) and torch.equal(a.sample, b.sample)
        assert part[hook].metadata["token_policy"] == "all" and part[hook].metadata["hook_name"] == hook

    # another model's activations never go into this cache, and reading it for another model is refused
    other = make_vit(seed=1)
    with pytest.raises(CacheMismatchError, match="model"):
        cache_activations(ImageActivationStore(other, hooks, images, progress=False), tmp_path / "part")
    with pytest.raises(CacheMismatchError, match="was made by model"):
        part[HOOK].check(model=other)
    part[HOOK].check(model=vit, hook_name=HOOK, token_policy="all")
