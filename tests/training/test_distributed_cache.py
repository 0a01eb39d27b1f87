"""Distributed caching under torchrun (CPU, gloo): 2 ranks write the same cache as 1 process, bit for bit;
a rank killed with SIGKILL leaves no visible half shard and a rerun with another N completes the cache;
two torchrun launches acting as two nodes; ranks started with different settings are refused."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from sae_lens_multimodal.cli import main
from sae_lens_multimodal.training import ActivationCacheReader
from sae_lens_multimodal.training.caching import cache_activations, runs_of_rank, shard_runs
from sae_lens_multimodal.training.distributed import RankMismatchError, check_ranks_agree, rank, world_size
from sae_lens_multimodal.training.image_store import ImageActivationStore
from tests.training.test_cli import image_dir, sd_dir, vit_dir  # noqa: F401  (fixtures: tiny local checkpoints)

HOOK = "blocks.1.hook_resid_post"
DIFFUSION_HOOK = "mid_block.attentions.0.hook_out"
TIMEOUT = 180

# Runs the sae-lens-mm CLI on every rank, with test-only twists read from the environment:
#   G_DTYPE_RANK1=<dtype>    rank 1 caches in another dtype (ranks that disagree)
#   G_KILL=<rank>:<k>        that rank SIGKILLs itself after k shards, in the middle of writing the next one
#   G_TENSOR=<images.pt> ... a second run through the Python API on a tensor of images
WORKER = textwrap.dedent('''
    import os, signal, sys
    import torch
    from sae_lens_multimodal.cli import main
    from sae_lens_multimodal.training import cache as cache_mod
    from sae_lens_multimodal.training.distributed import distributed_session

    argv = sys.argv[1:]
    me = int(os.environ["RANK"])
    if me == 1 and os.environ.get("G_DTYPE_RANK1"):
        argv[argv.index("--dtype") + 1] = os.environ["G_DTYPE_RANK1"]
    if os.environ.get("G_KILL") and me == int(os.environ["G_KILL"].split(":")[0]):
        after, shards = int(os.environ["G_KILL"].split(":")[1]), [0]
        real_json, real_save = cache_mod._atomic_write_json, cache_mod.atomic_save

        def counting_json(path, obj):
            real_json(path, obj)
            shards[0] += path.name.startswith("shard_")

        def dying_save(path, writer, **kw):
            if shards[0] < after:
                return real_save(path, writer, **kw)

            def write_then_die(tmp):
                writer(tmp)  # the temporary file is complete; the writer dies before moving it into place
                os.kill(os.getpid(), signal.SIGKILL)

            return real_save(path, write_then_die, **kw)

        cache_mod._atomic_write_json, cache_mod.atomic_save = counting_json, dying_save
    with distributed_session():
        code = main(argv)
        if os.environ.get("G_TENSOR"):
            from sae_lens_multimodal.models.loading import load_model
            from sae_lens_multimodal.training import ImageActivationStore, cache_activations

            images, vit, out = os.environ["G_TENSOR"].split(os.pathsep)
            store = ImageActivationStore(load_model(vit), [HOOK], torch.load(images), batch_size=2, progress=False)
            cache_activations(store, out, items_per_shard=3)
    sys.exit(code)
''').replace("[HOOK]", repr([HOOK]))


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def _torchrun(tmp_path: Path, args: list[str], nproc: int = 2, **env: str) -> subprocess.CompletedProcess:
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", str(worker), *args]
    return subprocess.run(cmd, env=_env(**env), capture_output=True, text=True, timeout=TIMEOUT, cwd=tmp_path)


def _image_args(vit_dir, image_dir, out, items_per_shard=3, batch_size=2) -> list[str]:
    return ["cache", "--model", str(vit_dir), "--hook", HOOK, "--images", str(image_dir), "--out", str(out),
            "--batch-size", str(batch_size), "--items-per-shard", str(items_per_shard), "--dtype", "float32",
            "--no-progress"]


def _diffusion_args(sd_dir, out) -> list[str]:
    prompts = ["a red cube", "a blue ball", "a green cone", "two cubes", "a yellow ball"]
    return ["cache", "--model", str(sd_dir), "--model-kind", "diffusion", *[a for p in prompts for a in ("--prompt", p)],
            "--num-inference-steps", "2", "--guidance-scale", "4", "--height", "8", "--width", "8", "--output-type",
            "latent", "--hook", DIFFUSION_HOOK, "--out", str(out), "--batch-size", "3", "--items-per-shard", "2",
            "--dtype", "float32", "--no-progress"]


def _files(cache_dir: Path) -> dict[str, bytes]:
    """Every visible file of a cache (temporary files are hidden ``.*.tmp``), by name."""
    return {p.name: p.read_bytes() for p in sorted(cache_dir.iterdir()) if not p.name.startswith(".")}


def _assert_same_cache(got: Path, want: Path) -> None:
    a, b = _files(got), _files(want)
    assert sorted(a) == sorted(b)
    assert any(name.endswith(".acts.npy") for name in a)
    for name in b:
        assert a[name] == b[name], f"{got / name} differs from the one-process cache"


@pytest.fixture(scope="module")
def reference(vit_dir, image_dir, sd_dir, tmp_path_factory):  # noqa: F811
    """One-process caches of the commands the distributed runs repeat."""
    root = tmp_path_factory.mktemp("reference")
    assert main(_image_args(vit_dir, image_dir, root / "images")) == 0
    assert main(_image_args(vit_dir, image_dir, root / "images_1", items_per_shard=1, batch_size=1)) == 0
    assert main(_diffusion_args(sd_dir, root / "diffusion")) == 0
    from sae_lens_multimodal.models.loading import load_model

    images = torch.randn(10, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    torch.save(images, root / "images.pt")
    store = ImageActivationStore(load_model(str(vit_dir)), [HOOK], images, batch_size=2, progress=False)
    cache_activations(store, root / "tensor", items_per_shard=3)
    return root


# ---------------------------------------------------------------------- without torchrun
def test_shard_assignment_covers_every_missing_shard_once():
    for done in (set(), {0, 3, 4}, {1}):
        for world in (1, 2, 3):
            got = [k for r in range(world) for lo, hi in runs_of_rank(done, 23, 2, r, world) for k in range(lo, hi)]
            assert sorted(got) == [k for k in range(12) if k not in done]
    assert list(shard_runs([0, 1, 2, 5, 7, 8])) == [(0, 3), (5, 6), (7, 9)]
    # a source of unknown length: shards dealt round-robin; one process runs open-ended past the last shard on disk
    assert [next(iter(runs_of_rank({0, 2}, None, 4, r, 2))) for r in (0, 1)] == [(1, 2), (3, 4)]
    assert list(runs_of_rank({0, 2}, None, 4, 0, 1)) == [(1, 2), (3, None)]


def test_one_process_helpers_and_agreement_check():
    assert (rank(), world_size()) == (0, 1)
    check_ranks_agree({"dtype": "float32"})  # one rank always agrees with itself
    import sae_lens_multimodal.training.distributed as d

    real = d.all_gather_object
    d.all_gather_object = lambda obj: [obj, {**obj, "cache of h": {**obj["cache of h"], "dtype": "float16"}}]
    try:
        with pytest.raises(RankMismatchError, match=r"Rank 1 disagrees with rank 0 on cache of h / dtype.*'float16'"):
            check_ranks_agree({"hooks": ["h"], "cache of h": {"model": "m", "dtype": "float32"}})
    finally:
        d.all_gather_object = real


# ---------------------------------------------------------------------- under torchrun
def test_two_ranks_write_the_one_process_cache(vit_dir, image_dir, sd_dir, reference, tmp_path):  # noqa: F811
    """Folder images through the CLI, then diffusion prompts x seeds, then a tensor of images through the API."""
    out = tmp_path / "out"
    worker_args = [*_image_args(vit_dir, image_dir, out / "images")]
    tensor = os.pathsep.join([str(reference / "images.pt"), str(vit_dir), str(out / "tensor")])
    res = _torchrun(tmp_path, worker_args, G_TENSOR=tensor)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("rows in 4 shards") == 1  # one summary, from rank 0
    _assert_same_cache(out / "images" / HOOK, reference / "images" / HOOK)
    _assert_same_cache(out / "tensor" / HOOK, reference / "tensor" / HOOK)
    res = _torchrun(tmp_path, _diffusion_args(sd_dir, out / "diffusion"))
    assert res.returncode == 0, res.stderr[-3000:]
    _assert_same_cache(out / "diffusion" / DIFFUSION_HOOK, reference / "diffusion" / DIFFUSION_HOOK)
    assert len(ActivationCacheReader(out / "diffusion" / DIFFUSION_HOOK).shards) == 3


def test_killed_rank_then_rerun_with_another_n(vit_dir, image_dir, reference, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    args = _image_args(vit_dir, image_dir, out, items_per_shard=1, batch_size=1)
    res = _torchrun(tmp_path, args, G_KILL="1:1")  # rank 1 (shards 6..11) dies while writing its second shard
    assert res.returncode != 0
    cache = out / HOOK
    assert (cache / "shard_00006.json").exists() and not (cache / "shard_00007.json").exists()
    assert list(cache.glob(".shard_00007.*.tmp")), "the killed writer's temporary file should be left behind"
    partial = ActivationCacheReader(cache)  # only complete shards are visible, and they read
    assert 6 in [s.index for s in partial.shards] and 7 not in [s.index for s in partial.shards]
    assert partial.read_all().acts.shape[0] == partial.n_rows
    assert main(args) == 0  # the same command again, in one process
    assert not list(cache.glob("*.tmp"))
    _assert_same_cache(cache, reference / "images_1" / HOOK)
    rows = ActivationCacheReader(cache).read_all().sample
    assert torch.equal(torch.unique(rows), torch.arange(12))  # every image, none twice
    assert torch.equal(rows, torch.sort(rows).values)


def test_two_nodes_by_rendezvous(vit_dir, image_dir, reference, tmp_path):  # noqa: F811
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=test-two-nodes", "-m", "sae_lens_multimodal",
           *_image_args(vit_dir, image_dir, out)]
    nodes = [subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
             for _ in range(2)]
    results = [node.communicate(timeout=TIMEOUT) for node in nodes]
    for node, (_, err) in zip(nodes, results):
        assert node.returncode == 0, err[-3000:]
    assert sum(o.count("rows in 4 shards") for o, _ in results) == 1
    _assert_same_cache(out / HOOK, reference / "images" / HOOK)


def test_ranks_that_disagree_are_refused_before_writing(vit_dir, image_dir, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    res = _torchrun(tmp_path, _image_args(vit_dir, image_dir, out), G_DTYPE_RANK1="float16")
    assert res.returncode != 0
    assert f"Rank 1 disagrees with rank 0 on cache of {HOOK} / dtype: rank 0 has 'float32', rank 1 has 'float16'" \
        in res.stderr
    assert not out.exists() or not any(out.rglob("*")), "nothing may be written when the ranks disagree"


def test_hugging_face_datasets_split_by_shard(tmp_path):
    """Map-style (index ranges) and streaming (skipped to each shard; length unknown, so shards are dealt
    round-robin until the stream ends): two simulated ranks write the one-process cache."""
    datasets = pytest.importorskip("datasets")
    import numpy as np
    from PIL import Image

    from sae_lens_multimodal.training import caching
    from tests.training.conftest import make_vit

    g = torch.Generator().manual_seed(2)
    pils = [Image.fromarray((torch.rand(40, 40, 3, generator=g) * 255).to(torch.uint8).numpy()) for _ in range(7)]
    ds = datasets.Dataset.from_dict({"image": pils}, features=datasets.Features({"image": datasets.Image()}))

    def preprocess(im):
        return torch.from_numpy(np.asarray(im.resize((32, 32)), dtype=np.float32)).permute(2, 0, 1) / 255

    vit = make_vit()
    for name, source in (("map", ds), ("stream", ds.to_iterable_dataset())):
        def store():
            return ImageActivationStore(vit, [HOOK], source, preprocess=preprocess, batch_size=3, progress=False)

        one = cache_activations(store(), tmp_path / name / "one", items_per_shard=2)[HOOK]
        s = store()
        for r in (0, 1):  # what each rank of two writes (the collectives are tested under torchrun above)
            writers = caching._open_writers(s, tmp_path / name / "two", 2, clean_stale=r == 0)
            caching._write_shards(s, writers, caching.runs_of_rank(set(), s.n_items, 2, r, 2), set(), s.n_items, 2,
                                  tmp_path / name / "two" / HOOK)
        assert [sh.items for sh in one.shards] == [(0, 2), (2, 4), (4, 6), (6, 7)]
        _assert_same_cache(tmp_path / name / "two" / HOOK, one.directory)


def test_resume_keeps_the_shard_size_on_disk(tmp_path):
    """A rerun asking for another --items-per-shard fills the missing shards with the size on disk."""
    from tests.training.conftest import make_vit

    vit, images = make_vit(), torch.randn(10, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    full = cache_activations(ImageActivationStore(vit, [HOOK], images, batch_size=3, progress=False), tmp_path / "a",
                             items_per_shard=4)[HOOK]
    (full.directory / "shard_00001.json").unlink()
    again = cache_activations(ImageActivationStore(vit, [HOOK], images, batch_size=3, progress=False), tmp_path / "a",
                              items_per_shard=3)[HOOK]
    assert [s.items for s in again.shards] == [(0, 4), (4, 8), (8, 10)]
    ref = cache_activations(ImageActivationStore(vit, [HOOK], images, batch_size=3, progress=False), tmp_path / "b",
                            items_per_shard=4)[HOOK]
    _assert_same_cache(again.directory, ref.directory)
