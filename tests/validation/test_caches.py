"""Activation caches with bad content (issue 15): holes (shards or their files deleted), damaged metadata,
manifests and .npy files are errors naming the file (or the missing item ranges) and the fix, never
fewer rows in silence; diffusion caches record the canonical hook name and the guidance scale used."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sae_lens_multimodal.core.files import UnreadableFileError
from sae_lens_multimodal.training.cache import (
    ActivationCacheReader,
    ActivationCacheWriter,
    ActivationChunk,
    CacheMismatchError,
    IncompleteCacheError,
    same_hook,
)
from tests.validation.test_training_cli import HOOK, write_cache


@pytest.fixture
def cache(tmp_path) -> Path:
    return write_cache(tmp_path / HOOK, n_items=40, per_shard=10)  # shards 0..3, items [10k, 10k + 10)


# ---------------------------------------------------------------------- holes
@pytest.mark.parametrize("deleted,ranges", [([2], [(20, 30)]), ([1, 2], [(10, 30)]), ([0, 3], [(0, 10), (30, 40)])])
def test_deleted_manifests_are_named_as_item_ranges(cache, deleted, ranges):
    for k in deleted:
        (cache / f"shard_{k:05d}.json").unlink()
    reader = ActivationCacheReader(cache)  # opening works: the shards it has can be inspected
    assert reader.missing_shards() == deleted and reader.missing_item_ranges() == ranges
    with pytest.raises(IncompleteCacheError) as err:
        reader.require_complete()
    message = str(err.value)
    for lo, hi in ranges:
        assert f"[{lo}, {hi})" in message
    assert str(cache) in message and "of 40" in message and "again" in message
    with pytest.raises(IncompleteCacheError):
        next(reader.iter_chunks())


def test_a_hole_is_refused_by_training_and_evaluation(cache):
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    from sae_lens_multimodal.training import train_sae
    from sae_lens_multimodal.training.evaluate import evaluate_sae

    (cache / "shard_00001.json").unlink()
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=16, d_sae=32, k=4))
    with pytest.raises(IncompleteCacheError, match=r"\[10, 20\)"):
        evaluate_sae(sae, cache)
    with pytest.raises(IncompleteCacheError, match=r"\[10, 20\)"):
        train_sae(sae, cache, total_training_samples=100, batch_size=50)


def test_a_hole_is_refused_by_the_data_parallel_row_order(cache):
    from sae_lens_multimodal.training.parallel_data import GlobalRowOrder

    (cache / "shard_00003.json").unlink()  # the last shard: only the item count can tell
    with pytest.raises(IncompleteCacheError, match=r"\[30, 40\)"):
        GlobalRowOrder(ActivationCacheReader(cache))


def test_holes_in_a_stream_of_unknown_length_are_seen_before_its_last_shard(tmp_path):
    meta = {"kind": "image", "model": {"name": "m", "fingerprint": "sha256:0"}, "hook_name": HOOK, "d_in": 4,
            "dtype": "float32", "token_policy": "all", "source": {"kind": "dataset", "n_items": None}, "diffusion": None}
    writer = ActivationCacheWriter(tmp_path, meta, 2)
    for k in (0, 1, 3):  # shard 2 never written
        writer.write_shard(k, ActivationChunk(torch.zeros(2, 4), torch.tensor([2 * k, 2 * k + 1])), (2 * k, 2 * k + 2))
    reader = ActivationCacheReader(tmp_path)
    assert reader.n_items is None and reader.missing_item_ranges() == [(4, 6)]
    with pytest.raises(IncompleteCacheError, match=r"\[4, 6\)"):
        reader.require_complete()


def test_a_deleted_or_truncated_shard_file_names_the_file_and_the_manifest_to_delete(cache):
    (cache / "shard_00001.sample.npy").unlink()
    with pytest.raises(FileNotFoundError) as err:
        ActivationCacheReader(cache)
    assert "shard_00001.sample.npy" in str(err.value) and "Delete shard_00001.json" in str(err.value)
    acts = cache / "shard_00002.acts.npy"
    (cache / "shard_00001.json").unlink()
    acts.write_bytes(acts.read_bytes()[:-4])
    with pytest.raises(ValueError, match="shard_00002.acts.npy is truncated") as err:
        ActivationCacheReader(cache)
    assert "Delete shard_00002.json" in str(err.value)


# ---------------------------------------------------------------------- damaged files
def _damage_header(path: Path, new: bytes) -> None:
    """Overwrite bytes inside the .npy header, keeping the file's size (so only the header can tell)."""
    data = bytearray(path.read_bytes())
    at = data.index(b"{")
    data[at:at + len(new)] = new
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [
    lambda p: p.write_bytes(b"GARBAGE!" + p.read_bytes()[8:]),        # magic bytes gone
    lambda p: _damage_header(p, b"{'descr': <f4, 'fortran"),           # header no longer a dict literal
    lambda p: _damage_header(p, b"\x00\xff\x00\xff\x00\xff"),           # binary noise in the header
], ids=["magic", "header-syntax", "header-noise"])
def test_a_damaged_npy_header_names_the_file(cache, damage):
    target = cache / "shard_00001.acts.npy"
    damage(target)
    with pytest.raises(UnreadableFileError) as err:
        ActivationCacheReader(cache)
    assert str(target) in str(err.value) and "shard_00001.json" in str(err.value)


