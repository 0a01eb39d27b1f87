"""Activation store and cache throughput.

1. Caching: images/s of ``cache_activations`` (HookedViT forward + hook capture + token policy + writing
   memory-mapped shards) against the bare forward of the same model on the same batches
   (target: ratio >= 0.85). Two baselines are reported: the full forward, and the forward stopped after
   the hook's block (what the store itself runs).
2. Training: SAE training samples/s with SAELens's SAETrainer fed from our on-disk cache (shard reads,
   shuffling buffer, background prefetch) against SAETrainer fed from an in-memory tensor
   (random batches by index; target: ratio >= 0.9).

Runs alternate between the two sides so that load on the machine affects both alike; the median ratio
is reported. Random weights (no download), fp32.

    python benchmarks/bench_activation_store.py --threads 2
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

import sae_lens_multimodal  # noqa: F401  (registers with SAELens)
from sae_lens_multimodal import HookedViT, HookedViTConfig
from sae_lens_multimodal.training import ActivationCacheReader, ImageActivationStore, cache_activations

CONFIGS = {
    # real ViT architectures, random weights
    "vit-b-32": dict(n_layers=12, d_model=768, n_heads=12, d_mlp=3072, image_size=224, patch_size=32),
    "vit-s-16": dict(n_layers=12, d_model=384, n_heads=6, d_mlp=1536, image_size=224, patch_size=16),
    "vit-b-16": dict(n_layers=12, d_model=768, n_heads=12, d_mlp=3072, image_size=224, patch_size=16),
}


def build_vit(name: str) -> HookedViT:
    torch.manual_seed(0)
    cfg = HookedViTConfig(**CONFIGS[name], has_ln_pre=True, head_type="linear", d_out=512, model_name=name)
    vit = HookedViT(cfg)
    with torch.no_grad():
        for p in vit.parameters():
            p.normal_(std=0.02)
    return vit.eval()


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def alternate(a: Callable[[], object], b: Callable[[], object], repeats: int) -> tuple[list[float], list[float]]:
    a(), b()  # warm-up
    ta, tb = [], []
    for i in range(repeats):
        first, second = (a, b) if i % 2 == 0 else (b, a)
        t1, t2 = _timed(first), _timed(second)
        (ta, tb)[i % 2].append(t1)
        (tb, ta)[i % 2].append(t2)
    return ta, tb


def bench_caching(args: argparse.Namespace, workdir: Path) -> dict[str, float]:
    vit = build_vit(args.model)
    n_layers = vit.cfg.n_layers
    hook = args.hook or f"blocks.{n_layers - 1}.hook_resid_post"
    images = torch.randn(args.images, 3, *vit.cfg.image_size)
    batches = [images[i:i + args.batch] for i in range(0, len(images), args.batch)]
    store = ImageActivationStore(vit, hook, images, batch_size=args.batch, token_policy=args.token_policy,
                                 progress=False)
    stop = store.stop_at_layer

    @torch.no_grad()
    def bare_full() -> None:
        for b in batches:
            vit(b)

    @torch.no_grad()
    def bare_to_hook() -> None:
        for b in batches:
            vit(b, return_type=None, stop_at_layer=stop)

    runs = [0]

    def caching() -> None:
        out = workdir / f"cache_{runs[0]}"
        runs[0] += 1
        cache_activations(store, out, items_per_shard=args.items_per_shard)
        shutil.rmtree(out)

    t_full, t_cache = alternate(bare_full, caching, args.repeats)
    t_stop, t_cache2 = alternate(bare_to_hook, caching, args.repeats)
    n = len(images)
    return {
        "hook": hook,  # type: ignore[dict-item]
        "images_per_s_bare_full": n / statistics.median(t_full),
        "images_per_s_bare_to_hook": n / statistics.median(t_stop),
        "images_per_s_caching": n / statistics.median(t_cache + t_cache2),
        "ratio_vs_full_forward": statistics.median(f / c for f, c in zip(t_full, t_cache)),
        "ratio_vs_forward_to_hook": statistics.median(f / c for f, c in zip(t_stop, t_cache2)),
        "rows_per_image": store.rows_per_item(),
        "d_in": store.d_in(hook),
    }


def bench_training(args: argparse.Namespace, workdir: Path) -> dict[str, float]:
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    from sae_lens_multimodal.training import activation_provider
    from sae_lens_multimodal.training.cache import ActivationCacheWriter, ActivationChunk, write_activation_caches

    d, rows = args.train_d_in, args.train_rows
    g = torch.Generator().manual_seed(0)
    data = torch.randn(rows, d, generator=g)
    # a cache holding exactly these rows (written once; shards of 4096 rows)
    meta = {"kind": "image", "model": {"name": "bench", "class": "-", "fingerprint": "-"}, "hook_name": "h",
            "d_in": d, "dtype": "float32", "token_policy": "all", "source": {"kind": "tensor", "n_items": rows},
            "diffusion": None}
    writer = ActivationCacheWriter(workdir / "train_cache", meta, items_per_shard=4096)
    chunks = ((i, min(i + 4096, rows), {"h": ActivationChunk(data[i:i + 4096], torch.arange(i, min(i + 4096, rows)))})
              for i in range(0, rows, 4096))
    write_activation_caches(chunks, {"h": writer}, n_items=rows)
    reader = ActivationCacheReader(workdir / "train_cache")
    total = args.train_samples
    bs = args.train_batch

    def in_memory() -> Iterator[torch.Tensor]:
        while True:
            yield data[torch.randint(0, rows, (bs,))]

    def fit(provider: Iterator[torch.Tensor]) -> None:
        torch.manual_seed(0)
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d, d_sae=args.train_expansion * d, k=32))
        cfg = SAETrainerConfig(total_training_samples=total, train_batch_size_samples=bs, lr=3e-4, lr_end=3e-4)
        SAETrainer(cfg=cfg, sae=sae, data_provider=provider).fit()
        close = getattr(provider, "close", None)
        if close:
            close()

    t_mem, t_store = alternate(lambda: fit(in_memory()),
                               lambda: fit(activation_provider(reader, bs, buffer_rows=16 * bs)), args.repeats)
    return {
        "samples_per_s_in_memory": total / statistics.median(t_mem),
        "samples_per_s_from_cache": total / statistics.median(t_store),
        "ratio": statistics.median(m / s for m, s in zip(t_mem, t_store)),
        "d_in": d,
        "d_sae": args.train_expansion * d,
        "batch": bs,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(CONFIGS), default="vit-b-32", help="ViT architecture (random weights)")
    p.add_argument("--hook", help="hook to cache (default: the last block's hook_resid_post)")
    p.add_argument("--token-policy", default="all", choices=("all", "cls", "patches"))
    p.add_argument("--images", type=int, default=64, help="images per caching pass")
    p.add_argument("--batch", type=int, default=16, help="images per forward pass")
    p.add_argument("--items-per-shard", type=int, default=32)
    p.add_argument("--train-d-in", type=int, default=768)
    p.add_argument("--train-expansion", type=int, default=8)
    p.add_argument("--train-rows", type=int, default=65536, help="rows in the training cache / tensor")
    p.add_argument("--train-batch", type=int, default=4096)
    p.add_argument("--train-samples", type=int, default=163840, help="samples per training run")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--skip", choices=("caching", "training"), help="skip one of the two benchmarks")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as tmp:
        if args.skip != "caching":
            res = bench_caching(args, Path(tmp))
            print(f"[caching] {args.model}, hook {res['hook']}, batch {args.batch}, {res['rows_per_image']} rows x "
                  f"{res['d_in']} per image")
            print(f"  bare full forward     {res['images_per_s_bare_full']:8.2f} img/s")
            print(f"  bare forward to hook  {res['images_per_s_bare_to_hook']:8.2f} img/s")
            print(f"  caching to disk       {res['images_per_s_caching']:8.2f} img/s")
            print(f"  ratio vs full forward {res['ratio_vs_full_forward']:.3f}   (target >= 0.85)")
            print(f"  ratio vs fwd to hook  {res['ratio_vs_forward_to_hook']:.3f}")
        if args.skip != "training":
            res = bench_training(args, Path(tmp))
            print(f"[training] TopK SAE d_in {res['d_in']} d_sae {res['d_sae']} batch {res['batch']} (SAELens SAETrainer)")
            print(f"  from in-memory tensor {res['samples_per_s_in_memory']:10.0f} samples/s")
            print(f"  from on-disk cache    {res['samples_per_s_from_cache']:10.0f} samples/s")
            print(f"  ratio                 {res['ratio']:.3f}   (target >= 0.9)")


if __name__ == "__main__":
    main()
