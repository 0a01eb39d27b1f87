"""Scaling out with torch.distributed (torchrun), measured side by side in one run.

Caching: images/s of ``cache_activations`` (ViT-S/16 architecture, random weights, fp32, CPU) with 2 ranks
of 1 thread each (``torchrun --standalone --nproc-per-node=2``) against 1 process of 1 thread, on the same
images, same shards (target: ratio >= 1.8 on a 2-core machine). Each side runs in fresh processes; the
time counted is ``cache_activations`` itself (from every rank agreeing to the last shard on disk), not
Python start-up or model building. Runs alternate (1, 2, 1, 2, ...) and the median ratio is reported.

    python benchmarks/bench_distributed.py                  # every part
    python benchmarks/bench_distributed.py --part caching --n-images 48 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve()
VIT = dict(n_layers=12, d_model=384, n_heads=6, d_mlp=1536, image_size=224, patch_size=16)


# ---------------------------------------------------------------------- caching
def caching_worker(args: argparse.Namespace) -> None:
    """One rank (or the single process) of a caching run; rank 0 prints the seconds it took."""
    import torch

    from sae_lens_multimodal import HookedViT, HookedViTConfig
    from sae_lens_multimodal.training import ImageActivationStore, cache_activations
    from sae_lens_multimodal.training.distributed import barrier, distributed_session, rank

    torch.set_num_threads(1)
    with distributed_session():
        torch.manual_seed(0)  # the same random model on every rank (ranks check its fingerprint)
        vit = HookedViT(HookedViTConfig(**VIT, has_ln_pre=True, head_type="linear", d_out=512, model_name="vit-s-16"))
        with torch.no_grad():
            for p in vit.parameters():
                p.normal_(std=0.02)
        images = torch.randn(args.n_images, 3, 224, 224, generator=torch.Generator().manual_seed(1))
        store = ImageActivationStore(vit.eval(), "blocks.11.hook_resid_post", images, batch_size=args.batch_size,
                                     progress=False)
        barrier()
        t0 = time.perf_counter()
        cache_activations(store, args.out, items_per_shard=args.items_per_shard)
        elapsed = time.perf_counter() - t0
        if rank() == 0:
            print(json.dumps({"seconds": elapsed}))


def _run(cmd: list[str]) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
    lines = [line for line in res.stdout.splitlines() if line.startswith("{")]
    return float(json.loads(lines[-1])["seconds"])


def bench_caching(args: argparse.Namespace) -> dict[str, Any]:
    worker = [str(HERE), "--worker", "caching", "--n-images", str(args.n_images), "--batch-size",
              str(args.batch_size), "--items-per-shard", str(args.items_per_shard)]
    one, two = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for n, times in ((1, one), (2, two)):
                out = Path(tmp) / f"cache_{n}_{i}"
                launcher = [sys.executable] if n == 1 else [
                    sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}"]
                times.append(_run([*launcher, *worker, "--out", str(out)]))
                shutil.rmtree(out)
    ratios = [a / b for a, b in zip(one, two)]
    result = {
        "what": f"caching throughput, 2 ranks x 1 thread / 1 process x 1 thread ({args.n_images} images, ViT-S/16 "
                f"blocks.11, batch {args.batch_size}, {args.items_per_shard} images per shard, CPU, fp32)",
        "one_process_images_per_s": [round(args.n_images / t, 2) for t in one],
        "two_ranks_images_per_s": [round(args.n_images / t, 2) for t in two],
        "ratio_median": round(statistics.median(ratios), 3),
        "target": ">= 1.8",
    }
    print(json.dumps(result, indent=1))
    return result


# ---------------------------------------------------------------------- training
def training_worker(args: argparse.Namespace) -> None:
    """One rank (or the single process) of a data-parallel training run on the cache ``args.out``; rank 0
    prints the seconds ``train_sae_data_parallel`` took (from every rank being ready)."""
    import torch
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig

    from sae_lens_multimodal.training.distributed import barrier, distributed_session, rank
    from sae_lens_multimodal.training.parallel_train import train_sae_data_parallel

    torch.set_num_threads(1)
    with distributed_session("cpu"):
        torch.manual_seed(0)
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=args.d_in, d_sae=args.d_in * args.expansion, k=32))
        barrier()
        t0 = time.perf_counter()
        train_sae_data_parallel(sae, args.out, total_training_samples=args.train_steps * args.train_batch,
                                batch_size=args.train_batch, lr=1e-3, seed=0, progress=False)
        elapsed = time.perf_counter() - t0
        if rank() == 0:
            print(json.dumps({"seconds": elapsed}))


def bench_training(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from sae_lens_multimodal.training.cache import ActivationCacheWriter, ActivationChunk

    rows = args.train_steps * args.train_batch
    one, two = [], []
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        meta = {"kind": "image", "model": {"name": "bench", "class": "X", "fingerprint": "sha256:0"},
                "hook_name": "blocks.11.hook_resid_post", "d_in": args.d_in, "dtype": "float32", "token_policy": "all",
                "source": {"kind": "tensor"}, "diffusion": None}
        writer = ActivationCacheWriter(cache, meta, items_per_shard=8192)
        gen = torch.Generator().manual_seed(0)
        for k, lo in enumerate(range(0, rows, 8192)):
            n = min(8192, rows - lo)
            writer.write_shard(k, ActivationChunk(torch.randn(n, args.d_in, generator=gen), torch.arange(lo, lo + n)),
                               (lo, lo + n))
        worker = [str(HERE), "--worker", "training", "--out", str(cache), "--d-in", str(args.d_in), "--expansion",
                  str(args.expansion), "--train-steps", str(args.train_steps), "--train-batch", str(args.train_batch)]
        for _ in range(args.repeats):
            for n, times in ((1, one), (2, two)):
                launcher = [sys.executable] if n == 1 else [
                    sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}"]
                times.append(_run([*launcher, *worker]))
    ratios = [a / b for a, b in zip(one, two)]
    result = {
        "what": f"data-parallel SAE training samples/s, 2 ranks x 1 thread (batch {args.train_batch // 2} each) / "
                f"1 process x 1 thread (batch {args.train_batch}), same global batches: TopK SAE d_in={args.d_in}, "
                f"d_sae={args.d_in * args.expansion}, k=32, {args.train_steps} steps, gloo, CPU, fp32",
        "one_process_samples_per_s": [round(rows / t) for t in one],
        "two_ranks_samples_per_s": [round(rows / t) for t in two],
        "ratio_median": round(statistics.median(ratios), 3),
        "target": ">= 1.6",
    }
    print(json.dumps(result, indent=1))
    return result


#: the parts of the benchmark, in the order they run
PARTS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {"caching": bench_caching, "training": bench_training}
WORKERS: dict[str, Callable[[argparse.Namespace], None]] = {"caching": caching_worker, "training": training_worker}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["all", *PARTS], default="all", help="which part to run (default: all)")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs per side (default: 2)")
    parser.add_argument("--n-images", type=int, default=48, help="caching: images (default: 48)")
    parser.add_argument("--batch-size", type=int, default=8, help="caching: images per forward pass (default: 8)")
    parser.add_argument("--items-per-shard", type=int, default=8, help="caching: images per shard (default: 8)")
    parser.add_argument("--d-in", type=int, default=384, help="training: SAE input width (default: 384, ViT-S)")
    parser.add_argument("--expansion", type=int, default=8, help="training: d_sae / d_in (default: 8)")
    parser.add_argument("--train-steps", type=int, default=12, help="training: steps per run (default: 12)")
    parser.add_argument("--train-batch", type=int, default=4096, help="training: global batch (default: 4096, as `sae-lens-mm train`)")
    parser.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        WORKERS[args.worker](args)
        return
    for name, part in PARTS.items():
        if args.part in ("all", name):
            part(args)


if __name__ == "__main__":
    main()
