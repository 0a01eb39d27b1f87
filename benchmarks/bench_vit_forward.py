"""HookedViT forward speed against the original open_clip vision encoder.

Measures, in one process with the runs alternating (so load on the machine affects both sides alike):

1. HookedViT forward with no hooks vs ``open_clip_model.visual(x)``: the price of hook points
   (target: median ratio <= 1.05);
2. ``run_with_cache(names_filter=<one hook>, stop_at_layer=L+1)`` vs a full HookedViT forward: reading one
   early activation should cost less than a full forward (ratio < 1).

Random weights (no download); fp32; CPU by default.

    python benchmarks/bench_vit_forward.py --model ViT-B-32 --batch 8 --repeats 20 --threads 2
    python benchmarks/bench_vit_forward.py --threads 1 --timer cpu   # on a busy machine

The ratio is the median of per-pair ratios (each HookedViT run against the open_clip run next to it).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch


def alternate(
    a: Callable[[], object],
    b: Callable[[], object],
    repeats: int,
    warmup: int,
    clock: Callable[[], float],
    sync: Callable[[], None] = lambda: None,
) -> tuple[list[float], list[float]]:
    """Time a and b alternately (a, b, b, a, ... so neither always runs first); returns ms lists.
    ``sync`` waits for queued GPU work, so a CUDA run is timed to its end rather than to its launch."""

    def timed(fn: Callable[[], object]) -> float:
        sync()
        t0 = clock()
        fn()
        sync()
        return (clock() - t0) * 1e3

    for _ in range(warmup):
        a()
        b()
    ta, tb = [], []
    for i in range(repeats):
        if i % 2 == 0:
            ta.append(timed(a))
            tb.append(timed(b))
        else:
            tb.append(timed(b))
            ta.append(timed(a))
    return ta, tb


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="ViT-B-32", help="open_clip model name (random weights)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=20, help="timed runs per side")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--hook", default="blocks.5.hook_resid_post", help="hook read by the run_with_cache case")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--timer", choices=["wall", "cpu"], default="wall",
        help="wall clock, or process CPU time (robust to other processes on a busy machine; use with --threads 1)",
    )
    args = p.parse_args(argv)

    import open_clip

    from sae_lens_multimodal import HookedViT

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    source = open_clip.create_model(args.model, pretrained=None).eval().to(args.device)
    visual = source.visual
    model = HookedViT.from_pretrained(source).to(args.device)
    size = model.cfg.image_size
    x = torch.randn(args.batch, model.cfg.n_channels, *size, device=args.device)
    layer = int(args.hook.split(".")[1])

    clock = time.perf_counter if args.timer == "wall" else time.process_time
    sync = torch.cuda.synchronize if str(args.device).startswith("cuda") else (lambda: None)
    with torch.inference_mode():
        max_err = (model(x) - visual(x)).abs().max().item()
        t_hooked, t_orig = alternate(lambda: model(x), lambda: visual(x), args.repeats, args.warmup, clock, sync)
        t_cache, t_full = alternate(
            lambda: model.run_with_cache(x, names_filter=args.hook, stop_at_layer=layer + 1),
            lambda: model(x),
            args.repeats,
            args.warmup,
            clock,
            sync,
        )

    med = statistics.median
    ratio_fwd = med(a / b for a, b in zip(t_hooked, t_orig))
    ratio_cache = med(a / b for a, b in zip(t_cache, t_full))
    rows = [
        ("open_clip visual(x)", med(t_orig), None),
        ("HookedViT forward, no hooks", med(t_hooked), ratio_fwd),
        ("HookedViT forward (full)", med(t_full), None),
        (f"run_with_cache({args.hook}, stop_at_layer={layer + 1})", med(t_cache), ratio_cache),
    ]
    print(
        f"{args.model}, batch {args.batch}, fp32, {args.device}, threads {torch.get_num_threads()}, {args.timer} time, "
        f"{args.repeats} alternating runs per side after {args.warmup} warm-up; max |HookedViT - open_clip| = {max_err:.2e}"
    )
    if hasattr(os, "getloadavg"):
        print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"{'case':<58} {'median ms':>10} {'ratio':>8}")
    print("-" * 78)
    for name, ms, ratio in rows:
        print(f"{name:<58} {ms:>10.1f} {'' if ratio is None else f'{ratio:.3f}':>8}")
    print("-" * 78)
    print(f"HookedViT / open_clip forward: {ratio_fwd:.3f} (target <= 1.05) -> {'OK' if ratio_fwd <= 1.05 else 'SLOWER'}")
    print(f"run_with_cache(stop early) / full forward: {ratio_cache:.3f} (should be < 1) -> {'OK' if ratio_cache < 1 else 'NOT FASTER'}")
    return {"ratio_forward": ratio_fwd, "ratio_cache": ratio_cache, "ms_hooked": med(t_hooked), "ms_open_clip": med(t_orig)}


if __name__ == "__main__":
    main()
