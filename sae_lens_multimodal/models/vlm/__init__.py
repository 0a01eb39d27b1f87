"""HookedVLM: a LLaVA-style vision-language model with TransformerLens hook points in all three parts.

Built from transformers ``LlavaForConditionalGeneration`` (LLaVA 1.5) or ``LlavaNextForConditionalGeneration``
(LLaVA-NeXT / 1.6), by object or by name:

* ``model.vision`` is a :class:`HookedViT` converted from the model's vision tower (transformers CLIP or
  SigLIP vision model) through the same conversion registry as ``HookedViT.from_pretrained``, so its hook
  names are HookedViT's under the prefix ``vision.`` (``vision.blocks.9.hook_resid_post``). An SAE recorded
  on a standalone HookedViT (``blocks.9.hook_resid_post``) is spliced into the vision tower unchanged.
  LLaVA's ``vision_feature_layer`` is respected: the tower runs only as far as the selected layer (blocks
  after it neither run nor fire hooks) and ``vision_feature_select_strategy="default"`` drops the CLS token.
* ``model.projector`` wraps the multimodal projector's own modules with ``projector.hook_in`` (selected
  vision features), ``hook_pre`` / ``hook_post`` (first linear, activation) and ``hook_out`` (image
  features in the language model's width).
* ``model.lm`` runs the language model's own modules (Llama, Mistral or Qwen2 backbones, shared with the
  transformers model, not copied) in a loop that calls TransformerLens-named hook points:
  ``lm.hook_embed``, ``lm.blocks.{i}.hook_resid_pre/mid/post``, ``hook_attn_out``, ``hook_mlp_out``,
  ``ln1/ln2/ln_final.hook_scale/hook_normalized``, ``attn.hook_q/k/v/rot_q/rot_k/attn_scores/pattern/z/result``,
  ``mlp.hook_pre/hook_pre_linear/hook_post`` and ``lm.hook_logits``. Attention patterns are materialised only
  when observed; otherwise the model's own attention kernel runs.

Image-token positions in the language model's sequence are where ``input_ids == cfg.image_token_id``:
:meth:`HookedVLM.image_token_mask` / :meth:`HookedVLM.image_token_positions`; the mask of the last forward is
kept in ``model.last_image_token_mask``. Hook names, shapes and loading real checkpoints: docs/vlm.md.
"""

from sae_lens_multimodal.models.vlm.cache import VLMActivationCache
from sae_lens_multimodal.models.vlm.config import HookedVLMConfig, VLMLanguageConfig
from sae_lens_multimodal.models.vlm.language_model import VLMLanguageModel
from sae_lens_multimodal.models.vlm.model import HookedVLM, VLMProjector

__all__ = [
    "HookedVLM",
    "HookedVLMConfig",
    "VLMActivationCache",
    "VLMLanguageModel",
    "VLMLanguageConfig",
    "VLMProjector",
]
