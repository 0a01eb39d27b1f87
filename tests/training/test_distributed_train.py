"""Distributed SAE training on CPU with gloo: 2 ranks with batch B/2 each train the same SAE as 1 rank with
batch B; distribute-modules trains each SAE as if alone; a run stopped after k steps and resumed (with
another number of ranks) ends with the weights of an uninterrupted run.

The two-rank runs happen once, in two processes started with torch.multiprocessing (one start for every
scenario, since each process start imports torch and SAELens); the one-rank references run here."""

from __future__ import annotations

import json
import socket
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from sae_lens import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig, TopKTrainingSAE, TopKTrainingSAEConfig

from sae_lens_multimodal.saes import TimestepBucketedTrainingSAE, TimestepBucketedTrainingSAEConfig
from sae_lens_multimodal.training.image_store import ImageActivationStore
from sae_lens_multimodal.training.cache import ActivationCacheReader, ActivationCacheWriter, ActivationChunk
from sae_lens_multimodal.training.parallel_data import GlobalRowOrder, rank_batches
from sae_lens_multimodal.training.parallel_modules import (
    HookSAE,
    RowMixer,
    train_buckets_distributed,
    train_saes_on_the_fly,
)
from sae_lens_multimodal.training.parallel_train import (
    ModuleJob,
    TrainingStopped,
    latest_checkpoint,
    save_sae_atomically,
    train_sae_data_parallel,
    train_saes_distributed,
)
from tests.training.conftest import make_vit

D_IN, D_SAE = 16, 32
# 12 steps of 64 rows on a 600-row cache: a second epoch, batches straddling the 200-row shuffle windows,
# dead-latent masks in play (window 2) and the norm scaling factor estimated from 2 batches
TRAIN = dict(total_training_samples=12 * 64, batch_size=64, lr=1e-2, dead_feature_window=2,
             n_batches_for_norm_estimate=2, window_rows=200, seed=3, progress=False)
STOP_AT = 5
# on the fly: 3 SAEs (hook, SAE seed) on 2 hooks of a tiny ViT (17 tokens of width 32 per image), 20 images,
# 8 per global step (a short last step of 4 per epoch), a second epoch, scaling factor from 2 batches
OTF_HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
OTF_JOBS = [(OTF_HOOKS[0], 20), (OTF_HOOKS[1], 21), (OTF_HOOKS[1], 22)]
OTF_TRAIN = dict(total_training_samples=6 * 64, batch_size=64, buffer_rows=128, images_per_step=8, lr=1e-2,
                 dead_feature_window=2, n_batches_for_norm_estimate=2, seed=5, progress=False)


def write_cache(directory: Path, seed: int, hook: str = "blocks.0.hook_resid_post", shards: int = 4,
                rows_per_shard: int = 150) -> Path:
    gen = torch.Generator().manual_seed(seed)
    meta = {"kind": "image", "model": {"name": "m", "class": "X", "fingerprint": "sha256:abc"}, "hook_name": hook,
            "d_in": D_IN, "dtype": "float32", "token_policy": "all", "source": {"kind": "tensor"}, "diffusion": None}
    writer = ActivationCacheWriter(directory, meta, items_per_shard=rows_per_shard)
    scale = torch.rand(D_IN, generator=gen) * 3
    for k in range(shards):
        acts = torch.randn(rows_per_shard, D_IN, generator=gen) * scale + 0.5
        sample = torch.arange(k * rows_per_shard, (k + 1) * rows_per_shard)
        writer.write_shard(k, ActivationChunk(acts, sample), (k * rows_per_shard, (k + 1) * rows_per_shard))
    return directory


def write_labelled_cache(directory: Path, seed: int = 2, shards: int = 3, rows_per_shard: int = 200) -> Path:
    """A diffusion-style cache: rows at timesteps 100 / 300 / 700 / 900 whose subspace depends on the timestep."""
    gen = torch.Generator().manual_seed(seed)
    meta = {"kind": "diffusion", "model": {"name": "m", "class": "X", "fingerprint": "sha256:abc"},
            "hook_name": "down.0", "d_in": D_IN, "dtype": "float32", "token_policy": "all",
            "source": {"kind": "tensor"}, "diffusion": {"num_train_timesteps": 1000}}
    writer = ActivationCacheWriter(directory, meta, items_per_shard=rows_per_shard)
    for k in range(shards):
        # t=700 (the second bucket) is rare: often absent from one rank's half of a batch
        pick = torch.multinomial(torch.tensor([0.45, 0.3, 0.03, 0.22]), rows_per_shard, replacement=True, generator=gen)
        t = torch.tensor([100.0, 300.0, 700.0, 900.0])[pick]
        acts = torch.randn(rows_per_shard, D_IN, generator=gen)
        acts[t < 500, 8:] = 0
        acts[t >= 500, :8] = 0
        writer.write_shard(k, ActivationChunk(acts, torch.arange(k * rows_per_shard, (k + 1) * rows_per_shard), t.double(),
                                              torch.ones(rows_per_shard, dtype=torch.int8)),
                           (k * rows_per_shard, (k + 1) * rows_per_shard))
    return directory


