"""Attribution patching vs exact activation patching over every layer x position of an open_clip ViT-B/32.

Both in one process, on the same clean / corrupted image pair and metric (the logit difference of the image
embedding against two random "text" directions):

1. ``attribution_patching`` of ``blocks.{0..L-1}.hook_resid_pre`` per position: one forward + backward pass
   on the clean image and one forward pass on the corrupted image (median of ``--repeats`` runs);
2. ``exact_patching`` of the same grid: one forward pass per (layer, position). With ``--exact-layers N``
   only the first N layers are patched and the time is extrapolated linearly to all layers (every layer's
   row costs the same number of full forward passes); the output says so.

Random weights (no download); fp32; CPU by default.

    python benchmarks/bench_attribution.py --threads 2
    python benchmarks/bench_attribution.py --exact-layers 3     # a measured subset, extrapolated
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="ViT-B-32", help="open_clip model name (random weights)")
    p.add_argument("--batch", type=int, default=1, help="image pairs patched together")
    p.add_argument("--repeats", type=int, default=5, help="timed attribution runs (median)")
    p.add_argument("--exact-layers", type=int, default=None, help="patch only this many layers exactly and extrapolate")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)

    import open_clip

    from sae_lens_multimodal import HookedViT
    from sae_lens_multimodal.analysis.attribution import attribution_patching
    from sae_lens_multimodal.analysis.circuits_exact import exact_patching

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    source = open_clip.create_model(args.model, pretrained=None).eval().to(args.device)
    model = HookedViT.from_pretrained(source).to(args.device).eval()
    n_layers, n_pos = model.cfg.n_layers, int(model.cfg.n_ctx)
    size = model.cfg.image_size
    g = torch.Generator().manual_seed(1)
    clean = torch.randn(args.batch, model.cfg.n_channels, *size, generator=g).to(args.device)
    corrupted = clean + 0.5 * torch.randn(clean.shape, generator=g).to(args.device)
    with torch.no_grad():
        width = model(clean[:1]).shape[-1]  # the image embedding's width (after the projection)
    true, foil = torch.randn(2, width, generator=g).to(args.device)

    def metric(embeds: torch.Tensor) -> torch.Tensor:
        return (embeds @ (true - foil)).mean()

    hooks = [f"blocks.{i}.hook_resid_pre" for i in range(n_layers)]
    sync = torch.cuda.synchronize if str(args.device).startswith("cuda") else (lambda: None)

    def timed(fn):  # type: ignore[no-untyped-def]
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        return time.perf_counter() - t0, out

    run_atp = lambda: attribution_patching(model, clean, corrupted, metric, hooks=hooks, device=args.device)  # noqa: E731
    run_atp()  # warm-up
    atp_times, result = [], None
    for _ in range(args.repeats):
        t, result = timed(run_atp)
        atp_times.append(t)
    t_atp = statistics.median(atp_times)

    n_exact = n_layers if args.exact_layers is None else max(1, min(args.exact_layers, n_layers))
    t_exact_measured, exact = timed(
        lambda: exact_patching(model, clean, corrupted, metric, hooks=hooks[:n_exact], device=args.device)
    )
    t_exact = t_exact_measured * n_layers / n_exact
    ratio = t_exact / t_atp

    est = torch.stack([result[h] for h in hooks[:n_exact]]).flatten().double()
    ref = torch.stack([exact[h] for h in hooks[:n_exact]]).flatten().double()
    r = float(torch.corrcoef(torch.stack([est, ref]))[0, 1])

    print(
        f"{args.model} (random weights), {n_layers} layers x {n_pos} positions of hook_resid_pre = "
        f"{n_layers * n_pos} units, batch {args.batch} pair(s), fp32, {args.device}, threads {torch.get_num_threads()}"
    )
    if hasattr(os, "getloadavg"):
        print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"attribution patching (1 fwd+bwd clean, 1 fwd corrupted), median of {args.repeats}: {t_atp:8.3f} s")
    if n_exact == n_layers:
        print(f"exact patching of the full grid ({n_layers * n_pos} forward passes):          {t_exact:8.3f} s")
    else:
        print(
            f"exact patching: {n_exact} of {n_layers} layers measured ({n_exact * n_pos} forward passes) in "
            f"{t_exact_measured:.3f} s, EXTRAPOLATED to the full grid: {t_exact:8.3f} s"
        )
    print(f"Pearson r (estimate vs exact, measured layers; random weights): {r:.3f}")
    verdict = "OK" if ratio > 20 else "BELOW TARGET"
    print(f"exact / attribution time: {ratio:.1f}x (expected well above 20x) -> {verdict}")
    return {"t_attribution": t_atp, "t_exact": t_exact, "ratio": ratio, "pearson": r, "exact_layers": n_exact}


if __name__ == "__main__":
    main()
