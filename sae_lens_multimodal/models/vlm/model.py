"""HookedVLM itself: the three hooked parts (vision tower, projector, language model) and the forward that
splices image features into the prompt. Module overview and hook names: :mod:`sae_lens_multimodal.models.vlm`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional, Union

import torch
from torch import nn
from transformer_lens.hook_points import HookPoint

from sae_lens_multimodal.core.contract import HookSpec, nest_specs, norm_specs, transformer_block_specs
from sae_lens_multimodal.core.hooked_root import MultimodalHookedRootModule
from sae_lens_multimodal.core.nested import NestedSAEHostMixin
from sae_lens_multimodal.models.hooked_vit import HookedViT
from sae_lens_multimodal.models.vlm.cache import VLMActivationCache
from sae_lens_multimodal.models.vlm.config import HookedVLMConfig, Tensorish
from sae_lens_multimodal.models.vlm.generation import VLMGenerationMixin
from sae_lens_multimodal.models.vlm.language_model import VLMLanguageModel
from sae_lens_multimodal.models.vlm.loading import VLM_CLASSES, _generation_ids, _load_vlm_source, _resolve_feature_layer
from sae_lens_multimodal.models.vlm.tiling import encode_images_next

__all__ = ["HookedVLM", "VLMProjector"]


class VLMProjector(nn.Module):
    """LLaVA's multimodal projector (linear -> activation -> linear), running the original modules.

    Hooks: ``hook_in`` [n_images, n_tokens, d_vision * n_feature_layers] (selected vision features),
    ``hook_pre`` / ``hook_post`` [.., d_text] (first linear; activation), ``hook_out`` [.., d_text].
    """

    def __init__(self, projector: nn.Module):
        super().__init__()
        self.linear_1, self.act, self.linear_2 = projector.linear_1, projector.act, projector.linear_2
        for name in ("hook_in", "hook_pre", "hook_post", "hook_out"):
            setattr(self, name, HookPoint())

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.hook_in(features)
        x = self.hook_post(self.act(self.hook_pre(self.linear_1(x))))
        return self.hook_out(self.linear_2(x))


class HookedVLM(VLMGenerationMixin, NestedSAEHostMixin, MultimodalHookedRootModule):
    """A LLaVA-style VLM with every activation of the vision tower, projector and language model hookable.

    Build with :meth:`from_pretrained` (a transformers ``LlavaForConditionalGeneration`` /
    ``LlavaNextForConditionalGeneration`` object, a hub repo id such as ``"llava-hf/llava-1.5-7b-hf"``, or a
    local directory). ``model(input_ids, pixel_values)`` returns the logits [batch, pos, d_vocab]; the image
    placeholders in ``input_ids`` (``cfg.image_token_id``, one per image-feature token) are replaced by the
    projected image features, as transformers does.
    """

    #: Parts where a bare hook name (as recorded on a standalone sub-model) may live, preferred first.
    BARE_NAME_PARTS = ("vision", "lm")
    #: Part (core.contract.PARTS) -> the attribute holding it, which is also its hook-name prefix.
    PART_PREFIXES = {"vision": "vision", "projector": "projector", "language_model": "lm"}

    activation_cache_class = VLMActivationCache

    def __init__(self, vision: HookedViT, projector: VLMProjector, lm: VLMLanguageModel, cfg: HookedVLMConfig,
                 image_newline: Optional[torch.Tensor] = None, processor: Any = None):
        super().__init__()
        self.cfg = cfg
        self.vision = vision
        self.projector = projector
        self.lm = lm
        if image_newline is not None:  # LLaVA-NeXT's learned row separator (the original Parameter)
            self.image_newline = image_newline
        #: [n_image_tokens_total, d_text]: the image features in the order they fill the placeholders
        #: (LLaVA: projector.hook_out flattened; LLaVA-NeXT: after crop packing and newline tokens).
        self.hook_image_features = HookPoint()
        #: The transformers processor (tokenizer + image processor) when loaded by name, else None.
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", None)
        #: bool [batch, pos]: image-token positions of the last forward (the prompt, during generate).
        self.last_image_token_mask: Optional[torch.Tensor] = None
        self._sae_locations: dict[str, tuple[str, str]] = {}
        self.setup()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls,
        model: Union[str, Path, nn.Module],
        *,
        device: Optional[Union[str, torch.device]] = None,
        dtype: Optional[torch.dtype] = None,
        processor: Any = None,
        **source_kwargs: Any,
    ) -> "HookedVLM":
        """Hook a transformers LLaVA / LLaVA-NeXT model.

        ``model`` is a ``LlavaForConditionalGeneration`` / ``LlavaNextForConditionalGeneration`` object (its
        language model and projector modules are reused in place, sharing weights with it; the vision tower
        is converted to a HookedViT, a copy; the object itself is not modified), or a hub repo id / local directory
        whose ``config.json`` has ``model_type`` "llava" or "llava_next" (loaded with ``from_pretrained``;
        ``dtype`` and ``source_kwargs`` go there, e.g. ``attn_implementation="sdpa"``). ``processor``
        overrides the processor found next to the checkpoint.
        """
        if isinstance(model, (str, Path)):
            model, found = _load_vlm_source(str(model), dtype=dtype, **source_kwargs)
            processor = processor if processor is not None else found
        elif source_kwargs:
            raise TypeError(
                f"Keyword arguments {sorted(source_kwargs)} only apply when loading by name; got a built model."
            )
        if isinstance(model, HookedVLM):
            return model
        kind = type(model).__name__
        if kind not in VLM_CLASSES:
            raise TypeError(
                f"HookedVLM.from_pretrained takes a transformers {' or '.join(VLM_CLASSES)} (or a name); got "
                f"{type(model).__module__}.{kind}. For a vision tower alone use HookedViT.from_pretrained."
            )
        if dtype is not None:
            model = model.to(dtype)  # casts the given object: its language-model modules are shared
        config = model.config
        inner = model.model
        vision = HookedViT.from_pretrained(inner.vision_tower)
        projector = VLMProjector(inner.multi_modal_projector)
        lm = VLMLanguageModel(inner.language_model, model.lm_head)
        layers = config.vision_feature_layer
        n_vision = vision.cfg.n_layers
        resolved = [_resolve_feature_layer(l, n_vision) for l in (layers if isinstance(layers, (list, tuple)) else [layers])]
        strategy = config.vision_feature_select_strategy
        if strategy not in ("default", "full"):
            raise ValueError(f"Unknown vision_feature_select_strategy {strategy!r}; LLaVA uses 'default' or 'full'.")
        is_next = kind.startswith("LlavaNext")
        cfg = HookedVLMConfig(
            image_token_id=int(config.image_token_id),
            vision_feature_layer=list(layers) if isinstance(layers, (list, tuple)) else int(layers),
            vision_feature_select_strategy=strategy,
            vision_layers_run=max(resolved),
            d_vision=vision.cfg.d_model,
            d_text=lm.cfg.d_model,
            image_seq_length=getattr(config, "image_seq_length", None),
            architecture="llava_next" if is_next else "llava",
            image_grid_pinpoints=[list(p) for p in config.image_grid_pinpoints] if is_next else None,
            model_name=getattr(model, "name_or_path", "") or kind,
            original_architecture=f"transformers.{kind}",
            device=lm.cfg.device,
            dtype=lm.cfg.dtype,
            extra={"hf_config": config.to_dict(), **_generation_ids(model)},
        )
        hooked = cls(vision, projector, lm, cfg, image_newline=getattr(inner, "image_newline", None) if is_next else None,
                     processor=processor)
        if device is not None:
            hooked.to(device)
        return hooked.eval()

    # ------------------------------------------------------------------ image tokens
    def image_token_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """bool [batch, pos]: True where ``input_ids`` holds the image placeholder (an image-feature token)."""
        return torch.as_tensor(input_ids) == self.cfg.image_token_id

    def image_token_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Positions of the image tokens, LongTensor [batch, n_image_tokens] (every row must hold the same
        number; use :meth:`image_token_mask` otherwise)."""
        mask = self.image_token_mask(input_ids)
        counts = mask.sum(-1)
        if mask.ndim != 2:
            raise ValueError(f"input_ids must be [batch, pos], got shape {tuple(mask.shape)}.")
        if len(counts) and bool((counts != counts[0]).any()):
            raise ValueError(
                f"Rows hold different numbers of image tokens ({counts.tolist()}); positions do not form a "
                "tensor. Use model.image_token_mask(input_ids) instead."
            )
        return mask.nonzero()[:, 1].reshape(mask.shape[0], -1)

    def text_token_mask(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """bool [batch, pos]: text (non-image, non-padding) positions."""
        mask = ~self.image_token_mask(input_ids)
        return mask & attention_mask.bool() if attention_mask is not None else mask

    # ------------------------------------------------------------------ vision -> image features
    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Run the vision tower as far as ``vision_feature_layer`` needs and select LLaVA's features:
        [n_images (or crops), n_tokens, d_vision * n_feature_layers], the projector's input."""
        cfg = self.cfg
        layers = cfg.vision_feature_layer if isinstance(cfg.vision_feature_layer, list) else [cfg.vision_feature_layer]
        wanted = [_resolve_feature_layer(l, self.vision.cfg.n_layers) for l in layers]
        x = self.vision(pixel_values, stop_at_layer=0)  # embeddings (+ ln_pre): transformers' hidden_states[0]
        states = [x]
        for block in self.vision.blocks[: max(wanted)]:
            x = block(x)
            states.append(x)
        feats = [states[k] for k in wanted]
        if cfg.vision_feature_select_strategy == "default":
            feats = [f[:, 1:] for f in feats]
        return feats[0] if len(feats) == 1 else torch.cat(feats, dim=-1)

    def encode_images(self, pixel_values: torch.Tensor, image_sizes: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Image features as the language model receives them: [n_image_tokens_total, d_text], in the order
        they fill the image placeholders. LLaVA: pixel_values [n_images, C, H, W]. LLaVA-NeXT: pixel_values
        [n_images, n_crops, C, H, W] and ``image_sizes`` [n_images, 2] (the processor's outputs)."""
        if self.cfg.architecture == "llava_next":
            return self.hook_image_features(self._encode_images_next(pixel_values, image_sizes))
        if pixel_values.ndim != 4:
            raise ValueError(
                f"LLaVA expects pixel_values of shape (n_images, C, H, W), got {tuple(pixel_values.shape)}"
                + (": add the image dimension with pixel_values.unsqueeze(0)." if pixel_values.ndim == 3 else ".")
            )
        return self.hook_image_features(self.projector(self.vision_features(pixel_values)).flatten(0, 1))

    def _encode_images_next(self, pixel_values: torch.Tensor, image_sizes: Optional[torch.Tensor]) -> torch.Tensor:
        return encode_images_next(self, pixel_values, image_sizes)

    def embed_inputs(self, input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor] = None,
                     image_sizes: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The residual stream entering the language model's block 0: token embeddings (``lm.hook_embed``) with
        the image placeholders replaced by the image features."""
        embeds = self.lm.hook_embed(self.lm.embed(input_ids))
        if pixel_values is None:
            return embeds
        if not isinstance(pixel_values, torch.Tensor) or not pixel_values.dtype.is_floating_point:
            raise TypeError(
                f"pixel_values must be the float tensor the model's processor returns (processor(images=..., "
                f"text=..., return_tensors='pt')['pixel_values']); got {type(pixel_values).__name__}"
                + (f" of dtype {pixel_values.dtype}" if hasattr(pixel_values, "dtype") else "") + "."
            )
        features = self.encode_images(pixel_values.to(self.vision.cfg.dtype), image_sizes)
        mask = self.image_token_mask(input_ids)
        n_tokens, n_features = int(mask.sum()), features.shape[0]
        if n_tokens != n_features:
            raise ValueError(
                f"The prompt holds {n_tokens} image tokens (id {self.cfg.image_token_id}) but the images give "
                f"{n_features} image-feature tokens. Put one placeholder per feature token in input_ids (the "
                f"model's processor expands '<image>' to them; LLaVA 1.5: cfg.image_seq_length="
                f"{self.cfg.image_seq_length} per image)."
            )
        return embeds.masked_scatter(mask.unsqueeze(-1).to(embeds.device), features.to(embeds.dtype))

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: Tensorish,
        pixel_values: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        image_sizes: Optional[torch.Tensor] = None,
        return_type: Optional[Literal["logits", "resid"]] = "logits",
        stop_at_layer: Optional[int] = None,
        past_key_values: Any = None,
    ) -> Optional[torch.Tensor]:
        """Logits [batch, pos, d_vocab] of the language model on the prompt with the images spliced in.

        ``attention_mask`` [batch, pos] (1 = token, 0 = padding) as in transformers; ``position_ids`` default
        to 0..pos-1 as in transformers' forward (``generate`` derives them from the mask, as transformers'
        generate does). ``stop_at_layer=n`` returns the language model's residual stream after its blocks
        0..n-1; ``return_type="resid"`` the final normed residual stream; None runs for hooks only.
        """
        input_ids = self._as_ids(input_ids)
        self.last_image_token_mask = self.image_token_mask(input_ids)
        embeds = self.embed_inputs(input_ids, pixel_values, image_sizes)
        if attention_mask is not None:
            attention_mask = attention_mask.to(embeds.device)
        return self.lm(embeds, attention_mask=attention_mask, position_ids=position_ids,
                       past_key_values=past_key_values, stop_at_layer=stop_at_layer, return_type=return_type)

    def _as_ids(self, input_ids: Tensorish) -> torch.Tensor:
        if isinstance(input_ids, str) or (isinstance(input_ids, (list, tuple)) and input_ids and isinstance(input_ids[0], str)):
            raise TypeError(
                "HookedVLM takes token ids. Build them (and pixel_values) with the model's processor: "
                "inputs = model.processor(images=image, text=prompt, return_tensors='pt'), then "
                "model(inputs['input_ids'], inputs['pixel_values'])."
            )
        ids = torch.as_tensor(input_ids, device=self.lm.embed.weight.device)
        if ids.ndim == 1:
            ids = ids.unsqueeze(0)
        if ids.ndim != 2 or ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be integer token ids [batch, pos], got {tuple(ids.shape)} {ids.dtype}.")
        return ids.long()

    # ------------------------------------------------------------------ hook names and SAEs
    def setup(self) -> None:
        if "vision" in self._modules:
            self._modules["vision"].setup()  # type: ignore[operator]
        super().setup()

    def _build_hook_specs(self) -> dict[str, HookSpec]:
        vision, c = self.vision.cfg, self.lm.cfg
        specs = nest_specs(self.vision.hook_specs().values(), "vision")
        # The projector sees the selected vision tokens: the CLS token is gone with strategy "default".
        dropped = self.cfg.vision_token_offset
        tokens: dict[str, Any] = dict(
            part="projector", n_prefix_tokens=max(vision.n_prefix_tokens - dropped, 0), grid=vision.grid_size,
            has_cls_token=vision.has_cls_token and not dropped,
        )
        local = [HookSpec("hook_in", layout="tokens", width=self.cfg.d_vision * self._n_feature_layers(), **tokens)]
        local += [HookSpec(name, layout="tokens", width=self.cfg.d_text, **tokens)
                  for name in ("hook_pre", "hook_post", "hook_out")]
        specs.update(nest_specs(local, "projector"))
        specs["hook_image_features"] = HookSpec("hook_image_features", "projector", "flat_tokens", self.cfg.d_text)
        lm = [HookSpec("hook_embed", "language_model", "tokens", c.d_model)]
        for layer in range(c.n_layers):
            lm += transformer_block_specs(
                layer, "language_model", d_model=c.d_model, n_heads=c.n_heads, d_head=c.d_head, d_mlp=c.d_mlp,
                n_key_value_heads=c.n_key_value_heads, gated_mlp=True, rotary=True,
            ).values()
        lm += norm_specs("ln_final", c.d_model, part="language_model")
        lm.append(HookSpec("hook_logits", "language_model", "tokens", c.d_vocab))
        specs.update(nest_specs(lm, "lm"))
        return specs

    def _n_feature_layers(self) -> int:
        layer = self.cfg.vision_feature_layer
        return len(layer) if isinstance(layer, list) else 1

    # ------------------------------------------------------------------ SAE splicing (core/nested.py)
    def _part_named_by_metadata(self, metadata: Any) -> Optional[str]:
        # TransformerLens language-model SAEs go to the LM; SAEs recorded on a standalone HookedViT to vision.
        cls_name = metadata.get("model_class_name")
        if cls_name in ("HookedTransformer", "HookedSAETransformer"):
            return "lm"
        return "vision" if cls_name == "HookedViT" else None

    def _apply(self, fn, *args, **kwargs):  # keep cfg.device/dtype in step with .to()/.half()
        out = super()._apply(fn, *args, **kwargs)
        w = self.lm.embed.weight
        self.cfg.device, self.cfg.dtype = str(w.device), w.dtype
        self.lm.cfg.device, self.lm.cfg.dtype = str(w.device), w.dtype
        return out
