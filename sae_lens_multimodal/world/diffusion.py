"""The shapes-world text-to-image diffusion model: a real diffusers pipeline in 32x32 RGB pixel space.

Components (all real library classes, saved with ``save_pretrained`` in diffusers' pipeline layout):

* ``unet``: a small diffusers ``UNet2DConditionModel`` (SD 1.x block types, cross-attention at 8x8, the
  pooled prompt added to the time embedding) that predicts the noise of 3-channel images in [-1, 1];
* ``scheduler``: a diffusers scheduler (training uses ``DDPMScheduler`` with the same betas; sampling
  defaults to ``DPMSolverMultistepScheduler``, any diffusers scheduler made ``from_config`` works);
* ``text_encoder``: the shapes-world CLIP's text tower (open_clip, ``weights/shapes_clip``) converted to a
  transformers ``CLIPTextModelWithProjection`` (same maths; its token states equal open_clip's
  ``ln_final`` output), frozen; the UNet cross-attends to its ``last_hidden_state`` like Stable Diffusion;
* ``tokenizer``: the CLIP's word-level tokenizer (transformers, read from the same ``tokenizer.json``).

:class:`ShapesDiffusionPipeline` is a ``DiffusionPipeline`` whose ``__call__`` runs classifier-free
guidance by batching ``[uncond, cond]`` like ``StableDiffusionPipeline`` (the unconditional prompt is
``""``), so :class:`~sae_lens_multimodal.diffusion.HookedDiffusionPipeline` wraps it directly.

>>> pipe = load_shapes_pipeline()                          # or ShapesDiffusionPipeline.from_pretrained("shapes-diffusion")
>>> out = pipe(["a red circle on the left"], generator=torch.Generator().manual_seed(0))
>>> out.images[0]                                          # a 32x32 PIL image
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional, Union

import torch
from diffusers import DiffusionPipeline, DPMSolverMultistepScheduler, UNet2DConditionModel
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from sae_lens_multimodal.core.atomic import atomic_directory
from sae_lens_multimodal.core.images import to_uint8  # re-exported: the world's image format
from sae_lens_multimodal.models.registry import resolve_model_name
from sae_lens_multimodal.world.clip import load_shapes_clip
from sae_lens_multimodal.world.paths import SHAPES_CLIP_DIR, SHAPES_DIFFUSION_DIR

__all__ = [
    "SHAPES_DIFFUSION_DIR",
    "SHAPES_DIFFUSION_NAME",
    "ShapesDiffusionPipeline",
    "shapes_unet_config",
    "shapes_scheduler_config",
    "text_encoder_from_open_clip",
    "tokenizer_from_clip_dir",
    "build_shapes_pipeline",
    "pixel_output",
    "scheduler_step_kwargs",
    "load_shapes_pipeline",
    "save_pipeline_atomically",
    "to_uint8",
]

#: Its registered name (registered by world/__init__.py in models/registry.py).
SHAPES_DIFFUSION_NAME = "shapes-diffusion"


def shapes_unet_config(**overrides: Any) -> dict[str, Any]:
    """``UNet2DConditionModel`` arguments of the shapes-world denoiser (32x32 RGB, ~1.4M parameters).

    SD 1.x block types with cross-attention to the text tokens only at 8x8 (down_blocks.2, the mid block
    and up_blocks.0): attention at 16x16 or 32x32 would triple the CPU cost of a training step. Every
    resnet also sees the prompt through the time embedding (``addition_embed_type="text"``: attention
    pooling of the text tokens added to the timestep embedding, as DeepFloyd IF does), which carries the
    global factors (colour, shape) cheaply. ``attention_head_dim`` is, as in SD 1.x configs, diffusers'
    (legacy) number of heads."""
    config: dict[str, Any] = dict(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=64,  # the shapes CLIP's text width
        attention_head_dim=4,
        addition_embed_type="text",
        addition_embed_type_num_heads=4,
    )
    config.update(overrides)
    return config


def shapes_scheduler_config(**overrides: Any) -> dict[str, Any]:
    """Noise schedule shared by training (DDPM) and sampling schedulers: 1000 steps, cosine betas
    (better than linear betas for small pixel-space images) and v-prediction: the UNet predicts
    ``v = sqrt(alpha_bar) * noise - sqrt(1 - alpha_bar) * image``, whose implied clean image stays well
    conditioned at the noisiest timesteps (noise prediction divides by ``sqrt(alpha_bar)``, which the cosine
    schedule takes to ~0 there, and made DPM-Solver diverge in a trial run)."""
    config: dict[str, Any] = dict(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="v_prediction",
    )
    config.update(overrides)
    return config


def tokenizer_from_clip_dir(clip_dir: Optional[os.PathLike] = None, context_length: int = 16) -> Any:
    """The shapes CLIP's word-level tokenizer as a transformers fast tokenizer (the class open_clip's
    ``HFTokenizer`` itself loads from that directory)."""
    from transformers import AutoTokenizer

    clip_dir = Path(clip_dir) if clip_dir is not None else SHAPES_CLIP_DIR
    tokenizer = AutoTokenizer.from_pretrained(str(clip_dir))
    tokenizer.model_max_length = context_length
    return tokenizer


@torch.no_grad()
def text_encoder_from_open_clip(clip_model: Any) -> Any:
    """Convert an open_clip ``CLIP``'s text tower to a transformers ``CLIPTextModelWithProjection``.

    Both are pre-LN transformers with a causal mask, exact GELU, final LayerNorm and end-of-text pooling,
    so the weights map one to one (open_clip's fused ``in_proj`` splits into q/k/v; ``text_projection`` is
    applied as ``x @ P``, i.e. a bias-free Linear with weight ``P.T``). ``last_hidden_state`` is open_clip's
    ``ln_final`` output and ``text_embeds`` its (unnormalised) ``encode_text``."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    blocks = clip_model.transformer.resblocks
    width = clip_model.token_embedding.weight.shape[1]
    first = blocks[0]
    if type(first.mlp.gelu).__name__ != "GELU" or getattr(first.mlp.gelu, "approximate", "none") != "none":
        raise ValueError(
            f"Only open_clip text towers with exact GELU convert (this one uses {type(first.mlp.gelu).__name__}); "
            "QuickGELU towers need hidden_act='quick_gelu'."
        )
    if getattr(clip_model, "text_pool_type", "argmax") != "argmax" or clip_model.attn_mask is None:
        raise ValueError("Only causal open_clip text towers pooled at the end-of-text token (argmax) convert.")
    vocab = clip_model.token_embedding.weight.shape[0]
    projection = clip_model.text_projection
    proj_dim = projection.shape[1] if isinstance(projection, torch.Tensor) else projection.out_features
    config = CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=first.mlp.c_fc.out_features,
        projection_dim=proj_dim,
        num_hidden_layers=len(blocks),
        num_attention_heads=first.attn.num_heads,
        max_position_embeddings=clip_model.positional_embedding.shape[0],
        hidden_act="gelu",
        layer_norm_eps=clip_model.ln_final.eps,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=vocab - 1,  # the shapes tokenizer gives end-of-text the largest id
    )
    model = CLIPTextModelWithProjection(config).eval()
    text = model.text_model
    text.embeddings.token_embedding.weight.copy_(clip_model.token_embedding.weight)
    text.embeddings.position_embedding.weight.copy_(clip_model.positional_embedding)
    for ours, theirs in zip(text.encoder.layers, blocks):
        q, k, v = theirs.attn.in_proj_weight.chunk(3)
        qb, kb, vb = theirs.attn.in_proj_bias.chunk(3)
        for lin, w, b in ((ours.self_attn.q_proj, q, qb), (ours.self_attn.k_proj, k, kb), (ours.self_attn.v_proj, v, vb)):
            lin.weight.copy_(w)
            lin.bias.copy_(b)
        ours.self_attn.out_proj.weight.copy_(theirs.attn.out_proj.weight)
        ours.self_attn.out_proj.bias.copy_(theirs.attn.out_proj.bias)
        for a, b in ((ours.layer_norm1, theirs.ln_1), (ours.layer_norm2, theirs.ln_2)):
            a.weight.copy_(b.weight)
            a.bias.copy_(b.bias)
        ours.mlp.fc1.weight.copy_(theirs.mlp.c_fc.weight)
        ours.mlp.fc1.bias.copy_(theirs.mlp.c_fc.bias)
        ours.mlp.fc2.weight.copy_(theirs.mlp.c_proj.weight)
        ours.mlp.fc2.bias.copy_(theirs.mlp.c_proj.bias)
    text.final_layer_norm.weight.copy_(clip_model.ln_final.weight)
    text.final_layer_norm.bias.copy_(clip_model.ln_final.bias)
    if isinstance(projection, torch.Tensor):
        model.text_projection.weight.copy_(projection.T)
    else:
        model.text_projection.weight.copy_(projection.weight)
    model.requires_grad_(False)
    return model