def test_an_npy_of_another_shape_than_its_manifest_says_is_refused(cache):
    import numpy as np

    target = cache / "shard_00000.sample.npy"
    size = target.stat().st_size
    np.save(target, np.zeros(90, dtype=np.int64))  # 10 rows fewer than the manifest says...
    manifest = json.loads((cache / "shard_00000.json").read_text())
    manifest["files"]["sample"]["bytes"] = target.stat().st_size  # ...and a manifest that agrees on the size only
    (cache / "shard_00000.json").write_text(json.dumps(manifest))
    assert target.stat().st_size != size
    with pytest.raises(UnreadableFileError, match=r"shape \[90\].*\[100\]"):
        ActivationCacheReader(cache)


@pytest.mark.parametrize("name,what", [("metadata.json", "metadata"), ("shard_00002.json", "manifest")])
@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe\x00garbage", b""], ids=["syntax", "binary", "empty"])
def test_damaged_metadata_or_manifest_names_the_file(cache, name, what, content):
    (cache / name).write_bytes(content)
    with pytest.raises(UnreadableFileError) as err:
        ActivationCacheReader(cache)
    assert str(cache / name) in str(err.value) and what in str(err.value)


def test_a_writer_resuming_onto_damaged_metadata_names_it(cache):
    meta = json.loads((cache / "metadata.json").read_text())
    (cache / "metadata.json").write_text("{")
    with pytest.raises(UnreadableFileError, match="metadata.json"):
        ActivationCacheWriter(cache, meta, 10)


# ---------------------------------------------------------------------- hook aliases
ALIASES = {"up.0.1.hook_out": "up_blocks.0.attentions.1.hook_out", "mid.0.hook_out": "mid_block.attentions.0.hook_out",
           "down.1.0.attn1.hook_out": "down_blocks.1.attentions.0.attn1.hook_out"}


def test_the_static_alias_rule_is_the_pipelines():
    from sae_lens_multimodal.diffusion.hooked import HookedDenoiser

    unet = SimpleNamespace(mod_dict={}, family="unet")
    for alias, canonical in ALIASES.items():
        assert HookedDenoiser.canonical_hook_name(unet, alias) == canonical
        assert same_hook({"kind": "diffusion", "hook_name": alias}, canonical)
        assert same_hook({"kind": "diffusion", "hook_name": canonical}, alias)
    assert not same_hook({"kind": "diffusion", "hook_name": "up.0.1.hook_out"}, "up_blocks.0.attentions.0.hook_out")
    assert not same_hook({"kind": "image", "hook_name": "blocks.0.hook_resid_post"}, "blocks.1.hook_resid_post")


@pytest.fixture(scope="module")
def pipe():
    diffusers = pytest.importorskip("diffusers")
    from sae_lens_multimodal.diffusion import HookedDiffusionPipeline

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8,
    ).eval()
    return HookedDiffusionPipeline(denoiser=unet, scheduler=diffusers.DDIMScheduler(num_train_timesteps=1000))


