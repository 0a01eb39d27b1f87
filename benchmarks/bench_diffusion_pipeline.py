"""Cost of caching one block output at every denoising step, against the plain diffusers pipeline.

Two Stable-Diffusion-layout pipelines with the same components (the hooked one gets a deep copy of the
UNet, so the plain one runs on modules without any hooks installed) and the same seed:

* time: plain ``pipe(...)`` and ``HookedDiffusionPipeline.run_with_cache(..., names_filter=[one hook])``
  alternate in one process (the order flips every repeat); reported: ratio of median wall times (target
  <= 1.10), plus the median pairwise ratio and the ratio of this process's CPU times (steadier on a shared
  machine);
* memory: two child processes build the same pipeline and run it once to warm up, then once measured,
  one plain and one caching; reported: (peak RSS of the caching process - peak RSS of the plain one)
  / bytes held by the cache (target <= 1.2).

The images of the two pipelines are checked to be identical first.

Run: ``OMP_NUM_THREADS=1 python benchmarks/bench_diffusion_pipeline.py`` (``--help`` for sizes).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch


def build(args: argparse.Namespace):
    """A small SD 1.x-layout pipeline with random weights, a byte-level tokenizer: no downloads."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    torch.manual_seed(0)
    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=args.text_dim, intermediate_size=4 * args.text_dim, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"])).eval()
    ch = args.channels
    unet = UNet2DConditionModel(
        sample_size=args.latent, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(ch, 2 * ch, 4 * ch, 4 * ch),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=args.text_dim, attention_head_dim=8, norm_num_groups=8,
    ).eval()
    vae = AutoencoderKL(block_out_channels=(8, 16), latent_channels=4, norm_num_groups=8,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2).eval()
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(clip_sample=False, steps_offset=1), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call_kwargs(args: argparse.Namespace) -> dict:
    size = 2 * args.latent  # the 2-level VAE upsamples latents x2
    return {"prompt": "a red cube on a table", "num_inference_steps": args.steps, "height": size, "width": size,
            "guidance_scale": 7.5, "output_type": "latent",
            "generator": torch.Generator().manual_seed(args.seed)}


def hooked_copy(pipe):
    from diffusers import StableDiffusionPipeline

    from sae_lens_multimodal.diffusion import HookedDiffusionPipeline

    other = StableDiffusionPipeline(**{**pipe.components, "unet": copy.deepcopy(pipe.unet)},
                                    requires_safety_checker=False)
    other.set_progress_bar_config(disable=True)
    return HookedDiffusionPipeline(other)


def child(args: argparse.Namespace) -> None:
    """One memory measurement: warm-up run, measured run, then report this process's peak RSS."""
    import sae_lens_multimodal.diffusion  # noqa: F401  (same imports in both children)

    torch.set_num_threads(args.threads)
    pipe = build(args)
    hooked = hooked_copy(pipe)  # built in both children so only the run differs
    cache_bytes = 0
    with torch.no_grad():
        for _ in range(2):
            if args.child == "plain":
                pipe(**call_kwargs(args))
            else:
                cache = None  # drop the warm-up cache before the measured run
                _, cache = hooked.run_with_cache(names_filter=[args.hook], **call_kwargs(args))
                cache_bytes = cache.nbytes
    print(json.dumps({"maxrss_bytes": peak_rss_bytes(), "cache_bytes": cache_bytes}))


def peak_rss_bytes() -> int:
    """This process's peak RSS. VmHWM, not ru_maxrss: on Linux ru_maxrss survives fork+exec, so a child
    would report its (bigger) parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--latent", type=int, default=64, help="latent height/width")
    parser.add_argument("--channels", type=int, default=32, help="first UNet block width")
    parser.add_argument("--text-dim", type=int, default=64)
    parser.add_argument("--hook", default="up.3.2.hook_out", help="the one hook cached at every step")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--child", choices=["plain", "cache"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    torch.set_num_threads(args.threads)
    pipe = build(args)
    hooked = hooked_copy(pipe)
    with torch.no_grad():
        plain_images = pipe(**call_kwargs(args)).images
        hooked_images, cache = hooked.run_with_cache(names_filter=[args.hook], **call_kwargs(args))
    assert torch.equal(plain_images, hooked_images), "hooked pipeline changed the images"
    assert len(cache) == 2 * args.steps, cache  # every step, both CFG branches
    del cache

    # Wall time and this process's CPU time (steadier when other processes share the cores).
    times: dict[str, dict[str, list[float]]] = {k: {"wall": [], "cpu": []} for k in ("plain", "hooked")}
    with torch.no_grad():
        for r in range(args.repeats):
            runs = [("plain", lambda: pipe(**call_kwargs(args))),
                    ("hooked", lambda: hooked.run_with_cache(names_filter=[args.hook], **call_kwargs(args)))]
            for name, fn in runs if r % 2 == 0 else runs[::-1]:
                wall, cpu = time.perf_counter(), time.process_time()
                out = fn()
                times[name]["wall"].append(time.perf_counter() - wall)
                times[name]["cpu"].append(time.process_time() - cpu)
                del out
    med = {k: {c: statistics.median(v) for c, v in d.items()} for k, d in times.items()}
    time_ratio = med["hooked"]["wall"] / med["plain"]["wall"]
    cpu_ratio = med["hooked"]["cpu"] / med["plain"]["cpu"]
    pair_ratio = statistics.median(h / p for h, p in zip(times["hooked"]["wall"], times["plain"]["wall"]))

    measured = {}
    for mode in ("plain", "cache"):
        cmd = [sys.executable, __file__, "--child", mode] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("child", "json") and v is not None]
        # Fixed mmap threshold: blocks >= 64 KiB are returned to the OS when freed, so peak RSS tracks live
        # memory instead of allocator slack (same setting in both children).
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
        measured[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    extra = measured["cache"]["maxrss_bytes"] - measured["plain"]["maxrss_bytes"]
    cache_bytes = measured["cache"]["cache_bytes"]
    memory_ratio = extra / cache_bytes

    result = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "child"},
        "unet_parameters": sum(p.numel() for p in pipe.unet.parameters()),
        "hook": hooked.canonical_hook_name(args.hook),
        "plain_median_wall_s": med["plain"]["wall"],
        "hooked_median_wall_s": med["hooked"]["wall"],
        "time_ratio": time_ratio,
        "median_pairwise_time_ratio": pair_ratio,
        "cpu_time_ratio": cpu_ratio,
        "wall_times_s": {k: d["wall"] for k, d in times.items()},
        "time_target": 1.10,
        "cache_bytes": cache_bytes,
        "extra_peak_rss_bytes": extra,
        "memory_ratio": memory_ratio,
        "memory_target": 1.2,
        "torch": torch.__version__,
    }
    print(json.dumps(result, indent=2))
    print(f"time: hooked/plain = {time_ratio:.3f} wall, {cpu_ratio:.3f} CPU (target <= 1.10)   "
          f"memory: extra peak RSS / cache = {extra / 2**20:.1f} MiB / {cache_bytes / 2**20:.1f} MiB = "
          f"{memory_ratio:.2f} (target <= 1.2)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
