"""On-disk activation cache: format, atomic shards, resume after interruption, identity checks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sae_lens_multimodal.training.cache import (
    FORMAT_VERSION,
    ActivationCacheReader,
    ActivationCacheWriter,
    ActivationChunk,
    CacheMismatchError,
    model_identity,
    write_activation_caches,
)

D = 6
ROWS_PER_ITEM = 3


def meta(hook="blocks.0.hook_resid_post", kind="diffusion", fingerprint="sha256:abc", dtype="float32"):
    return {"kind": kind, "model": {"name": "m", "class": "X", "fingerprint": fingerprint}, "hook_name": hook,
            "d_in": D, "dtype": dtype, "token_policy": "all", "source": {"kind": "tensor", "n_items": 10},
            "diffusion": None}


def fake_chunks(n_items=10, batch=3, fail_after=None):
    """Deterministic per-item rows: item i -> rows i*ROWS + r, with timestep labels."""
    for n_batches, start in enumerate(range(0, n_items, batch)):
        if fail_after is not None and n_batches == fail_after:
            raise KeyboardInterrupt("simulated interruption")
        end = min(start + batch, n_items)
        sample = torch.arange(start, end).repeat_interleave(ROWS_PER_ITEM)
        rows = torch.arange(start * ROWS_PER_ITEM, end * ROWS_PER_ITEM)
        acts = rows[:, None].float() + torch.arange(D) / 10
        yield start, end, {"h": ActivationChunk(acts, sample, (rows % 4).double() * 250, (rows % 2).to(torch.int8))}


def test_round_trip_and_layout(tmp_path):
    w = ActivationCacheWriter(tmp_path, meta(), items_per_shard=4)
    write_activation_caches(fake_chunks(), {"h": w}, n_items=10)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert "metadata.json" in names and not any(n.endswith(".tmp") for n in names)
    assert [n for n in names if n.endswith(".json") and n.startswith("shard")] == \
        ["shard_00000.json", "shard_00001.json", "shard_00002.json"]
    md = json.loads((tmp_path / "metadata.json").read_text())
    assert md["format_version"] == FORMAT_VERSION and md["items_per_shard"] == 4
    r = ActivationCacheReader(tmp_path)
    assert r.n_rows == 30 and [s.items for s in r.shards] == [(0, 4), (4, 8), (8, 10)]
    full = ActivationChunk.cat([c["h"] for _, _, c in fake_chunks()])
    got = r.read_all()
    assert torch.equal(got.acts, full.acts) and torch.equal(got.sample, full.sample)
    assert torch.equal(got.timestep, full.timestep) and torch.equal(got.branch, full.branch)
    assert r.timesteps() == [0.0, 250.0, 500.0, 750.0]
    # each shard is a plain .npy that numpy memory-maps
    arr = np.load(tmp_path / "shard_00001.acts.npy", mmap_mode="r")
    assert isinstance(arr, np.memmap) and arr.shape == (12, D)


def test_interrupted_run_resumes_to_the_same_cache(tmp_path):
    w = ActivationCacheWriter(tmp_path / "c", meta(), items_per_shard=4)
    with pytest.raises(KeyboardInterrupt):
        write_activation_caches(fake_chunks(fail_after=2), {"h": w}, n_items=10)  # items 0..5 processed
    r = ActivationCacheReader(tmp_path / "c")
    assert [s.index for s in r.shards] == [0]  # shard 1 (items 4..7) was incomplete: not visible
    # a crash in the middle of writing a file leaves only a *.tmp, which is never read and gets removed
    (tmp_path / "c" / "shard_00001.acts.npy.123.tmp").write_bytes(b"partial")
    w2 = ActivationCacheWriter(tmp_path / "c", meta(), items_per_shard=4)
    assert not list((tmp_path / "c").glob("*.tmp"))
    start = w2.first_missing_item(10)
    assert start == 4
    seen = []

    def from_start():
        for s, e, c in fake_chunks(batch=3):
            if e > start:
                seen.append(s)
                yield s, e, {"h": c["h"].select(c["h"].sample >= start)}

    write_activation_caches(from_start(), {"h": w2}, n_items=10)
    ref = ActivationCacheWriter(tmp_path / "ref", meta(), items_per_shard=4)
    write_activation_caches(fake_chunks(), {"h": ref}, n_items=10)
    a, b = ActivationCacheReader(tmp_path / "c").read_all(), ActivationCacheReader(tmp_path / "ref").read_all()
    assert torch.equal(a.acts, b.acts) and torch.equal(a.sample, b.sample)


def test_other_model_or_hook_is_refused(tmp_path):
    w = ActivationCacheWriter(tmp_path, meta(), items_per_shard=4)
    write_activation_caches(fake_chunks(), {"h": w}, n_items=10)
    with pytest.raises(CacheMismatchError, match="hook_name"):
        ActivationCacheWriter(tmp_path, meta(hook="blocks.1.hook_resid_post"), items_per_shard=4)
    with pytest.raises(CacheMismatchError, match="model"):
        ActivationCacheWriter(tmp_path, meta(fingerprint="sha256:other"), items_per_shard=4)
    r = ActivationCacheReader(tmp_path)
    with pytest.raises(CacheMismatchError, match="was made by model"):
        r.check(model={"name": "m", "fingerprint": "sha256:other"})
    with pytest.raises(CacheMismatchError, match="hook_name"):
        r.check(hook_name="blocks.3.hook_resid_post")
    r.check(model={"name": "m", "fingerprint": "sha256:abc"}, hook_name="blocks.0.hook_resid_post", d_in=D)


def test_newer_format_and_truncated_shards_are_refused(tmp_path):
    w = ActivationCacheWriter(tmp_path, meta(), items_per_shard=4)
    write_activation_caches(fake_chunks(), {"h": w}, n_items=10)
    md = json.loads((tmp_path / "metadata.json").read_text())
    md["format_version"] = FORMAT_VERSION + 1
    (tmp_path / "metadata.json").write_text(json.dumps(md))
    with pytest.raises(CacheMismatchError, match="Upgrade"):
        ActivationCacheReader(tmp_path)
    md["format_version"] = FORMAT_VERSION
    (tmp_path / "metadata.json").write_text(json.dumps(md))
    p = tmp_path / "shard_00000.acts.npy"
    p.write_bytes(p.read_bytes()[:-8])
    with pytest.raises(ValueError, match="truncated"):
        ActivationCacheReader(tmp_path)
    with pytest.raises(FileNotFoundError, match="No activation cache"):
        ActivationCacheReader(tmp_path / "nothing")


def test_bfloat16_and_float16_storage(tmp_path):
    for dtype in ("bfloat16", "float16"):
        d = tmp_path / dtype
        w = ActivationCacheWriter(d, meta(dtype=dtype, kind="image"), items_per_shard=5)
        chunks = [(s, e, {"h": ActivationChunk(c["h"].acts / 7, c["h"].sample)}) for s, e, c in fake_chunks()]
        write_activation_caches(iter(chunks), {"h": w}, n_items=10)
        got = ActivationCacheReader(d).read_all().acts
        assert got.dtype == getattr(torch, dtype)
        ref = torch.cat([c["h"].acts for _, _, c in chunks])
        assert torch.equal(got, ref.to(getattr(torch, dtype)))


def test_model_identity_tells_random_inits_apart():
    a, b = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
    assert model_identity(a)["fingerprint"] != model_identity(b)["fingerprint"]
    b.load_state_dict(a.state_dict())
    assert model_identity(a) == model_identity(b)
