"""A diffusion lens: the denoiser's current clean-image prediction read out after every block, at every step.

Like the logit lens of a language model, the readout after block ``l`` runs the network with every block
*after* ``l`` (in execution order) skipped, and converts the resulting prediction to a clean image ``x0``
with the scheduler's own noise schedule. "Skipped" is defined per block kind so that the network still
produces an output of the right shape:

* a DiT / PixArt / SD3 transformer block, or a UNet attention block (``Transformer2DModel``): its update
  is removed (``hook_update`` set to zero), so it passes its input on. For a DiT this is exactly "apply the
  final norm + ``proj_out`` (+ unpatchify) to block ``l``'s output";
* a UNet resnet (``ResnetBlock2D``): its residual branch is removed, so its output is its shortcut path,
  ``shortcut(input) / output_scale_factor``: the identity, or the 1x1 ``conv_shortcut`` where the channel
  count changes (the up path's resnets, which take the concatenated skip connection);
* kept as they are: the time / text embeddings, the input convolution, down- and up-samplers and the
  output head (``conv_norm_out``, ``conv_act``, ``conv_out``): they carry no block computation of their
  own and are needed to get back to the model's output resolution.

Every step's denoiser inputs come from one ordinary sampling run (the lens does not change the
trajectory); each readout is one extra denoiser call on those inputs, with classifier-free guidance
combined as the sampler combines it. The prediction is turned into ``x0`` by the scheduler's
parameterisation (``epsilon``, ``v_prediction`` or ``sample`` with ``alphas_cumprod``; flow matching:
``x0 = x_t - sigma * v``) and decoded to pixels (pixel-space models: ``x0`` is the image; latent models:
the pipeline's VAE). The readout after the last block is the model's own ``x0`` prediction.

>>> lens = diffusion_lens(pipe, prompts, num_inference_steps=10)      # prompts: factor dicts or strings
>>> lens.plot_grid("lens.png"); lens.readable_steps(threshold=0.8)     # per block, per factor
"""

from __future__ import annotations

import copy
import html as _html
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import torch

from sae_lens_multimodal.analysis.diffusion_patching import as_hooked_pipeline, unet_blocks
from sae_lens_multimodal.analysis.factor_worlds import FactorWorld, factor_world_for
from sae_lens_multimodal.analysis.plotting import PathLike, blank_figure, heatmap, save_figure
from sae_lens_multimodal.core.arguments import check_guidance_scale, positive_int
from sae_lens_multimodal.core.atomic import atomic_write_text
from sae_lens_multimodal.core.denoising import cfg_row_split, current_denoising_state
from sae_lens_multimodal.core.images import to_uint8

__all__ = [
    "LensResult",
    "denoiser_blocks",
    "skip_block_hooks",
    "prediction_to_x0",
    "pixel_decoder",
    "judge_factors",
    "diffusion_lens",
]

Prompt = Union[str, dict[str, str]]


def denoiser_blocks(hooked: Any) -> list[str]:
    """The denoiser's blocks in execution order: a UNet's resnets and attention blocks (down, mid, up), a
    DiT's ``transformer_blocks.N`` then ``single_transformer_blocks.N`` (Flux)."""
    unet = unet_blocks(hooked)
    if unet:
        return unet
    out = []
    for stack in ("transformer_blocks", "single_transformer_blocks"):
        idx = sorted({int(n.split(".")[1]) for n in hooked.hook_dict if n.startswith(stack + ".")
                      and n.count(".") == 2 and n.endswith(".hook_out")})
        out += [f"{stack}.{i}" for i in idx]
    if not out:
        raise ValueError(f"{type(hooked.denoiser).__name__} has no UNet or DiT blocks with hook_out hooks.")
    return out


def _is_resnet(module: torch.nn.Module) -> bool:
    return hasattr(module, "conv1") and hasattr(module, "conv2") and hasattr(module, "output_scale_factor")


def _resnet_shortcut_hooks(name: str, resnet: torch.nn.Module) -> list[tuple[str, Callable]]:
    """hook_in remembers the input; hook_out returns ``shortcut(input) / output_scale_factor``."""
    seen: list[torch.Tensor] = []

    def grab(x: torch.Tensor, hook: Any) -> None:
        seen.append(x)

    def shortcut(out: torch.Tensor, hook: Any) -> torch.Tensor:
        x = seen.pop().permute(0, 3, 1, 2)  # hooks see (b, h, w, c); the resnet's own tensors are (b, c, h, w)
        if getattr(resnet, "upsample", None) is not None:
            x = resnet.upsample(x)
        elif getattr(resnet, "downsample", None) is not None:
            x = resnet.downsample(x)
        if resnet.conv_shortcut is not None:
            x = resnet.conv_shortcut(x)
        return (x / resnet.output_scale_factor).permute(0, 2, 3, 1).to(out.dtype)

    return [(f"{name}.hook_in", grab), (f"{name}.hook_out", shortcut)]