class ShapesDiffusionPipeline(DiffusionPipeline):
    """Text-to-image for the shapes world: CLIP text encoder -> UNet2DConditionModel -> scheduler loop.

    Pixel space (no VAE): the UNet denoises 3-channel images in [-1, 1]. ``__call__`` batches
    ``[uncond, cond]`` for classifier-free guidance exactly like ``StableDiffusionPipeline``.
    """

    model_cpu_offload_seq = "text_encoder->unet"
    _optional_components: list[str] = []

    def __init__(self, unet: UNet2DConditionModel, scheduler: Any, text_encoder: Any, tokenizer: Any) -> None:
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Union[str, os.PathLike], **kwargs: Any) -> "ShapesDiffusionPipeline":  # type: ignore[override]
        """diffusers' ``from_pretrained``; registered names (``"shapes-diffusion"``) resolve to their directory."""
        name = resolve_model_name(str(pretrained_model_name_or_path))
        return super().from_pretrained(name, **kwargs)

    # ------------------------------------------------------------------ text
    @property
    def context_length(self) -> int:
        return int(self.text_encoder.config.max_position_embeddings)

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        """Token ids [n, context_length] exactly as open_clip's tokenizer for the shapes CLIP gives them."""
        return self.tokenizer(
            list(prompts), padding="max_length", max_length=self.context_length, truncation=True, return_tensors="pt"
        ).input_ids

    @torch.no_grad()
    def encode_prompt(self, prompts: Sequence[str], device: Optional[torch.device] = None) -> torch.Tensor:
        """The UNet's conditioning: the text tower's final token states [n, context_length, width]."""
        device = device or self._execution_device
        ids = self.tokenize(prompts).to(device)
        return self.text_encoder(input_ids=ids).last_hidden_state

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def __call__(
        self,
        prompt: Union[str, Sequence[str], None] = None,
        num_inference_steps: int = 20,
        guidance_scale: float = 2.0,
        negative_prompt: Union[str, Sequence[str], None] = None,
        num_images_per_prompt: int = 1,
        generator: Union[torch.Generator, list[torch.Generator], None] = None,
        latents: Optional[torch.Tensor] = None,
        prompt_embeds: Optional[torch.Tensor] = None,
        negative_prompt_embeds: Optional[torch.Tensor] = None,
        eta: float = 0.0,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> Union[ImagePipelineOutput, tuple]:
        """Generate images for ``prompt`` (a string or a list).

        Args:
            num_inference_steps: denoising steps of ``self.scheduler``.
            guidance_scale: classifier-free guidance weight; ``> 1`` runs ``[uncond, cond]`` in one batch
                (unconditional prompt ``""``, or ``negative_prompt``); ``<= 1`` runs the prompt only. The
                default 2 matched prompts best on a validation sample (stronger guidance over-saturates
                orange towards yellow and red and blurs triangles).
            generator: a ``torch.Generator`` (or one per image) for the initial noise (and stochastic
                schedulers): the same seed gives the same images.
            latents: initial noise [n, 3, 32, 32] instead of drawing it.
            prompt_embeds / negative_prompt_embeds: precomputed text-encoder token states instead of prompts.
            eta: DDIM's eta (ignored by schedulers without it).
            output_type: ``"pil"`` (list of PIL images), ``"np"`` (float [n, H, W, 3] in [0, 1]), ``"pt"``
                (float tensor [n, 3, H, W] in [0, 1]; :func:`to_uint8` gives world-format images) or
                ``"latent"`` (the raw final sample in [-1, 1]-ish units).
        Returns:
            ``ImagePipelineOutput(images=...)`` or ``(images,)`` with ``return_dict=False``.
        """
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent'; got {output_type!r}.")
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("Pass exactly one of `prompt` (text) and `prompt_embeds` (text-encoder token states).")
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be a positive int; got {num_images_per_prompt!r}.")
        device = self._execution_device
        do_cfg = guidance_scale > 1.0

        if prompt_embeds is None:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)  # type: ignore[arg-type]
            if not prompts or not all(isinstance(p, str) for p in prompts):
                raise ValueError(f"prompt must be a string or a non-empty list of strings; got {prompt!r}.")
            prompt_embeds = self.encode_prompt(prompts, device)
        batch = prompt_embeds.shape[0]
        prompt_embeds = prompt_embeds.to(device=device, dtype=self.unet.dtype)
        if do_cfg:
            if negative_prompt_embeds is None:
                negatives = [""] * batch if negative_prompt is None else (
                    [negative_prompt] * batch if isinstance(negative_prompt, str) else list(negative_prompt)
                )
                if len(negatives) != batch:
                    raise ValueError(f"negative_prompt has {len(negatives)} entries for {batch} prompts.")
                negative_prompt_embeds = self.encode_prompt(negatives, device)
            if negative_prompt_embeds.shape != prompt_embeds.shape:
                raise ValueError(
                    f"negative_prompt_embeds {tuple(negative_prompt_embeds.shape)} must match prompt_embeds "
                    f"{tuple(prompt_embeds.shape)}."
                )
            negative_prompt_embeds = negative_prompt_embeds.to(device=device, dtype=self.unet.dtype)
        prompt_embeds = prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)
        if do_cfg:
            negative_prompt_embeds = negative_prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)
            # Unconditional rows first, conditional rows second (StableDiffusionPipeline's layout).
            embeds = torch.cat([negative_prompt_embeds, prompt_embeds])
        else:
            embeds = prompt_embeds
        n = batch * num_images_per_prompt

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        cfg = self.unet.config
        shape = (n, cfg.in_channels, cfg.sample_size, cfg.sample_size)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=self.unet.dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}; got {tuple(latents.shape)}.")
        latents = latents.to(device) * self.scheduler.init_noise_sigma
        extra = scheduler_step_kwargs(self.scheduler, eta=eta, generator=generator)

        for t in self.progress_bar(self.scheduler.timesteps):
            model_in = torch.cat([latents] * 2) if do_cfg else latents
            model_in = self.scheduler.scale_model_input(model_in, t)
            pred = self.unet(model_in, t, encoder_hidden_states=embeds, return_dict=False)[0]
            if do_cfg:
                uncond, cond = pred.chunk(2)
                pred = uncond + guidance_scale * (cond - uncond)
            latents = self.scheduler.step(pred, t, latents, **extra, return_dict=False)[0]

        return pixel_output(self, latents, output_type, return_dict)