def _store(pipe, hook, **pipeline_kwargs):
    from sae_lens_multimodal.training.diffusion_store import DiffusionActivationStore

    g = torch.Generator().manual_seed(1)
    prompts = [{"prompt_embeds": torch.randn(1, 3, 16, generator=g)} for _ in range(2)]
    return DiffusionActivationStore(pipe, hook, prompts, progress=False,
                                    pipeline_kwargs={"num_inference_steps": 2, **pipeline_kwargs})


def test_an_alias_is_cached_under_its_canonical_name_and_either_name_reads_it(pipe, tmp_path):
    from sae_lens_multimodal.training import cache_activations

    alias, canonical = "mid.0.hook_out", "mid_block.attentions.0.hook_out"
    reader = cache_activations(_store(pipe, alias), tmp_path)[alias]
    assert reader.metadata["hook_name"] == canonical and reader.metadata["hook_alias"] == alias
    assert reader.hook_name == canonical
    reader.check(hook_name=canonical).check(hook_name=alias)
    with pytest.raises(CacheMismatchError, match="hook_name"):
        reader.check(hook_name="up_blocks.1.attentions.0.hook_out")
    # the same command again resumes (no mismatch between the spellings)
    assert cache_activations(_store(pipe, alias), tmp_path)[alias].n_rows == reader.n_rows


def test_an_old_cache_with_the_alias_recorded_keeps_working(pipe, tmp_path):
    from sae_lens_multimodal.training import cache_activations

    alias, canonical = "mid.0.hook_out", "mid_block.attentions.0.hook_out"
    cache_activations(_store(pipe, alias), tmp_path)
    path = tmp_path / alias / "metadata.json"
    old = json.loads(path.read_text())
    old["hook_name"] = alias  # as written before canonical names were recorded
    del old["hook_alias"]
    path.write_text(json.dumps(old))
    ActivationCacheReader(tmp_path / alias).check(hook_name=canonical).check(hook_name=alias)
    resumed = cache_activations(_store(pipe, alias), tmp_path)[alias]  # the writer accepts it too
    assert resumed.metadata["hook_name"] == alias


# ---------------------------------------------------------------------- guidance scale
def test_the_guidance_scale_used_is_recorded(pipe):
    own_default = inspect.signature(pipe.pipe.__call__).parameters["guidance_scale"].default
    recorded = _store(pipe, "mid.0.hook_out").describe("mid.0.hook_out")["diffusion"]["pipeline_kwargs"]
    assert recorded["guidance_scale"] == own_default == 1.0  # the pipeline's own (no 7.5 from anywhere)
    given = _store(pipe, "mid.0.hook_out", guidance_scale=3.0).describe("mid.0.hook_out")
    assert given["diffusion"]["pipeline_kwargs"]["guidance_scale"] == 3.0


def test_cache_and_evaluate_guidance_defaults():
    from sae_lens_multimodal.training.cli_run import _pipeline_kwargs

    args = SimpleNamespace(num_inference_steps=20, guidance_scale=None, height=None, width=None, output_type=None)
    assert "guidance_scale" not in _pipeline_kwargs(args)  # the pipeline's default, not 7.5
    assert _pipeline_kwargs(args, 2.0)["guidance_scale"] == 2.0  # evaluate: the cache's recorded value
    args.guidance_scale = 5.0
    assert _pipeline_kwargs(args, 2.0)["guidance_scale"] == 5.0  # unless given


def test_shapes_diffusion_cache_records_its_own_guidance_and_the_canonical_hook(tmp_path, capsys):
    from sae_lens_multimodal.cli import main

    assert main(["cache", "--model", "shapes-diffusion", "--hook", "up.0.1.hook_out", "--prompt", "a red circle",
                 "--num-inference-steps", "2", "--out", str(tmp_path), "--no-progress"]) == 0
    meta = json.loads((tmp_path / "up.0.1.hook_out" / "metadata.json").read_text())
    assert meta["diffusion"]["pipeline_kwargs"]["guidance_scale"] == 2.0  # shapes-diffusion's own (trained at 2)
    assert meta["hook_name"] == "up_blocks.0.attentions.1.hook_out" and meta["hook_alias"] == "up.0.1.hook_out"
