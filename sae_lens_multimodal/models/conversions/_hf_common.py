"""Shared plumbing for the transformers families (``hf_clip``, ``hf_vit``, ``hf_dinov2``, ``hf_siglip``):
recognising transformers classes without importing transformers, loading a checkpoint into the class a
family converts (refusing checkpoints that would leave weights randomly initialised), and the image
processor a model ships with. The weight conversions themselves live in the family modules."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from sae_lens_multimodal.models.components import ACT_FNS
from sae_lens_multimodal.models.conversions import UnsupportedModelError

#: from_pretrained keywords that say where files come from; the image processor is read from the same place.
_HUB_KWARGS = ("cache_dir", "revision", "token", "local_files_only", "force_download", "subfolder", "proxies")
_SOURCE_KWARGS_ATTR = "_sae_lens_mm_hub_kwargs"


def is_transformers_class(obj: Any, module_prefix: str, names: tuple[str, ...]) -> bool:
    """``obj`` is an instance of one of ``names`` defined in ``transformers.models.<module_prefix>``."""
    cls = type(obj)
    return cls.__module__.startswith(f"transformers.models.{module_prefix}.") and cls.__name__ in names


def act_fn_name(hidden_act: Any, where: str) -> str:
    """A transformers ``hidden_act`` as one of our activation names, or a clear refusal."""
    if not isinstance(hidden_act, str) or hidden_act not in ACT_FNS:
        raise UnsupportedModelError(
            f"{where}: activation {hidden_act!r} is not supported; supported: {sorted(ACT_FNS)}."
        )
    return hidden_act


def single_eps(lns: list[torch.nn.Module], where: str) -> float:
    """The one LayerNorm epsilon the model uses (HookedViT has one ``eps`` for all its LayerNorms)."""
    eps = {float(ln.eps) for ln in lns}
    if len(eps) != 1:
        raise UnsupportedModelError(f"{where}: LayerNorms use different epsilons {sorted(eps)}; HookedViT has one.")
    return eps.pop()


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report while loading one tower of a dual encoder: the other tower's
    weights are reported as unexpected, which is intended. Missing weights are checked by the caller."""
    from transformers.utils import logging as hf_logging

    old = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(old)


def read_hf_config(name_or_dir: str, **kwargs: Any) -> dict[str, Any]:
    """config.json of a local directory or hub repo, as a dict (no model is built)."""
    from transformers import PretrainedConfig

    hub = {k: v for k, v in kwargs.items() if k in _HUB_KWARGS}
    config, _ = PretrainedConfig.get_config_dict(name_or_dir, **hub)
    return config


def load_checkpoint(
    cls: Any,
    name_or_dir: str,
    allowed_missing: Callable[[str], bool] = lambda key: False,
    **kwargs: Any,
) -> tuple[Any, list[str]]:
    """``cls.from_pretrained(name_or_dir, **kwargs)`` in eval mode.

    Returns the model and the missing weight names ``allowed_missing`` accepted (the caller removes the
    module they belong to). Any other missing or shape-mismatched weight is an error: transformers would
    initialise it randomly and the conversion would be exact to a model that does not exist.
    """
    with _quiet_transformers():
        model, info = cls.from_pretrained(name_or_dir, output_loading_info=True, **kwargs)
    missing = sorted(info.get("missing_keys", ()))
    bad = [k for k in missing if not allowed_missing(k)]
    mismatched = [str(k) for k in info.get("mismatched_keys", ())]
    if bad or mismatched:
        raise ValueError(
            f"Loading {name_or_dir!r} as transformers {cls.__name__} leaves weights randomly initialised "
            f"(missing: {bad[:8]}{'...' if len(bad) > 8 else ''}; shape mismatch: {mismatched[:8]}). "
            f"The checkpoint does not hold this architecture; load the model yourself and pass the object to "
            f"HookedViT.from_pretrained."
        )
    hub = {k: v for k, v in kwargs.items() if k in _HUB_KWARGS}
    setattr(model, _SOURCE_KWARGS_ATTR, hub)
    return model.eval(), [k for k in missing if allowed_missing(k)]


class HFImagePreprocess:
    """One PIL image -> (C, H, W) float tensor through a transformers image processor (the model's own
    settings), i.e. ``processor(images=img, return_tensors="pt").pixel_values[0]``."""

    def __init__(self, processor: Any):
        self.processor = processor

    def __call__(self, image: Any) -> torch.Tensor:
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]

    def __repr__(self) -> str:
        return f"HFImagePreprocess({type(self.processor).__name__})"


def image_preprocess(model: Any, default_processor: Callable[[], Any]) -> HFImagePreprocess:
    """The processor saved with the model (preprocessor_config.json next to the checkpoint it was loaded
    from: a local directory or the hub cache, read offline when HF_HUB_OFFLINE is set), else
    ``default_processor()`` (the family's processor class at the config's image size)."""
    processor = None
    source = getattr(model, "name_or_path", "") or ""
    if source:
        from transformers import AutoImageProcessor

        hub = getattr(model, _SOURCE_KWARGS_ATTR, {})
        try:
            with _quiet_transformers():
                processor = AutoImageProcessor.from_pretrained(source, **hub)
        except (OSError, ValueError, KeyError):  # no preprocessor_config.json there (or not reachable)
            processor = None
    return HFImagePreprocess(processor if processor is not None else default_processor())


def conv_bias(conv: torch.nn.Conv2d) -> torch.Tensor:
    """The patch embedding's bias (zeros when it has none), as a new tensor."""
    w = conv.weight
    return conv.bias.detach().clone() if conv.bias is not None else w.new_zeros(w.shape[0]).detach()


def pre_norm_block_state(
    prefix: str,
    ln1: torch.nn.Module,
    ln2: torch.nn.Module,
    q: torch.nn.Linear,
    k: torch.nn.Linear,
    v: torch.nn.Linear,
    out: torch.nn.Linear,
    fc1: torch.nn.Linear,
    fc2: torch.nn.Linear,
    n_heads: int,
) -> dict[str, torch.Tensor]:
    """One pre-norm encoder block of a transformers model (separate q/k/v Linear layers, a two-layer MLP)
    in our TransformerLens layout under ``prefix`` (``"blocks.3."``). Every transformers family here
    (CLIP, ViT, DINOv2, SigLIP, both towers) has this block shape; only the attribute names differ."""
    from sae_lens_multimodal.models.conversions._common import attention_state, ln_state, mlp_state

    sd: dict[str, torch.Tensor] = {}
    sd.update(ln_state(prefix + "ln1.", ln1))
    sd.update(ln_state(prefix + "ln2.", ln2))
    sd.update(attention_state(
        prefix + "attn.",
        (q.weight, q.bias), (k.weight, k.bias), (v.weight, v.bias), (out.weight, out.bias), n_heads,
    ))
    sd.update(mlp_state(prefix + "mlp.", (fc1.weight, fc1.bias), (fc2.weight, fc2.bias)))
    return sd