def scheduler_step_kwargs(scheduler: Any, *, eta: float, generator: Any) -> dict[str, Any]:
    """The ``eta`` / ``generator`` keywords that this scheduler's ``step`` accepts (as diffusers pipelines pass them)."""
    params = set(inspect.signature(scheduler.step).parameters)
    return {k: v for k, v in (("eta", eta), ("generator", generator)) if k in params}


def pixel_output(pipe: DiffusionPipeline, latents: torch.Tensor, output_type: str, return_dict: bool) -> Any:
    """The end of a shapes pipeline's call (UNet or DiT, both in pixel space): latents in [-1, 1] -> the
    asked ``output_type`` ("latent", "pt", "np" or "pil"), as diffusers pipelines return them."""
    if output_type == "latent":
        images: Any = latents
    else:
        pixels = (latents / 2 + 0.5).clamp(0, 1).float()
        if output_type == "pt":
            images = pixels
        else:
            images = pixels.permute(0, 2, 3, 1).cpu().numpy()
            if output_type == "pil":
                images = pipe.numpy_to_pil(images)
    pipe.maybe_free_model_hooks()
    if not return_dict:
        return (images,)
    return ImagePipelineOutput(images=images)


def build_shapes_pipeline(
    *,
    clip_dir: Optional[os.PathLike] = None,
    unet_config: Optional[dict[str, Any]] = None,
    scheduler_config: Optional[dict[str, Any]] = None,
    seed: int = 0,
) -> ShapesDiffusionPipeline:
    """A fresh pipeline: a randomly initialised UNet (seeded), the CLIP's text tower and tokenizer
    (``clip_dir``, default the shipped shapes CLIP) and a DPM-Solver++ sampler."""
    clip, _ = load_shapes_clip(clip_dir)
    text_encoder = text_encoder_from_open_clip(clip)
    tokenizer = tokenizer_from_clip_dir(clip_dir, context_length=text_encoder.config.max_position_embeddings)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**(unet_config or shapes_unet_config()))
    # Pixel space: clamp the solver's clean-image estimates to the data range [-1, 1].
    scheduler = DPMSolverMultistepScheduler(
        **(scheduler_config or shapes_scheduler_config()), thresholding=True, sample_max_value=1.0
    )
    return ShapesDiffusionPipeline(unet=unet, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer)


