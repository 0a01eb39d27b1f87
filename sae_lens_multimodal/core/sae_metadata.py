"""One schema for what SAE metadata and the command line say about models and inputs.

Every SAE this package trains, converts or loads describes itself in ``sae.cfg.metadata`` with the values
defined here, and only these:

* ``input_kind`` (:data:`INPUT_KINDS`): which activation the SAE reads (a block's output, the update a
  block adds, an MLP's or attention layer's output...); :func:`input_kind_of_hook` derives it from a hook name.
* ``token_policy`` (:data:`TOKEN_POLICIES`): which tokens of an image it was trained on.
* ``cfg_branch`` (:data:`CFG_BRANCHES`, from core/denoising.py): which classifier-free-guidance rows of a
  diffusion call it reads.
* the model kind (:data:`MODEL_KINDS`) the command line and the loader use.

The ``normalize_*`` functions map accepted foreign spellings (a source format's own names, old CLI names)
onto these values and refuse anything else with an error naming where the value came from (``source``)
and the accepted values. Loaders of foreign formats (pretrained/) call them on what a file says.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any, Optional

from sae_lens_multimodal.core.denoising import CFG_BRANCHES

__all__ = [
    "INPUT_KINDS",
    "INPUT_KIND_DOCS",
    "HOOK_INPUT_KINDS",
    "TOKEN_POLICIES",
    "CFG_BRANCHES",
    "MODEL_KINDS",
    "MODEL_KIND_ALIASES",
    "input_kind_of_hook",
    "normalize_input_kind",
    "normalize_token_policy",
    "normalize_cfg_branch",
    "normalize_model_kind",
    "check_input_kind_matches_hook",
    "normalize_sae_metadata",
]

#: input kind -> what the SAE reads. Every SAE's ``metadata.input_kind`` is one of these.
INPUT_KIND_DOCS: dict[str, str] = {
    "block_output": "the residual stream after a block (ViT hook_resid_post; a diffusion block's hook_out)",
    "block_input": "the residual stream entering a block (ViT hook_resid_pre)",
    "residual_update": "what a block adds to its input (a diffusion block's hook_update = hook_out - input)",
    "attention_output": "an attention layer's output, before it is added to the residual stream (hook_attn_out)",
    "mlp_output": "an MLP's output, before it is added to the residual stream (hook_mlp_out)",
    "block_middle": "the residual stream between a block's attention and its MLP (hook_resid_mid)",
    "mlp_pre_activation": "an MLP's hidden units before the nonlinearity (mlp.hook_pre)",
    "mlp_activation": "an MLP's hidden units after the nonlinearity (mlp.hook_post)",
    "attention_heads": "per-head attention outputs before W_O, heads flattened (attn.hook_z)",
}
INPUT_KINDS: tuple[str, ...] = tuple(INPUT_KIND_DOCS)
#: last component of a hook name -> the input kind an SAE at that hook reads
HOOK_INPUT_KINDS: dict[str, str] = {
    "hook_resid_post": "block_output",
    "hook_out": "block_output",
    "hook_resid_pre": "block_input",
    "hook_update": "residual_update",
    "hook_attn_out": "attention_output",
    "hook_mlp_out": "mlp_output",
    "hook_resid_mid": "block_middle",
    "hook_pre": "mlp_pre_activation",
    "hook_post": "mlp_activation",
    "hook_z": "attention_heads",
}

#: Which tokens of an image an SAE was trained on (and an activation store keeps): every token, the
#: class token only, or the patch tokens only (prefix tokens such as CLS and registers dropped).
TOKEN_POLICIES: tuple[str, ...] = ("all", "cls", "patches")

#: What a loaded model is: a vision transformer alone (HookedViT), a CLIP (HookedCLIP: image and text
#: towers), a vision-language model (HookedVLM) or a diffusion pipeline (HookedDiffusionPipeline).
MODEL_KINDS: tuple[str, ...] = ("vision", "clip", "vlm", "diffusion")
#: old spellings -> the kind they mean ("vit" was the training CLI's name for "vision")
MODEL_KIND_ALIASES: dict[str, str] = {"vit": "vision"}


def normalize_model_kind(value: Any, *, source: str = "model kind") -> str:
    """``value`` as one of MODEL_KINDS (old spellings mapped); anything else is a ValueError naming
    ``source`` and the accepted values."""
    if isinstance(value, str):
        value = MODEL_KIND_ALIASES.get(value, value)
        if value in MODEL_KINDS:
            return value
    raise ValueError(f"{source}: {value!r} is not a model kind; use one of {MODEL_KINDS}.")


def _refuse(source: str, what: str, value: Any, accepted: tuple[str, ...], extra: str = "") -> ValueError:
    return ValueError(f"{source}: {what} {value!r} is not one of {accepted}.{extra}")


def input_kind_of_hook(hook_name: Optional[str]) -> Optional[str]:
    """The input kind an SAE at ``hook_name`` reads, from the hook's last component (None if the hook
    is not one of :data:`HOOK_INPUT_KINDS`, e.g. a per-head or MLP-hidden hook)."""
    if not hook_name:
        return None
    return HOOK_INPUT_KINDS.get(hook_name.rsplit(".", 1)[-1])


def normalize_input_kind(value: Any, *, source: str = "SAE metadata", allow_none: bool = False) -> Optional[str]:
    """``value`` as one of :data:`INPUT_KINDS`. A hook-name spelling (``"hook_resid_post"``,
    ``"resid_post"``, ``"hook_mlp_out"``...) is mapped to its kind; anything else raises a ValueError
    naming ``source``. ``None`` passes when ``allow_none``."""
    if value is None and allow_none:
        return None
    if isinstance(value, str):
        if value in INPUT_KINDS:
            return value
        mapped = HOOK_INPUT_KINDS.get(value) or HOOK_INPUT_KINDS.get(f"hook_{value}")
        if mapped is not None:
            return mapped
    kinds = "; ".join(f"{k}: {doc}" for k, doc in INPUT_KIND_DOCS.items())
    raise _refuse(source, "input_kind", value, INPUT_KINDS, f" The input kinds are: {kinds}.")


def check_input_kind_matches_hook(input_kind: Optional[str], hook_name: Optional[str], *,
                                  source: str = "SAE metadata") -> None:
    """Refuse an ``input_kind`` that contradicts what its hook carries (e.g. ``block_output`` at a
    diffusion ``hook_update``)."""
    expected = input_kind_of_hook(hook_name)
    if input_kind is not None and expected is not None and input_kind != expected:
        raise ValueError(
            f"{source}: input_kind={input_kind!r} contradicts hook {hook_name!r}, which carries a {expected}. "
            f"Set input_kind={expected!r} or name the hook the SAE was trained on."
        )


def normalize_token_policy(value: Any, *, source: str = "SAE metadata", allow_none: bool = False) -> Optional[str]:
    """``value`` as one of :data:`TOKEN_POLICIES`; anything else raises a ValueError naming ``source``."""
    if value is None and allow_none:
        return None
    if isinstance(value, str) and value in TOKEN_POLICIES:
        return value
    raise _refuse(source, "token_policy", value, TOKEN_POLICIES,
                  " ('all': every token, 'cls': the class token, 'patches': the patch tokens.)")


def normalize_cfg_branch(value: Any, *, source: str = "SAE metadata", allow_none: bool = True) -> Optional[str]:
    """``value`` as one of :data:`CFG_BRANCHES` (None: not a diffusion SAE, or no CFG); anything else
    raises a ValueError naming ``source``."""
    if value is None and allow_none:
        return None
    if isinstance(value, str) and value in CFG_BRANCHES:
        return value
    raise _refuse(source, "cfg_branch", value, CFG_BRANCHES,
                  " ('cond': conditional rows or CFG off, 'uncond': unconditional rows, 'both': every row.)")


def normalize_sae_metadata(metadata: MutableMapping[str, Any], *, source: str = "SAE metadata") -> MutableMapping[str, Any]:
    """Check and normalise the schema fields present in ``metadata`` (in place; also returned):
    ``input_kind`` (also against ``hook_name``), ``token_policy`` and ``cfg_branch``. Absent or None
    fields stay as they are."""
    get = metadata.get
    if get("input_kind") is not None:
        metadata["input_kind"] = normalize_input_kind(get("input_kind"), source=source)
        check_input_kind_matches_hook(metadata["input_kind"], get("hook_name"), source=source)
    if get("token_policy") is not None:
        metadata["token_policy"] = normalize_token_policy(get("token_policy"), source=source)
    if get("cfg_branch") is not None:
        metadata["cfg_branch"] = normalize_cfg_branch(get("cfg_branch"), source=source)
    return metadata
