"""Cost of steering against the plain SAELens way of running an SAE.

Measures, in one process with the runs alternating (load on the machine affects both sides alike), on a
randomly initialised open_clip ViT-B/32 through HookedViT with a random TopK SAE (d_sae = 16 x d_model) at
``blocks.6.hook_resid_post``:

1. ``steer(model, FeatureSteer(sae, f, "clamp", v))`` forward (encode, edit one latent, decode the change,
   error term kept) vs ``model.run_with_saes(x, saes=[sae], use_error_term=True)`` (SAELens splicing: encode,
   decode, error term) — target <= 1.10;
2. the same steer vs a bare forward with no SAE — the whole price of steering (reported, no target).

    python benchmarks/bench_steering.py --batch 8 --repeats 20 --threads 2
    python benchmarks/bench_steering.py --device cuda --batch 128
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_vit_forward import alternate  # noqa: E402  (same alternating timer)


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ViT-B-32", help="open_clip model name (random weights)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--layer", type=int, default=6)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)

    import open_clip
    from sae_lens import TopKSAE, TopKSAEConfig

    from sae_lens_multimodal import HookedViT
    from sae_lens_multimodal.steering import FeatureSteer, steer

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = HookedViT.from_pretrained(open_clip.create_model(args.model, pretrained=None).eval()).to(args.device)
    hook = f"blocks.{args.layer}.hook_resid_post"
    d = model.cfg.d_model
    sae = TopKSAE(TopKSAEConfig(d_in=d, d_sae=16 * d, k=32, device=args.device))
    with torch.no_grad():
        for param in sae.parameters():
            param.normal_(0, d**-0.5)
    sae.cfg.metadata.hook_name = hook
    x = torch.randn(args.batch, model.cfg.n_channels, *model.cfg.image_size, device=args.device)
    sync = torch.cuda.synchronize if str(args.device).startswith("cuda") else (lambda: None)
    clamp = FeatureSteer(sae, 3, "clamp", value=10.0)

    def steered() -> object:
        with steer(model, clamp):
            return model(x)

    with torch.inference_mode():
        t_steer, t_splice = alternate(
            steered, lambda: model.run_with_saes(x, saes=[sae], use_error_term=True),
            args.repeats, args.warmup, time.perf_counter, sync,
        )
        t_steer2, t_bare = alternate(steered, lambda: model(x), args.repeats, args.warmup, time.perf_counter, sync)

    med = statistics.median
    ratio_splice = med(a / b for a, b in zip(t_steer, t_splice))
    ratio_bare = med(a / b for a, b in zip(t_steer2, t_bare))
    print(f"{args.model}, batch {args.batch}, fp32, {args.device}, threads {torch.get_num_threads()}, SAE {d}->{16 * d} "
          f"TopK k=32 at {hook}; {args.repeats} alternating runs per side after {args.warmup} warm-up")
    print(f"{'case':<62} {'median ms':>10} {'ratio':>8}")
    print("-" * 82)
    print(f"{'run_with_saes(use_error_term=True)':<62} {med(t_splice):>10.1f}")
    print(f"{'steer(FeatureSteer clamp, error term kept)':<62} {med(t_steer):>10.1f} {ratio_splice:>8.3f}")
    print(f"{'bare forward (no SAE)':<62} {med(t_bare):>10.1f}")
    print(f"{'steer(...) / bare forward':<62} {med(t_steer2):>10.1f} {ratio_bare:>8.3f}")
    print("-" * 82)
    print(f"steer / run_with_saes: {ratio_splice:.3f} (target <= 1.10) -> {'OK' if ratio_splice <= 1.10 else 'SLOWER'}")
    return {"ratio_vs_splice": ratio_splice, "ratio_vs_bare": ratio_bare}


if __name__ == "__main__":
    main()
