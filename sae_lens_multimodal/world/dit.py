"""The shapes-world diffusion transformer (``shapes-dit``): a small DiT in 32x32 RGB pixel space.

Components (all real library classes, saved with ``save_pretrained`` in diffusers' pipeline layout):

* ``transformer``: the shipped one is a small diffusers ``SD3Transformer2DModel`` (SD3-style MM-DiT: 4x4
  patches, joint attention over image and text tokens, the pooled prompt added to the timestep embedding
  that modulates every block); ``kind="pixart"`` builds a ``PixArtTransformer2DModel`` instead (adaLN-single
  timestep conditioning, cross-attention to the text tokens under their padding mask, no resolution /
  aspect-ratio conditions). Either predicts ``v`` for 3-channel images in [-1, 1];
* ``scheduler``, ``text_encoder``, ``tokenizer``: the same as shapes-diffusion's
  (:mod:`sae_lens_multimodal.world.diffusion`): the cosine v-prediction schedule sampled with DPM-Solver++,
  the shapes CLIP text tower (frozen) and its word-level tokenizer.

:class:`ShapesDiTPipeline` is a ``DiffusionPipeline`` whose ``__call__`` follows the matching diffusers
pipelines' conventions (``prompt_embeds`` with ``prompt_attention_mask`` and ``pooled_prompt_embeds``;
``[negative, positive]`` batched for classifier-free guidance; the transformer called as
``StableDiffusion3Pipeline`` / ``PixArtAlphaPipeline`` call theirs, with ``timestep=t.expand(batch)``), so
:class:`~sae_lens_multimodal.diffusion.HookedDiffusionPipeline` wraps it directly (its denoiser is ``.transformer``).

>>> pipe = load_shapes_dit_pipeline()                   # or HookedDiffusionPipeline.from_pretrained("shapes-dit")
>>> pipe(["a red circle on the left"], generator=torch.Generator().manual_seed(0)).images[0]
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional, Union

import torch
from diffusers import DiffusionPipeline, DPMSolverMultistepScheduler, PixArtTransformer2DModel, SD3Transformer2DModel
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from sae_lens_multimodal.models.registry import resolve_model_name
from sae_lens_multimodal.world.clip import load_shapes_clip
from sae_lens_multimodal.world.diffusion import (
    pixel_output,
    scheduler_step_kwargs,
    shapes_scheduler_config,
    text_encoder_from_open_clip,
    tokenizer_from_clip_dir,
)
from sae_lens_multimodal.world.paths import SHAPES_DIT_DIR

__all__ = [
    "SHAPES_DIT_DIR",
    "SHAPES_DIT_NAME",
    "ShapesDiTPipeline",
    "DIT_KINDS",
    "shapes_dit_config",
    "build_shapes_dit_pipeline",
    "load_shapes_dit_pipeline",
]

#: Its registered name (registered by world/__init__.py in models/registry.py).
SHAPES_DIT_NAME = "shapes-dit"


#: The transformer classes a shapes DiT can be: PixArt-style (cross-attention) or SD3-style (joint attention).
DIT_KINDS = {"pixart": PixArtTransformer2DModel, "sd3": SD3Transformer2DModel}


def shapes_dit_config(*, kind: str = "pixart", width: int = 128, depth: int = 6, heads: int = 4, patch_size: int = 2,
                      text_width: int = 64, pooled_width: int = 64, **overrides: Any) -> dict[str, Any]:
    """Arguments of the shapes-world DiT (``kind`` "pixart": ``PixArtTransformer2DModel``; "sd3":
    ``SD3Transformer2DModel``): ``depth`` blocks of width ``width`` (``heads`` heads) over the
    ``(32 / patch_size)^2`` patches of a 32x32 RGB image; the text tower's ``text_width``-wide token states
    are projected to ``width`` by the model's caption projection; SD3 also adds the ``pooled_width``-wide
    pooled prompt (the text tower's projection) to its timestep embedding, in every block's adaLN.
    ``out_channels=3``: no learned variance (the pipeline, like PixArt's, would drop a second half)."""
    if kind not in DIT_KINDS:
        raise ValueError(f"kind must be one of {tuple(DIT_KINDS)}; got {kind!r}.")
    if width % heads:
        raise ValueError(f"width ({width}) must be a multiple of heads ({heads}).")
    if 32 % patch_size:
        raise ValueError(f"patch_size must divide the 32-pixel image; got {patch_size}.")
    if kind == "sd3":
        sd3: dict[str, Any] = dict(
            sample_size=32, patch_size=patch_size, in_channels=3, out_channels=3, num_layers=depth,
            num_attention_heads=heads, attention_head_dim=width // heads, joint_attention_dim=text_width,
            caption_projection_dim=width, pooled_projection_dim=pooled_width, pos_embed_max_size=32 // patch_size,
        )
        sd3.update(overrides)
        return sd3
    config: dict[str, Any] = dict(
        sample_size=32,
        patch_size=patch_size,
        in_channels=3,
        out_channels=3,
        num_layers=depth,
        num_attention_heads=heads,
        attention_head_dim=width // heads,
        cross_attention_dim=width,
        caption_channels=text_width,
        use_additional_conditions=False,  # PixArt's resolution / aspect-ratio embedding: one size here
        norm_num_groups=8,  # unused by PixArt's blocks; kept small so the config reads consistently
    )
    config.update(overrides)
    return config


class ShapesDiTPipeline(DiffusionPipeline):
    """Text-to-image for the shapes world: CLIP text encoder -> PixArtTransformer2DModel -> scheduler loop.

    Pixel space (no VAE). ``__call__`` mirrors ``PixArtAlphaPipeline``: text-token states plus an attention
    mask, ``[negative, positive]`` batched for guidance (the default negative prompt is ``""``)."""

    model_cpu_offload_seq = "text_encoder->transformer"
    _optional_components: list[str] = []

    def __init__(self, transformer: Union[PixArtTransformer2DModel, SD3Transformer2DModel], scheduler: Any,
                 text_encoder: Any, tokenizer: Any) -> None:
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler, text_encoder=text_encoder,
                              tokenizer=tokenizer)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Union[str, os.PathLike], **kwargs: Any) -> "ShapesDiTPipeline":  # type: ignore[override]
        """diffusers' ``from_pretrained``; registered names (``"shapes-dit"``) resolve to their directory."""
        return super().from_pretrained(resolve_model_name(str(pretrained_model_name_or_path)), **kwargs)

    # ------------------------------------------------------------------ text
    @property
    def context_length(self) -> int:
        return int(self.text_encoder.config.max_position_embeddings)

    @property
    def joint(self) -> bool:
        """Whether the transformer is SD3-style (joint attention, pooled prompt) rather than PixArt-style."""
        return isinstance(self.transformer, SD3Transformer2DModel)

    @torch.no_grad()
    def encode_prompt(self, prompts: Sequence[str], device: Optional[torch.device] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The transformer's conditioning: the text tower's final token states [n, context_length, width],
        the tokens' attention mask [n, context_length] (1 on real tokens, 0 on padding; PixArt's
        cross-attention ignores padding) and the pooled prompt [n, projection] (its ``text_embeds``, SD3's
        ``pooled_prompt_embeds``)."""
        device = device or self._execution_device
        tokens = self.tokenizer(list(prompts), padding="max_length", max_length=self.context_length,
                                truncation=True, return_tensors="pt")
        ids, mask = tokens.input_ids.to(device), tokens.attention_mask.to(device)
        out = self.text_encoder(input_ids=ids)
        return out.last_hidden_state, mask, out.text_embeds

    def denoise(self, sample: torch.Tensor, timestep: torch.Tensor, embeds: torch.Tensor, mask: torch.Tensor,
                pooled: torch.Tensor) -> torch.Tensor:
        """One transformer call as the matching diffusers pipeline makes it (PixArtAlphaPipeline /
        StableDiffusion3Pipeline); ``timestep`` [n]."""
        if self.joint:
            return self.transformer(sample, encoder_hidden_states=embeds, pooled_projections=pooled, timestep=timestep,
                                    return_dict=False)[0]
        return self.transformer(sample, encoder_hidden_states=embeds, encoder_attention_mask=mask, timestep=timestep,
                                added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def __call__(
        self,
        prompt: Union[str, Sequence[str], None] = None,
        negative_prompt: Union[str, Sequence[str]] = "",
        num_inference_steps: int = 20,
        guidance_scale: float = 2.0,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: Union[torch.Generator, list[torch.Generator], None] = None,
        latents: Optional[torch.Tensor] = None,
        prompt_embeds: Optional[torch.Tensor] = None,
        prompt_attention_mask: Optional[torch.Tensor] = None,
        negative_prompt_embeds: Optional[torch.Tensor] = None,
        negative_prompt_attention_mask: Optional[torch.Tensor] = None,
        pooled_prompt_embeds: Optional[torch.Tensor] = None,
        negative_pooled_prompt_embeds: Optional[torch.Tensor] = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> Union[ImagePipelineOutput, tuple]:
        """Generate images for ``prompt`` (a string or a list); arguments as ``PixArtAlphaPipeline``'s.

        Args:
            guidance_scale: classifier-free guidance weight; ``> 1`` batches ``[negative, positive]``.
            prompt_embeds / prompt_attention_mask / pooled_prompt_embeds: precomputed token states, their mask
                and the pooled prompt (all three, instead of ``prompt``); likewise the ``negative_`` ones.
            output_type: ``"pil"``, ``"np"`` (float [n, H, W, 3] in [0, 1]), ``"pt"`` (float [n, 3, H, W] in
                [0, 1]) or ``"latent"`` (the raw final sample in [-1, 1]-ish units).
        """
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent'; got {output_type!r}.")
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("Pass exactly one of `prompt` (text) and `prompt_embeds` (text-encoder token states).")
        if prompt_embeds is not None and (prompt_attention_mask is None or pooled_prompt_embeds is None):
            raise ValueError("`prompt_embeds` needs its `prompt_attention_mask` and `pooled_prompt_embeds` "
                             "(the three outputs of encode_prompt).")
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be a positive int; got {num_images_per_prompt!r}.")
        device = self._execution_device
        dtype = self.transformer.dtype
        do_cfg = guidance_scale > 1.0

        if prompt_embeds is None:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)  # type: ignore[arg-type]
            if not prompts or not all(isinstance(p, str) for p in prompts):
                raise ValueError(f"prompt must be a string or a non-empty list of strings; got {prompt!r}.")
            prompt_embeds, prompt_attention_mask, pooled_prompt_embeds = self.encode_prompt(prompts, device)
        batch = prompt_embeds.shape[0]
        embeds, mask = prompt_embeds.to(device=device, dtype=dtype), prompt_attention_mask.to(device)
        pooled = pooled_prompt_embeds.to(device=device, dtype=dtype)
        if do_cfg:
            if negative_prompt_embeds is None:
                negatives = [negative_prompt] * batch if isinstance(negative_prompt, str) else list(negative_prompt)
                if len(negatives) != batch:
                    raise ValueError(f"negative_prompt has {len(negatives)} entries for {batch} prompts.")
                negative_prompt_embeds, negative_prompt_attention_mask, negative_pooled_prompt_embeds = \
                    self.encode_prompt(negatives, device)
            elif negative_prompt_attention_mask is None or negative_pooled_prompt_embeds is None:
                raise ValueError("`negative_prompt_embeds` needs its `negative_prompt_attention_mask` and "
                                 "`negative_pooled_prompt_embeds`.")
            if negative_prompt_embeds.shape != prompt_embeds.shape:
                raise ValueError(f"negative_prompt_embeds {tuple(negative_prompt_embeds.shape)} must match "
                                 f"prompt_embeds {tuple(prompt_embeds.shape)}.")
            # Negative rows first, positive rows second (PixArtAlphaPipeline's layout).
            embeds = torch.cat([negative_prompt_embeds.to(device=device, dtype=dtype), embeds])
            mask = torch.cat([negative_prompt_attention_mask.to(device), mask])
            pooled = torch.cat([negative_pooled_prompt_embeds.to(device=device, dtype=dtype), pooled])
        embeds = embeds.repeat_interleave(num_images_per_prompt, dim=0)
        mask = mask.repeat_interleave(num_images_per_prompt, dim=0)
        pooled = pooled.repeat_interleave(num_images_per_prompt, dim=0)
        n = batch * num_images_per_prompt

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        cfg = self.transformer.config
        shape = (n, cfg.in_channels, cfg.sample_size, cfg.sample_size)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}; got {tuple(latents.shape)}.")
        latents = latents.to(device) * self.scheduler.init_noise_sigma
        extra = scheduler_step_kwargs(self.scheduler, eta=eta, generator=generator)
        for t in self.progress_bar(self.scheduler.timesteps):
            model_in = torch.cat([latents] * 2) if do_cfg else latents
            model_in = self.scheduler.scale_model_input(model_in, t)
            timestep = t.expand(model_in.shape[0]) if torch.is_tensor(t) else torch.full((model_in.shape[0],), t, device=device)
            pred = self.denoise(model_in, timestep, embeds, mask, pooled)
            if do_cfg:
                uncond, cond = pred.chunk(2)
                pred = uncond + guidance_scale * (cond - uncond)
            if cfg.out_channels // 2 == cfg.in_channels:  # a learned-variance model: keep the prediction half
                pred = pred.chunk(2, dim=1)[0]
            latents = self.scheduler.step(pred, t, latents, **extra, return_dict=False)[0]

        return pixel_output(self, latents, output_type, return_dict)


def build_shapes_dit_pipeline(
    *,
    clip_dir: Optional[os.PathLike] = None,
    transformer_config: Optional[dict[str, Any]] = None,
    scheduler_config: Optional[dict[str, Any]] = None,
    seed: int = 0,
) -> ShapesDiTPipeline:
    """A fresh pipeline: a randomly initialised transformer (seeded), the CLIP's text tower and tokenizer
    (``clip_dir``, default the shipped shapes CLIP) and a DPM-Solver++ sampler (as shapes-diffusion's)."""
    clip, _ = load_shapes_clip(clip_dir)
    text_encoder = text_encoder_from_open_clip(clip)
    tokenizer = tokenizer_from_clip_dir(clip_dir, context_length=text_encoder.config.max_position_embeddings)
    config = transformer_config or shapes_dit_config(text_width=text_encoder.config.hidden_size)
    kind = "sd3" if "pooled_projection_dim" in config else "pixart"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = DIT_KINDS[kind](**config)
    scheduler = DPMSolverMultistepScheduler(
        **(scheduler_config or shapes_scheduler_config()), thresholding=True, sample_max_value=1.0
    )
    return ShapesDiTPipeline(transformer=transformer, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer)


def load_shapes_dit_pipeline(
    directory: Optional[os.PathLike] = None,
    *,
    scheduler: Optional[str] = None,
    device: Union[str, torch.device] = "cpu",
    progress_bar: bool = False,
) -> ShapesDiTPipeline:
    """The shipped (or ``directory``'s) pipeline via ``ShapesDiTPipeline.from_pretrained``, offline;
    ``scheduler``: another diffusers scheduler class name to sample with (as
    :func:`~sae_lens_multimodal.world.diffusion.load_shapes_pipeline`)."""
    import diffusers

    directory = Path(directory) if directory is not None else SHAPES_DIT_DIR
    needed = ["model_index.json", "transformer/config.json", "scheduler/scheduler_config.json", "text_encoder/config.json"]
    missing = [f for f in needed if not (directory / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{directory} is not a shapes-world DiT pipeline directory (missing {missing}). Retrain with "
            "`python -m sae_lens_multimodal.world.training.train_dit --out <dir>`."
        )
    pipe = ShapesDiTPipeline.from_pretrained(str(directory), local_files_only=True)
    if scheduler is not None:
        cls = getattr(diffusers, scheduler, None)
        if cls is None or not hasattr(cls, "from_config") or not scheduler.endswith("Scheduler"):
            raise ValueError(f"Unknown diffusers scheduler {scheduler!r}; e.g. 'DDIMScheduler', 'DPMSolverMultistepScheduler'.")
        pipe.scheduler = cls.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=not progress_bar)
    return pipe.to(device)
