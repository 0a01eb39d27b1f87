"""HookedVLM's configs and constants: the hooked parts, the language models it runs, its own config."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import torch

__all__ = ["HookedVLMConfig", "VLMLanguageConfig", "SUPPORTED_LANGUAGE_MODELS"]

#: transformers language-model classes whose decoder layers HookedVLM runs (same block structure:
#: RMSNorm -> rotary attention (GQA) -> residual -> RMSNorm -> gated MLP -> residual).
SUPPORTED_LANGUAGE_MODELS = ("LlamaModel", "MistralModel", "Qwen2Model")
#: Token ids as HookedVLM takes them: a LongTensor [batch, pos] / [pos], or nested lists of ints.
Tensorish = Union[torch.Tensor, Iterable[Iterable[int]]]


@dataclass
class VLMLanguageConfig:
    """The language model's shape, with TransformerLens field names (read by ActivationCache helpers)."""

    n_layers: int
    d_model: int
    n_heads: int
    d_head: int
    d_mlp: int
    d_vocab: int
    n_key_value_heads: int
    eps: float
    act_fn: str
    n_ctx: int
    original_architecture: str
    normalization_type: str = "RMS"
    positional_embedding_type: str = "rotary"
    attn_only: bool = False
    model_name: str = "custom"
    device: str = "cpu"
    dtype: torch.dtype = torch.float32


@dataclass
class HookedVLMConfig:
    """What HookedVLM adds on top of its parts' configs (``model.vision.cfg``, ``model.lm.cfg``).

    ``vision_feature_layer`` / ``vision_feature_select_strategy`` are LLaVA's: the vision tower's
    ``hidden_states`` index (an int, or a list whose states are concatenated) and ``"default"`` (drop the
    CLS token) or ``"full"``. ``vision_layers_run`` is how many vision blocks run (the deepest selected layer).
    """

    image_token_id: int
    vision_feature_layer: Union[int, list[int]]
    vision_feature_select_strategy: str
    vision_layers_run: int
    d_vision: int
    d_text: int
    image_seq_length: Optional[int] = None
    architecture: Literal["llava", "llava_next"] = "llava"
    image_grid_pinpoints: Optional[list[list[int]]] = None
    model_name: str = "custom"
    original_architecture: str = "custom"
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def vision_token_offset(self) -> int:
        """Vision-tower positions dropped before the projector: image token k of the language model comes
        from vision position k + offset (1 with "default" on a tower with a CLS token, else 0)."""
        return 1 if self.vision_feature_select_strategy == "default" else 0