def make_bucketed_sae(seed: int) -> TimestepBucketedTrainingSAE:
    """Two buckets; rows at t=900 are outside both (skipped in training)."""
    torch.manual_seed(seed)
    return TimestepBucketedTrainingSAE(TimestepBucketedTrainingSAEConfig(
        d_in=D_IN, d_sae=D_SAE, inner_architecture="topk", inner_config={"k": 3},
        timestep_ranges=[[0, 500], [500, 800]], num_train_timesteps=1000))


def make_three_bucket_sae(seed: int) -> TimestepBucketedTrainingSAE:
    """Buckets of t=100, t=300 and t=900 (rows at t=700 are in none), one scaling factor per bucket."""
    torch.manual_seed(seed)
    return TimestepBucketedTrainingSAE(TimestepBucketedTrainingSAEConfig(
        d_in=D_IN, d_sae=D_SAE, inner_architecture="topk", inner_config={"k": 3},
        timestep_ranges=[[0, 200], [200, 500], [800, 1000]], num_train_timesteps=1000,
        normalize_activations="expected_average_only_in"))


BUCKETS_TRAIN = {**TRAIN, "total_training_samples": 6 * 64}


def make_sae(seed: int) -> TopKTrainingSAE:
    torch.manual_seed(seed)
    return TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4,
                                                 normalize_activations="expected_average_only_in"))


def otf_images() -> torch.Tensor:
    return torch.randn(20, 3, 32, 32, generator=torch.Generator().manual_seed(7))


def otf_sae(seed: int) -> TopKTrainingSAE:
    torch.manual_seed(seed)
    return TopKTrainingSAE(TopKTrainingSAEConfig(d_in=32, d_sae=64, k=4, normalize_activations="expected_average_only_in"))


def otf_run(root, rank: int, world: int) -> tuple[list, list[int]]:
    """The on-the-fly jobs on ``world`` ranks; returns this rank's SAEs and the batch size of every model forward."""
    vit = make_vit()
    forwards: list[int] = []
    vit.register_forward_pre_hook(lambda module, args: forwards.append(args[0].shape[0]))
    store = ImageActivationStore(vit, OTF_HOOKS, otf_images(), batch_size=8 // world, progress=False)
    jobs = [HookSAE(h, partial(otf_sae, s), None if root is None else root / f"otf{i}") for i, (h, s) in enumerate(OTF_JOBS)]
    return train_saes_on_the_fly(store, jobs, rank=rank, world_size=world, **OTF_TRAIN), forwards


def make_batchtopk_sae(seed: int) -> BatchTopKTrainingSAE:
    torch.manual_seed(seed)
    return BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4, topk_threshold_lr=0.1))


