"""Tiny random-init diffusers components and pipelines, built offline.

Block layouts follow the real configs (SD 1.x: 3 cross-attention down blocks + 1 plain, mirrored up;
SDXL: plain + 2 cross-attention down blocks with 1/2/10 transformer layers, text_time conditioning;
PixArt/SD3/Flux: their transformer block types, SD3 with a dual-attention block, qk-norm and the
text-dropping last block). Channels, heads and DiT depth are scaled down so a run takes milliseconds.
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    PixArtAlphaPipeline,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

TEXT_DIM = 32


def clip_tokenizer() -> CLIPTokenizer:
    """A byte-level CLIP BPE tokenizer with no merges (every character is a token): works offline."""
    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _clip_config(tok: CLIPTokenizer, hidden: int = TEXT_DIM) -> CLIPTextConfig:
    vocab = tok.get_vocab()
    return CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=hidden,
        bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
    )


def vae(latent_channels: int = 4, **kwargs) -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8, sample_size=32, **kwargs,
    ).eval()


def sd_unet() -> UNet2DConditionModel:
    """SD 1.x block layout (CrossAttnDown x3 + Down; Up + CrossAttnUp x3; 2 resnets per block)."""
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(32, 32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=TEXT_DIM, attention_head_dim=4, norm_num_groups=8,
    ).eval()


def sdxl_unet() -> UNet2DConditionModel:
    """SDXL block layout (Down + CrossAttnDown x2 with 1/2/10 transformer layers, text_time embedding)."""
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(2, 4, 4), use_linear_projection=True,
        cross_attention_dim=2 * TEXT_DIM, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + TEXT_DIM, norm_num_groups=8,
    ).eval()


def sd_pipeline(unet: UNet2DConditionModel | None = None, scheduler=None) -> StableDiffusionPipeline:
    tok = clip_tokenizer()
    pipe = StableDiffusionPipeline(
        vae=vae(), text_encoder=CLIPTextModel(_clip_config(tok)).eval(), tokenizer=tok,
        unet=unet if unet is not None else sd_unet(),
        scheduler=scheduler if scheduler is not None else DDIMScheduler(num_train_timesteps=1000, clip_sample=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sdxl_pipeline() -> StableDiffusionXLPipeline:
    tok = clip_tokenizer()
    pipe = StableDiffusionXLPipeline(
        vae=vae(), text_encoder=CLIPTextModel(_clip_config(tok)).eval(),
        text_encoder_2=CLIPTextModelWithProjection(_clip_config(tok)).eval(), tokenizer=tok, tokenizer_2=tok,
        unet=sdxl_unet(), scheduler=EulerDiscreteScheduler(num_train_timesteps=1000),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pixart_transformer() -> PixArtTransformer2DModel:
    return PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        norm_num_groups=8, cross_attention_dim=16, sample_size=8, patch_size=2, caption_channels=TEXT_DIM,
    ).eval()


def pixart_pipeline() -> PixArtAlphaPipeline:
    pipe = PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=vae(), transformer=pixart_transformer(),
                               scheduler=DPMSolverMultistepScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd3_transformer() -> SD3Transformer2DModel:
    """SD3.5-style: dual attention in block 0, qk rms-norm, last block drops the text stream."""
    return SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=3, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=TEXT_DIM, caption_projection_dim=16,
        pooled_projection_dim=TEXT_DIM, pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm",
    ).eval()


def sd3_pipeline() -> StableDiffusion3Pipeline:
    pipe = StableDiffusion3Pipeline(
        transformer=sd3_transformer(), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae(shift_factor=0.0), text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
        text_encoder_3=None, tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux_transformer() -> FluxTransformer2DModel:
    return FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=TEXT_DIM, pooled_projection_dim=TEXT_DIM,
        guidance_embeds=True, axes_dims_rope=(2, 2, 4),
    ).eval()


def flux_pipeline() -> FluxPipeline:
    pipe = FluxPipeline(
        transformer=flux_transformer(),
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=16,
                                                  max_image_seq_len=256),
        vae=vae(shift_factor=0.0), text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def embeds(batch: int = 1, seq: int = 7, dim: int = TEXT_DIM, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, seq, dim, generator=torch.Generator().manual_seed(seed))


def pooled(batch: int = 1, dim: int = TEXT_DIM, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, dim, generator=torch.Generator().manual_seed(seed))


def dit_call_kwargs(family: str, guidance: bool = True) -> dict:
    """Pipeline kwargs for the DiT families (prompt embeddings instead of text encoders)."""
    kw: dict = {"num_inference_steps": 2, "height": 32, "width": 32, "output_type": "pt"}
    if family == "pixart":
        kw.update(prompt_embeds=embeds(), prompt_attention_mask=torch.ones(1, 7, dtype=torch.long),
                  negative_prompt=None, negative_prompt_embeds=embeds(seed=5), negative_prompt_attention_mask=torch.ones(1, 7, dtype=torch.long),
                  guidance_scale=4.5 if guidance else 1.0, use_resolution_binning=False, max_sequence_length=7)
    elif family == "sd3":
        kw.update(prompt_embeds=embeds(), pooled_prompt_embeds=pooled(), negative_prompt_embeds=embeds(seed=5),
                  negative_pooled_prompt_embeds=pooled(seed=6), guidance_scale=7.0 if guidance else 1.0)
    elif family == "flux":
        kw.update(prompt_embeds=embeds(), pooled_prompt_embeds=pooled(), guidance_scale=3.5)
        if guidance:
            kw.update(negative_prompt_embeds=embeds(seed=5), negative_pooled_prompt_embeds=pooled(seed=6),
                      true_cfg_scale=2.0)
    return kw


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)