def skip_block_hooks(hooked: Any, blocks: Sequence[str]) -> list[tuple[str, Callable]]:
    """TransformerLens forward hooks that skip ``blocks`` (see the module doc: resnets keep their shortcut
    path, every other block passes its input on). Use with ``hooked.hooks(fwd_hooks=...)`` or
    ``run_with_hooks``."""
    hooks: list[tuple[str, Callable]] = []
    for b in blocks:
        name = hooked.canonical_hook_name(b)
        try:
            module = hooked.denoiser.get_submodule(name)
        except AttributeError:
            raise KeyError(f"{b!r} is not a block of this denoiser; blocks: {denoiser_blocks(hooked)}.") from None
        if _is_resnet(module):
            hooks += _resnet_shortcut_hooks(name, module)
        elif f"{name}.hook_update" in hooked.hook_dict:
            hooks.append((f"{name}.hook_update", lambda u, hook: torch.zeros_like(u)))
        else:
            raise ValueError(f"{name} ({type(module).__name__}) has no hook_update and is not a resnet; it cannot be skipped.")
    return hooks


def prediction_to_x0(pred: torch.Tensor, sample: torch.Tensor, timestep: Any, scheduler: Any) -> torch.Tensor:
    """The clean sample implied by the denoiser's prediction at ``timestep`` for the (model-input) ``sample``.

    DDPM-family schedulers (``alphas_cumprod``): ``epsilon``: ``(x - sqrt(1-a) eps) / sqrt(a)``;
    ``v_prediction``: ``sqrt(a) x - sqrt(1-a) v``; ``sample``: the prediction. Flow matching (no
    ``alphas_cumprod``, sigma = t / num_train_timesteps): ``x - sigma v``. A learned-variance output (twice
    the input channels, as PixArt's) is cut to its first half."""
    if pred.shape[1] == 2 * sample.shape[1]:
        pred = pred[:, : sample.shape[1]]
    t = float(timestep.flatten()[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
    cfg = scheduler.config
    alphas = getattr(scheduler, "alphas_cumprod", None)
    if alphas is None:
        if "FlowMatch" not in type(scheduler).__name__:
            raise ValueError(f"{type(scheduler).__name__} has no alphas_cumprod and is not a flow-matching scheduler; "
                             "pass x0_fn= to convert its predictions.")
        sigma = t / float(cfg.num_train_timesteps)
        return sample - sigma * pred
    a = alphas[int(round(t))].to(sample.device, torch.float32)
    kind = cfg.get("prediction_type", "epsilon")
    x, p = sample.float(), pred.float()
    if kind == "epsilon":
        return (x - (1 - a).sqrt() * p) / a.sqrt()
    if kind == "v_prediction":
        return a.sqrt() * x - (1 - a).sqrt() * p
    if kind == "sample":
        return p
    raise ValueError(f"Unknown prediction_type {kind!r}; pass x0_fn= to convert this scheduler's predictions.")


def pixel_decoder(pipe: Any) -> Callable[[torch.Tensor], np.ndarray]:
    """``x0 -> uint8 images``: through the pipeline's VAE when it has one, else ``x0`` is the image in [-1, 1]."""
    inner = getattr(pipe, "pipe", pipe)
    vae = getattr(inner, "vae", None)

    @torch.no_grad()
    def decode(x0: torch.Tensor) -> np.ndarray:
        if vae is not None:
            cfg = vae.config
            z = x0.to(vae.dtype) / cfg.scaling_factor + (getattr(cfg, "shift_factor", None) or 0.0)
            x0 = vae.decode(z, return_dict=False)[0]
        return to_uint8((x0.float() / 2 + 0.5).clamp(0, 1))

    return decode


def judge_factors(judge: Any, images: np.ndarray, prompts: Sequence[dict[str, str]], factors: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Judged accuracy and mean probability of the prompt's value per factor, each ``[n_factors]``."""
    probs = judge.probabilities(images)
    acc, p = [], []
    for f in factors:
        truth = torch.tensor([judge.values[f].index(q[f]) for q in prompts])
        marginal = probs @ judge.membership[f]
        acc.append((marginal.argmax(-1) == truth).float().mean())
        p.append(marginal[torch.arange(len(truth)), truth].mean())
    return torch.stack(acc), torch.stack(p)


@dataclass
class LensResult:
    """Readouts of the clean image after each block (rows) at each sampling step (columns)."""

    blocks: list[str]
    #: the scheduler's timesteps, in sampling order
    timesteps: list[Any]
    prompts: list[str]
    #: uint8 [n_blocks, n_steps, n_prompts, H, W, 3]
    images: np.ndarray = field(repr=False)
    #: the model's own final images, uint8 [n_prompts, H, W, 3]
    final_images: np.ndarray = field(repr=False)
    factors: tuple[str, ...] = ()
    #: [n_blocks, n_steps, n_factors] judged accuracy / mean probability of the prompt's value
    accuracy: Optional[torch.Tensor] = None
    p_true: Optional[torch.Tensor] = None
    #: [n_factors]: the same judge on the final images
    final_accuracy: Optional[torch.Tensor] = None
    #: raw x0 readouts [n_blocks, n_steps, n_prompts, C, H, W] (model space; latents for latent models)
    x0: Optional[torch.Tensor] = field(default=None, repr=False)

    def readable_steps(self, threshold: float = 0.8) -> dict[str, dict[str, Optional[int]]]:
        """Per factor and block: the first step index from which the judged accuracy stays >= ``threshold``
        for every later step (None: never)."""
        if self.accuracy is None:
            raise ValueError("This lens was run without a judge (pass factor-dict prompts).")
        out: dict[str, dict[str, Optional[int]]] = {}
        for j, f in enumerate(self.factors):
            out[f] = {}
            for i, b in enumerate(self.blocks):
                ok = (self.accuracy[i, :, j] >= threshold).tolist()
                first = None
                for s in range(len(ok) - 1, -1, -1):
                    if not ok[s]:
                        break
                    first = s
                out[f][b] = first
        return out

    def readable_table(self, threshold: float = 0.8) -> "Any":
        """DataFrame: one row per block, per factor the first readable step and its timestep."""
        import pandas as pd

        steps = self.readable_steps(threshold)
        rows = []
        for b in self.blocks:
            row: dict[str, Any] = {"block": b}
            for f in self.factors:
                s = steps[f][b]
                row[f] = "never" if s is None else f"step {s} (t={self.timesteps[s]})"
            rows.append(row)
        return pd.DataFrame(rows)

    def plot_grid(self, path: PathLike, prompt_index: int = 0, scale: int = 2) -> Path:
        """PNG: block (rows) x step (columns) readouts for one prompt, the final image on the right."""
        from PIL import Image, ImageDraw

        imgs = self.images[:, :, prompt_index]
        nb, ns, h, w, _ = imgs.shape
        label_w, pad, top = 190, 2, 14
        cw, ch = w * scale + pad, h * scale + pad
        canvas = Image.new("RGB", (label_w + (ns + 1) * cw + pad, top + nb * ch + pad), "white")
        draw = ImageDraw.Draw(canvas)
        for s, t in enumerate(self.timesteps):
            draw.text((label_w + s * cw, 1), str(int(t)) if float(t).is_integer() else f"{float(t):.0f}", fill="black")
        draw.text((label_w + ns * cw, 1), "final", fill="black")
        for i, b in enumerate(self.blocks):
            y = top + i * ch
            draw.text((2, y + ch // 2 - 6), b.replace("transformer_blocks", "tb")[-30:], fill="black")
            for s in range(ns):
                tile = Image.fromarray(imgs[i, s]).resize((w * scale, h * scale), Image.Resampling.NEAREST)
                canvas.paste(tile, (label_w + s * cw, y))
        final = Image.fromarray(self.final_images[prompt_index]).resize((w * scale, h * scale), Image.Resampling.NEAREST)
        canvas.paste(final, (label_w + ns * cw, top + (nb - 1) * ch))
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        canvas.save(path)
        return path

    def plot_accuracy(self, path: PathLike) -> Path:
        """PNG: one block x step heatmap of judged accuracy per factor."""
        if self.accuracy is None:
            raise ValueError("This lens was run without a judge (pass factor-dict prompts).")
        n = len(self.factors)
        fig = blank_figure(figsize=(3.2 * n + 1.5, 0.3 * len(self.blocks) + 2.0))
        for j, f in enumerate(self.factors):
            ax = fig.add_subplot(1, n, j + 1)
            heatmap(ax, self.accuracy[:, :, j], row_labels=self.blocks if j == 0 else [""] * len(self.blocks),
                    col_labels=[str(int(float(t))) for t in self.timesteps], title=f"{f} accuracy", symmetric=False,
                    cmap="viridis", annotate=False)
        return save_figure(fig, path)

    def to_html(self, path: PathLike, prompt_indices: Sequence[int] = (0,), scale: int = 3) -> Path:
        """A self-contained HTML page: per prompt the block x step grid, then the readable-step table."""
        # reports.html: base64 PNG tags; imported here because reports pulls in the dashboard helpers
        from sae_lens_multimodal.reports.html import image_tag

        parts = ["<html><head><meta charset='utf-8'><title>Diffusion lens</title><style>td{padding:1px;"
                 "font:11px sans-serif} img{image-rendering:pixelated}</style></head><body><h1>Diffusion lens</h1>"]
        for p in prompt_indices:
            parts.append(f"<h2>{_html.escape(self.prompts[p])}</h2><table><tr><td></td>")
            parts += [f"<td>t={_html.escape(str(t))}</td>" for t in self.timesteps] + ["<td>final</td></tr>"]
            for i, b in enumerate(self.blocks):
                parts.append(f"<tr><td>{_html.escape(b)}</td>")
                parts += [f"<td>{image_tag(self.images[i, s, p], scale=scale)}</td>" for s in range(len(self.timesteps))]
                last = image_tag(self.final_images[p], scale=scale) if i == len(self.blocks) - 1 else ""
                parts.append(f"<td>{last}</td></tr>")
            parts.append("</table>")
        if self.accuracy is not None:
            parts.append("<h2>First step from which each factor stays readable (judged accuracy >= 0.8)</h2>")
            parts.append(self.readable_table().to_html(index=False))
        parts.append("</body></html>")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return atomic_write_text(Path(path), "".join(parts))


def _sample_and_timestep(args: tuple, kwargs: dict) -> tuple[torch.Tensor, Any]:
    sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
    t = args[1] if len(args) > 1 else kwargs.get("timestep")
    if sample is None or t is None:
        raise ValueError("Could not find the denoiser's sample and timestep among its call arguments.")
    return sample, t


@torch.no_grad()
def diffusion_lens(
    pipe: Any,
    prompts: Sequence[Prompt],
    *,
    blocks: Optional[Sequence[str]] = None,
    num_inference_steps: int = 10,
    guidance_scale: float = 2.0,
    seed: int = 0,
    judge: Any = None,
    world: Optional[FactorWorld] = None,
    factors: Optional[Sequence[str]] = None,
    decode: Optional[Callable[[torch.Tensor], np.ndarray]] = None,
    x0_fn: Optional[Callable[[torch.Tensor, torch.Tensor, Any, Any], torch.Tensor]] = None,
    keep_x0: bool = False,
    **pipe_kwargs: Any,
) -> LensResult:
    """Read out the clean-image prediction after each of ``blocks`` (default every block,
    :func:`denoiser_blocks`) at every sampling step (see the module doc for what "the rest skipped" means).

    Args:
        pipe: a diffusers pipeline or a HookedDiffusionPipeline.
        prompts: strings, or factor dicts (captioned by ``world``); with factor dicts every readout image
            is judged per factor (``judge``, default the world's) and :meth:`LensResult.readable_steps` works.
        guidance_scale: as in sampling; readouts combine the CFG branches the same way.
        decode: ``x0 -> uint8 [n, H, W, 3]`` (default :func:`pixel_decoder`).
        x0_fn: ``(prediction, sample, timestep, scheduler) -> x0`` (default :func:`prediction_to_x0`).
        keep_x0: also return the raw readouts (``LensResult.x0``).
        pipe_kwargs: passed to the pipeline (e.g. ``height``/``width``, DiT prompt embeddings).
    """
    positive_int(num_inference_steps, "num_inference_steps")
    check_guidance_scale(guidance_scale)
    if not prompts:
        raise ValueError("prompts must be a non-empty list of strings or factor dicts.")
    hooked = as_hooked_pipeline(pipe)
    all_blocks = denoiser_blocks(hooked)
    chosen = list(all_blocks) if blocks is None else [hooked.canonical_hook_name(b) for b in blocks]
    unknown = [b for b in chosen if b not in all_blocks]
    if unknown:
        raise KeyError(f"{unknown} are not blocks of this denoiser; blocks: {all_blocks}.")
    dict_prompts = all(isinstance(p, dict) for p in prompts)
    if dict_prompts:
        world = world or factor_world_for(hooked)
        text: Optional[list[str]] = world.captions(prompts)
    elif all(isinstance(p, str) for p in prompts):
        text = list(prompts)  # type: ignore[arg-type]
    else:
        raise ValueError("prompts must be all strings or all factor dicts.")
    scheduler = getattr(hooked.pipe, "scheduler")
    decode = decode or pixel_decoder(hooked)
    x0_fn = x0_fn or prediction_to_x0

    # 1. One ordinary sampling run; remember every denoiser call's inputs and CFG layout.
    calls: list[tuple[tuple, dict, Optional[str]]] = []
    den = hooked.denoiser

    def remember(module: Any, args: tuple, kwargs: dict) -> None:
        state = current_denoising_state()
        calls.append((args, dict(kwargs), None if state is None else state.branch))

    handle = den.register_forward_pre_hook(remember, with_kwargs=True)
    try:
        call_kwargs = dict(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                           generator=torch.Generator().manual_seed(seed), output_type="pt", **pipe_kwargs)
        # Through the wrapper, so each call's DenoisingState says which rows are which CFG branch.
        out = hooked.run_with_hooks(text, fwd_hooks=[], **call_kwargs) if "prompt_embeds" not in pipe_kwargs \
            else hooked.run_with_hooks(fwd_hooks=[], **call_kwargs)
    finally:
        handle.remove()
    final = out if isinstance(out, torch.Tensor) else (out.images if hasattr(out, "images") else out[0])
    final_images = to_uint8(final) if isinstance(final, torch.Tensor) else np.asarray(final)
    if not calls:
        raise RuntimeError("The pipeline never called its denoiser.")

    def combine(pred: torch.Tensor, branch: Optional[str]) -> tuple[torch.Tensor, slice]:
        if branch == "both" and guidance_scale > 1.0:
            uncond, cond = cfg_row_split(pred.shape[0])
            return pred[uncond] + guidance_scale * (pred[cond] - pred[uncond]), cond
        return pred, slice(None)

    # 2. Per step and block: rerun the denoiser on that step's inputs with the later blocks skipped.
    index = {b: i for i, b in enumerate(all_blocks)}
    readouts = []
    timesteps = []
    for args, kwargs, branch in calls:
        sample, t = _sample_and_timestep(args, kwargs)
        timesteps.append(float(t.flatten()[0]) if isinstance(t, torch.Tensor) else float(t))
        row = []
        for b in chosen:
            later = all_blocks[index[b] + 1:]
            with hooked.hooks(fwd_hooks=skip_block_hooks(hooked, later)):
                pred = den(*args, **copy.copy(kwargs))
            pred = pred[0] if isinstance(pred, tuple) else getattr(pred, "sample", pred)
            guided, rows = combine(pred, branch)
            row.append(x0_fn(guided, sample[rows], t, scheduler).float())
        readouts.append(torch.stack(row))
    x0 = torch.stack(readouts, dim=1)  # [n_blocks, n_steps, n, C, H, W]
    nb, ns = x0.shape[:2]
    images = decode(x0.flatten(0, 2))
    images = images.reshape(nb, ns, -1, *images.shape[1:])

    result = LensResult(blocks=chosen, timesteps=[int(t) if float(t).is_integer() else t for t in timesteps],
                        prompts=text or [], images=images, final_images=final_images,
                        x0=x0 if keep_x0 else None)
    if dict_prompts:
        judge = judge if judge is not None else world.make_judge()  # type: ignore[union-attr]
        facs = tuple(factors) if factors is not None else tuple(f for f in judge.factors if all(f in p for p in prompts))
        acc = torch.zeros(nb, ns, len(facs))
        ptrue = torch.zeros_like(acc)
        for i in range(nb):
            for s in range(ns):
                acc[i, s], ptrue[i, s] = judge_factors(judge, images[i, s], prompts, facs)  # type: ignore[arg-type]
        result.factors, result.accuracy, result.p_true = facs, acc, ptrue
        result.final_accuracy = judge_factors(judge, final_images, prompts, facs)[0]  # type: ignore[arg-type]
    return result