def weights(sae: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone().contiguous() for k, v in sae.state_dict().items()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stat(pid: int) -> list[str]:
    """Fields of /proc/<pid>/stat after the command name: [state, ppid, ...]."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int(_stat(int(entry.name))[1]) == pid:
                    out.append(int(entry.name))
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue
    return out


def _alive(pid: int) -> bool:
    try:
        return _stat(pid)[0] != "Z"
    except FileNotFoundError:
        return False


def _rank_main(rank: int, world: int, port: int, root: str) -> None:
    """Every two-rank scenario, in one process per rank (spawned)."""
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from sae_lens_multimodal.training.distributed import destroy_distributed, init_distributed

    init_distributed("cpu")
    out = Path(root)
    try:
        # data-parallel: each rank starts from a different init; rank 0's is broadcast
        sae = make_sae(seed=rank)
        train_sae_data_parallel(sae, out / "a", **TRAIN)
        if rank == 0:
            save_file(weights(sae), str(out / "dp.safetensors"))
        # data-parallel BatchTopK: the top k x 64 activations of the global batch, not of each rank's 32 rows
        sae = make_batchtopk_sae(seed=rank)
        train_sae_data_parallel(sae, out / "a", **TRAIN)
        if rank == 0:
            save_file(weights(sae), str(out / "dp_batchtopk.safetensors"))
        # data-parallel, timestep-bucketed (per-bucket dead-latent counters, rows outside the buckets skipped)
        sae = make_bucketed_sae(seed=rank)
        train_sae_data_parallel(sae, out / "t", **{**TRAIN, "normalize_per_bucket": True})
        if rank == 0:
            save_file(weights(sae), str(out / "dp_bucketed.safetensors"))
        # distribute modules: 3 SAEs over 2 ranks
        jobs = [ModuleJob(partial(make_sae, i), out / c, out / f"module{i}") for i, c in enumerate(("a", "b", "a"))]
        mine = train_saes_distributed(jobs, **{**TRAIN, "total_training_samples": 6 * 64})
        (out / f"modules_rank{rank}.json").write_text(json.dumps([s is not None for s in mine]))
        # the buckets of a timestep-bucketed SAE as modules: 3 buckets over 2 ranks, assembled and saved by rank 0
        train_buckets_distributed(make_three_bucket_sae(seed=rank), out / "t", out=out / "buckets", **BUCKETS_TRAIN)
        # distribute modules on the fly: one shared forward per step, rows gathered to each SAE's rank
        mine, forwards = otf_run(out, rank, world)
        (out / f"otf_rank{rank}.json").write_text(json.dumps({"mine": [s is not None for s in mine],
                                                               "forwards": forwards}))
        # a run stopped after STOP_AT steps (checkpoint every 2 steps, keep 2)
        with pytest.raises(TrainingStopped):
            train_sae_data_parallel(make_sae(seed=0), out / "a", checkpoint_dir=out / "ckpt", checkpoint_every=2,
                                    stop_after_steps=STOP_AT, **TRAIN)
    finally:
        destroy_distributed()


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dist")
    write_cache(root / "a", seed=0)
    write_cache(root / "b", seed=1, hook="blocks.1.hook_resid_post", shards=3)
    write_labelled_cache(root / "t")
    for attempt in range(2):
        try:
            mp.spawn(_rank_main, args=(2, _free_port(), str(root)), nprocs=2, join=True)
            break
        except mp.ProcessRaisedException as e:  # the free port was taken before rank 0 bound it: once more
            if attempt or "address already in use" not in str(e).lower():
                raise
    return root


@pytest.fixture(scope="module")
def one_rank_reference(two_rank_run) -> dict[str, torch.Tensor]:
    sae = make_sae(seed=0)
    train_sae_data_parallel(sae, two_rank_run / "a", world_size=1, rank=0, **TRAIN)
    return weights(sae)


def test_rank_slices_are_disjoint_and_make_up_the_one_rank_batch(tmp_path):
    order = GlobalRowOrder(ActivationCacheReader(write_cache(tmp_path / "c", seed=0)), seed=1, window_rows=70)
    one = list(zip(range(15), rank_batches(order, 40)))  # 600 rows: 15 batches, crossing windows and an epoch
    halves = [list(zip(range(15), rank_batches(order, 40, rank=r, world_size=2))) for r in (0, 1)]
    for (_, whole), (_, a), (_, b) in zip(one, *halves):
        assert len(a) == len(b) == 20
        assert torch.equal(torch.cat([a.acts, b.acts]), whole.acts)
        assert not set(a.sample.tolist()) & set(b.sample.tolist())
    rows = torch.cat([whole.sample for _, whole in one])
    assert sorted(rows.tolist()) == list(range(600))  # every row once per epoch
    resumed = next(rank_batches(order, 40, rank=1, world_size=2, start_batch=9))
    assert torch.equal(resumed.acts, halves[1][9][1].acts)
    with pytest.raises(ValueError, match="multiple of 3"):
        next(rank_batches(order, 40, rank=0, world_size=3))


def test_two_ranks_with_half_batches_train_the_one_rank_sae(two_rank_run, one_rank_reference):
    assert_same(load_file(str(two_rank_run / "dp.safetensors")), one_rank_reference)
    init = weights(make_sae(seed=0))
    assert not torch.allclose(init["W_enc"], one_rank_reference["W_enc"], atol=1e-3)  # it did train


def test_two_ranks_train_the_one_rank_batchtopk_sae(two_rank_run):
    sae = make_batchtopk_sae(seed=0)
    train_sae_data_parallel(sae, two_rank_run / "a", world_size=1, rank=0, **TRAIN)
    assert_same(load_file(str(two_rank_run / "dp_batchtopk.safetensors")), weights(sae))
    assert sae.topk_threshold > 0  # the threshold estimate moved with the smallest kept activations


def test_two_ranks_train_the_one_rank_timestep_bucketed_sae(two_rank_run):
    sae = make_bucketed_sae(seed=0)
    train_sae_data_parallel(sae, two_rank_run / "t", world_size=1, rank=0, **{**TRAIN, "normalize_per_bucket": True})
    assert_same(load_file(str(two_rank_run / "dp_bucketed.safetensors")), weights(sae))
    assert (sae.steps_since_fired > 0).any()  # the per-bucket dead-latent counters were in play


def test_distribute_modules_trains_each_sae_as_alone(two_rank_run, tmp_path):
    assert json.loads((two_rank_run / "modules_rank0.json").read_text()) == [True, False, True]
    assert json.loads((two_rank_run / "modules_rank1.json").read_text()) == [False, True, False]
    for i, cache in enumerate(("a", "b", "a")):
        alone = make_sae(i)
        train_sae_data_parallel(alone, two_rank_run / cache, world_size=1, rank=0,
                                **{**TRAIN, "total_training_samples": 6 * 64})
        save_sae_atomically(alone, tmp_path / f"alone{i}")
        got = load_file(str(two_rank_run / f"module{i}" / "sae_weights.safetensors"))
        assert_same(got, load_file(str(tmp_path / f"alone{i}" / "sae_weights.safetensors")))
        cfg = json.loads((two_rank_run / f"module{i}" / "cfg.json").read_text())
        assert cfg["metadata"]["hook_name"] == f"blocks.{1 if cache == 'b' else 0}.hook_resid_post"


def test_distribute_modules_on_the_fly_one_forward_per_step_equals_one_process(two_rank_run, tmp_path):
    ref, ref_forwards = otf_run(None, 0, 1)
    ranks = [json.loads((two_rank_run / f"otf_rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["mine"] == [True, False, True] and ranks[1]["mine"] == [False, True, False]  # round-robin
    # one forward per global step on each rank, of its half of the step's images (8, 8, 4 per epoch)
    assert len(ref_forwards) >= 4 and ref_forwards[:4] == [8, 8, 4, 8]
    assert ranks[0]["forwards"] == ranks[1]["forwards"] == [n // 2 for n in ref_forwards]
    for i, sae in enumerate(ref):
        save_sae_atomically(sae, tmp_path / f"ref{i}")
        assert_same(load_file(str(two_rank_run / f"otf{i}" / "sae_weights.safetensors")),
                    load_file(str(tmp_path / f"ref{i}" / "sae_weights.safetensors")))
        cfg = json.loads((two_rank_run / f"otf{i}" / "cfg.json").read_text())
        assert cfg["metadata"]["hook_name"] == OTF_JOBS[i][0]
    trained_alike = load_file(str(tmp_path / "ref2" / "sae_weights.safetensors"))["W_enc"]
    assert not torch.allclose(load_file(str(tmp_path / "ref1" / "sae_weights.safetensors"))["W_enc"], trained_alike)


def test_on_the_fly_training_is_sae_lens_fit_on_run_with_cache_rows(two_rank_run, tmp_path):
    """The one-process reference itself: SAELens's SAETrainer.fit on the rows run_with_cache gives for the same
    images per step, mixed by the same seeded buffer, trains the SAE the on-the-fly path trains (job 1)."""
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    vit, images, hook = make_vit(), otf_images(), OTF_JOBS[1][0]

    def provider():
        mixer = RowMixer(64, 128, generator=torch.Generator().manual_seed(OTF_TRAIN["seed"] * 1_000_003 + 1))
        for step in range(10_000):
            lo = (step % 3) * 8
            _, cache = vit.run_with_cache(images[lo:lo + 8], names_filter=[hook])
            rows = cache[hook].reshape(-1, 32)
            yield from (b.acts for b in mixer.add(ActivationChunk(rows, torch.zeros(len(rows), dtype=torch.long))))

    sae = otf_sae(OTF_JOBS[1][1])
    cfg = SAETrainerConfig(total_training_samples=6 * 64, train_batch_size_samples=64, lr=1e-2, lr_end=1e-2,
                           device="cpu", dead_feature_window=2, feature_sampling_window=2000,
                           n_batches_for_norm_estimate=2)
    SAETrainer(cfg=cfg, sae=sae, data_provider=provider()).fit()
    save_sae_atomically(sae, tmp_path / "fit")
    assert_same(load_file(str(two_rank_run / "otf1" / "sae_weights.safetensors")),
                load_file(str(tmp_path / "fit" / "sae_weights.safetensors")))


def test_buckets_as_modules_equal_one_process_training_of_the_buckets(two_rank_run, tmp_path):
    from sae_lens import SAE

    train_buckets_distributed(make_three_bucket_sae(seed=0), two_rank_run / "t", out=tmp_path / "ref", world_size=1,
                              rank=0, **BUCKETS_TRAIN)
    got = load_file(str(two_rank_run / "buckets" / "sae_weights.safetensors"))
    assert_same(got, load_file(str(tmp_path / "ref" / "sae_weights.safetensors")))
    # bucket 1 is a TopK SAE with its initial weights trained alone on the rows at t=300, its own norm factor folded
    alone = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=3,
                                                  normalize_activations="expected_average_only_in"))
    alone.load_state_dict(make_three_bucket_sae(seed=0).bucket_sae(1).state_dict())
    train_sae_data_parallel(alone, two_rank_run / "t", world_size=1, rank=0,
                            row_filter=lambda chunk: chunk.select(chunk.timestep == 300), **BUCKETS_TRAIN)
    save_sae_atomically(alone, tmp_path / "alone")
    assert_same({k[len("buckets.1."):]: v for k, v in got.items() if k.startswith("buckets.1.")},
                load_file(str(tmp_path / "alone" / "sae_weights.safetensors")))
    assembled = SAE.load_from_disk(str(two_rank_run / "buckets"))
    assert assembled.cfg.normalize_activations == "none" and assembled.cfg.bucket_scaling_factors is None
    assert not torch.allclose(got["buckets.0.W_enc"], got["buckets.2.W_enc"])


def test_train_command_distributes_the_buckets_of_one_cache(two_rank_run, tmp_path):
    """`sae-lens-mm train --distribute-modules` on one diffusion cache with a timestep_bucketed SAE trains its
    buckets as modules (here in one process) and saves the SAE train_buckets_distributed assembles."""
    from sae_lens_multimodal.cli import main

    argv = ["train", "--cache", str(two_rank_run / "t"), "--architecture", "timestep_bucketed", "--inner-architecture",
            "topk", "--k", "3", "--d-sae", str(D_SAE), "--timestep-ranges", "0:200,200:500,800:1000",
            "--normalize-activations", "expected_average_only_in", "--total-training-samples", "384", "--batch-size",
            "64", "--lr", "0.01", "--dead-feature-window", "2", "--seed", "3", "--distribute-modules"]
    assert main([*argv, "--out", str(tmp_path / "cli")]) == 0
    train_buckets_distributed(make_three_bucket_sae(seed=3), two_rank_run / "t", out=tmp_path / "ref", world_size=1, rank=0,
                              total_training_samples=384, batch_size=64, lr=0.01, dead_feature_window=2, seed=3,
                              device="cpu", progress=False)
    assert_same(load_file(str(tmp_path / "cli" / "sae_weights.safetensors")),
                load_file(str(tmp_path / "ref" / "sae_weights.safetensors")))
    with pytest.raises(ValueError, match="timestep_bucketed"):
        main(["train", "--cache", str(two_rank_run / "a"), "--d-sae", str(D_SAE), "--k", "4", "--total-training-samples",
              "64", "--batch-size", "64", "--distribute-modules", "--out", str(tmp_path / "x"), "--debug"])


def test_stopped_run_resumes_to_the_uninterrupted_sae_with_another_rank_count(two_rank_run, one_rank_reference):
    ckpt = two_rank_run / "ckpt"
    assert sorted(p.name for p in ckpt.iterdir()) == ["step_000000004", "step_000000005"]  # keeps the last 2
    half = ckpt / ".step_000000006.new-x"  # what a write killed mid-way leaves: hidden, never picked
    half.mkdir()
    (half / "progress.json").write_text("{")
    assert latest_checkpoint(ckpt).name == "step_000000005"
    progress = json.loads((latest_checkpoint(ckpt) / "progress.json").read_text())
    # 2 norm-estimate batches + 5 training batches served
    assert progress["steps"] == STOP_AT and progress["world_size"] == 2 and progress["data_batches"] == 2 + STOP_AT
    sae = make_sae(seed=11)  # another init: the weights must come from the checkpoint
    with pytest.raises(ValueError, match="global_batch_size=64"):
        train_sae_data_parallel(make_sae(seed=11), two_rank_run / "a", checkpoint_dir=ckpt, resume=True,
                                world_size=1, rank=0, **{**TRAIN, "batch_size": 32})
    train_sae_data_parallel(sae, two_rank_run / "a", checkpoint_dir=ckpt, resume=True, world_size=1, rank=0, **TRAIN)
    assert_same(weights(sae), one_rank_reference)


def test_torchrun_train_command_stops_and_resumes_on_one_rank(two_rank_run, tmp_path):
    """`torchrun --nproc-per-node=2 -m sae_lens_multimodal train ... --stop-after-steps 3`, then the same command
    with --resume in one process, saves the SAE of an uninterrupted one-process run."""
    import os
    import subprocess
    import sys

    from sae_lens_multimodal.cli import main

    cache = two_rank_run / "a"
    args = ["train", "--cache", str(cache), "--d-sae", str(D_SAE), "--k", "4", "--total-training-samples", "384",
            "--batch-size", "64", "--lr", "0.01", "--dead-feature-window", "2", "--seed", "3",
            "--normalize-activations", "expected_average_only_in", "--checkpoint-every", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
                          f"--master-port={_free_port()}", "-m", "sae_lens_multimodal", *args, "--out",
                          str(tmp_path / "sae"), "--checkpoint-path", str(tmp_path / "ck"), "--stop-after-steps", "3"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Stopped after 3 steps" in run.stdout and not (tmp_path / "sae").exists()
    assert "node 0, 2 ranks" in run.stderr  # one bar, on local rank 0, counting both ranks
    assert json.loads((latest_checkpoint(tmp_path / "ck") / "progress.json").read_text())["world_size"] == 2
    assert main([*args, "--out", str(tmp_path / "sae"), "--checkpoint-path", str(tmp_path / "ck"), "--resume"]) == 0
    assert main([*args, "--out", str(tmp_path / "ref"), "--checkpoint-path", str(tmp_path / "ck_ref")]) == 0
    assert_same(load_file(str(tmp_path / "sae" / "sae_weights.safetensors")),
                load_file(str(tmp_path / "ref" / "sae_weights.safetensors")))


def test_sigkilled_torchrun_run_resumes_to_the_uninterrupted_sae(two_rank_run, tmp_path):
    """SIGKILL a 2-rank `torchrun ... train` that checkpoints every step, at any moment after step 10 (possibly in
    the middle of a checkpoint write); the same command with --resume in one process ends with the weights of an
    uninterrupted run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from sae_lens_multimodal.cli import main

    args = ["train", "--cache", str(two_rank_run / "a"), "--d-sae", str(D_SAE), "--k", "4", "--total-training-samples",
            str(300 * 64), "--batch-size", "64", "--lr", "0.01", "--dead-feature-window", "2", "--seed", "3",
            "--checkpoint-every", "1"]
    ck = tmp_path / "ck"
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                             "--master-addr=127.0.0.1", f"--master-port={_free_port()}", "-m", "sae_lens_multimodal",
                             *args, "--out", str(tmp_path / "sae"), "--checkpoint-path", str(ck)],
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (latest_checkpoint(ck) and int(latest_checkpoint(ck).name[5:]) >= 10):
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    workers = _children(proc.pid)  # torchrun starts its workers in sessions of their own: kill them by pid
    assert len(workers) == 2
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    proc.kill()
    proc.wait()
    while any(_alive(pid) for pid in workers):
        time.sleep(0.01)
    assert not (tmp_path / "sae").exists() and int(latest_checkpoint(ck).name[5:]) < 300
    assert main([*args, "--out", str(tmp_path / "sae"), "--checkpoint-path", str(ck), "--resume"]) == 0
    assert main([*args, "--out", str(tmp_path / "ref"), "--checkpoint-path", str(tmp_path / "ck_ref")]) == 0
    assert_same(load_file(str(tmp_path / "sae" / "sae_weights.safetensors")),
                load_file(str(tmp_path / "ref" / "sae_weights.safetensors")))