def _check_dir(directory: Path) -> None:
    needed = ["model_index.json", "unet/config.json", "scheduler/scheduler_config.json", "text_encoder/config.json"]
    missing = [f for f in needed if not (directory / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{directory} is not a shapes-world diffusion pipeline directory (missing {missing}). Retrain with "
            "`python -m sae_lens_multimodal.world.training.train_diffusion --out <dir>`."
        )


def load_shapes_pipeline(
    directory: Optional[os.PathLike] = None,
    *,
    scheduler: Optional[str] = None,
    device: Union[str, torch.device] = "cpu",
    progress_bar: bool = False,
) -> ShapesDiffusionPipeline:
    """The shipped (or ``directory``'s) pipeline via ``ShapesDiffusionPipeline.from_pretrained``, offline.

    ``scheduler``: name of another diffusers scheduler class to sample with (``"DDIMScheduler"``,
    ``"EulerDiscreteScheduler"``, ...), built ``from_config`` of the saved one. The progress bar is off
    unless ``progress_bar=True``."""
    import diffusers

    directory = Path(directory) if directory is not None else SHAPES_DIFFUSION_DIR
    _check_dir(directory)
    pipe = ShapesDiffusionPipeline.from_pretrained(str(directory), local_files_only=True)
    if scheduler is not None:
        cls = getattr(diffusers, scheduler, None)
        if cls is None or not hasattr(cls, "from_config") or not scheduler.endswith("Scheduler"):
            raise ValueError(f"Unknown diffusers scheduler {scheduler!r}; e.g. 'DDIMScheduler', 'DPMSolverMultistepScheduler'.")
        pipe.scheduler = cls.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=not progress_bar)
    return pipe.to(device)


def save_pipeline_atomically(pipe: DiffusionPipeline, directory: os.PathLike, extra_files: Optional[dict[str, str]] = None) -> None:
    """``pipe.save_pretrained`` (safetensors) into a temporary sibling directory, then swap it into place,
    so ``directory`` is never left half-written. ``extra_files``: name -> text written alongside."""
    with atomic_directory(Path(directory).resolve()) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
