"""ViT-Prisma SAEs (HF org ``Prisma-Multimodal``) -> SAELens.

Source format (see docs/releases.md, "ViT-Prisma"): per SAE a ``config.json`` (a JSON dump of ViT-Prisma's
``VisionModelSAERunnerConfig``) beside a torch pickle (``weights.pt`` or ``n_images_<N>.pt``) holding either a
plain state dict or ``{"cfg": VisionModelSAERunnerConfig, "state_dict": ...}``. Tensors are already in
SAELens orientation: ``W_enc (d_in,d_sae)``, ``b_enc``, ``W_dec (d_sae,d_in)``, ``b_dec``.

Math: ``h = (norm_in(x) − b_dec)·W_enc + b_enc``; ReLU, or TopK (top-k of h, ReLU on kept);
``x̂ = norm_out(f·W_dec + b_dec)``; ``layer_norm`` = per-token ``(x − mean)/(std_unbiased + 1e-5)``, inverted on
output. This is SAELens's ``standard``/``topk`` architecture with ``apply_b_dec_to_input=True`` and the same
``layer_norm`` — tensors are copied unchanged.

The config class inside ``{cfg, state_dict}`` pickles is unpickled as an inert stub through torch's
weights-only allow-list (no ViT-Prisma import, no code from the file).
"""

from __future__ import annotations

import posixpath
from collections.abc import Mapping
from typing import Any, Optional

import torch

from sae_lens_multimodal.core.sae_metadata import HOOK_INPUT_KINDS, INPUT_KINDS, input_kind_of_hook
from sae_lens_multimodal.pretrained._common import ReleaseFormatError, build_cfg_dict, check_state_dict, join_path
from sae_lens_multimodal.pretrained._formats import register_format_loader
from sae_lens_multimodal.core.files import PickledConfigStub, load_torch_weights
from sae_lens_multimodal.pretrained._hub import fetch_file, read_json
from sae_lens_multimodal.pretrained.registry import resolve
from sae_lens_multimodal.pretrained.releases import ReleaseSae

__all__ = ["PRISMA_CONFIG_CLASS", "convert_prisma", "read_prisma_weights", "load_sae", "get_config"]

PRISMA_CONFIG_CLASS = "vit_prisma.sae.config.VisionModelSAERunnerConfig"
#: config keys that matter for inference (kept in metadata["source_config"])
_INFERENCE_KEYS = (
    "model_class_name", "model_name", "hook_point", "hook_point_layer", "layer_subtype", "hook_point_head_index",
    "context_size", "cls_token_only", "use_patches_only", "d_in", "expansion_factor", "d_sae", "architecture",
    "activation_fn_str", "activation_fn_kwargs", "normalize_activations", "image_size",
)


def read_prisma_weights(path: Any, what: str) -> tuple[dict[str, torch.Tensor], Optional[dict[str, Any]]]:
    """(state dict, embedded config dict or None) from a Prisma weights pickle, loaded safely."""
    obj = load_torch_weights(path, what=what, allow_configs=(PRISMA_CONFIG_CLASS,))
    if isinstance(obj, Mapping) and "state_dict" in obj:
        cfg = obj.get("cfg")
        if isinstance(cfg, PickledConfigStub):
            cfg = cfg.to_dict()
        elif cfg is not None and not isinstance(cfg, Mapping):
            raise ReleaseFormatError(f"{what}: 'cfg' is a {type(cfg).__name__}, expected a config object or dict.")
        return dict(obj["state_dict"]), (dict(cfg) if cfg is not None else None)
    if isinstance(obj, Mapping):
        return dict(obj), None
    raise ReleaseFormatError(f"{what} holds a {type(obj).__name__}; expected a state dict or {{cfg, state_dict}}.")


def _hook_name(config: Mapping[str, Any], what: str) -> str:
    from_parts = None
    if config.get("hook_point_layer") is not None and config.get("layer_subtype"):
        from_parts = f"blocks.{int(config['hook_point_layer'])}.{config['layer_subtype']}"
    hook = config.get("hook_point") or from_parts
    if hook is None:
        raise ReleaseFormatError(f"{what} names no hook: it needs 'hook_point' or 'hook_point_layer' + 'layer_subtype'.")
    if from_parts is not None and config.get("hook_point") and config["hook_point"] != from_parts:
        raise ReleaseFormatError(
            f"{what} is inconsistent: hook_point={config['hook_point']!r} but hook_point_layer/layer_subtype give "
            f"{from_parts!r}."
        )
    if config.get("hook_point_head_index") is not None:
        raise ReleaseFormatError(
            f"{what}: per-head SAEs (hook_point_head_index={config['hook_point_head_index']}) are not supported."
        )
    return str(hook)


def convert_prisma(
    config: Mapping[str, Any], state: Mapping[str, torch.Tensor], *, what: str = "ViT-Prisma SAE"
) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """Convert a Prisma config + state dict.

    Returns ``(cfg fields for build_cfg_dict, SAELens state dict, facts read from the file for metadata)``.
    """
    d_in = config.get("d_in")
    if not isinstance(d_in, int):
        raise ReleaseFormatError(f"{what}: config has no integer 'd_in'.")
    if "W_enc" not in state:
        raise ReleaseFormatError(f"{what}: no 'W_enc' tensor (found {sorted(state)}).")
    d_sae = int(state["W_enc"].shape[-1])
    expansion = config.get("expansion_factor")
    if expansion is not None and d_in * int(expansion) != d_sae:
        raise ReleaseFormatError(
            f"{what}: W_enc has {d_sae} latents but d_in*expansion_factor = {d_in}*{expansion} = {d_in * int(expansion)}."
        )
    architecture = config.get("architecture", "standard")
    if architecture != "standard":
        raise ReleaseFormatError(
            f"{what}: Prisma architecture {architecture!r} is not supported (only 'standard' SAEs with ReLU or "
            "TopK activations; Prisma's 'gated' math is not documented for conversion and 'jumprelu' is "
            "declared but unimplemented in ViT-Prisma)."
        )
    check_state_dict(
        dict(state),
        {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)},
        what,
    )
    act = config.get("activation_fn_str", "relu")
    extra: dict[str, Any] = {}
    if act == "relu":
        sae_arch = "standard"
    elif act == "topk":
        k = (config.get("activation_fn_kwargs") or {}).get("k")
        if not isinstance(k, int) or not 0 < k <= d_sae:
            raise ReleaseFormatError(f"{what}: activation 'topk' needs activation_fn_kwargs.k in 1..{d_sae}, got {k!r}.")
        sae_arch = "topk"
        extra = {"k": k, "rescale_acts_by_decoder_norm": False}
    else:
        raise ReleaseFormatError(
            f"{what}: activation_fn_str={act!r} has no SAELens equivalent (supported: 'relu', 'topk')."
        )
    norm = config.get("normalize_activations")
    if norm in (None, "none", False):
        normalize = "none"
        normalization: dict[str, Any] = {"kind": "none"}
    elif norm == "layer_norm":
        normalize = "layer_norm"
        normalization = {"kind": "layer_norm", "status": "applied by the SAE (normalize_activations='layer_norm')",
                         "formula": "(x - mean) / (std_unbiased + 1e-5) per token, inverted on output"}
    else:
        raise ReleaseFormatError(
            f"{what}: normalize_activations={norm!r} is not supported (supported: null, 'layer_norm')."
        )
    if config.get("cls_token_only") and config.get("use_patches_only"):
        raise ReleaseFormatError(f"{what}: cls_token_only and use_patches_only are both set.")
    token_policy = "cls" if config.get("cls_token_only") else "patches" if config.get("use_patches_only") else "all"
    hook = _hook_name(config, what)
    input_kind = input_kind_of_hook(hook)
    if input_kind is None:
        raise ReleaseFormatError(
            f"{what}: an SAE at hook {hook!r} reads an activation that sae-lens-multimodal's metadata schema has "
            f"no input kind for (kinds: {INPUT_KINDS}, from hooks ending in {sorted(HOOK_INPUT_KINDS)}), so it is "
            "not converted. Train or convert the SAE on one of those hooks."
        )
    facts: dict[str, Any] = {
        "hook_name": hook,
        "token_policy": token_policy,
        "input_kind": input_kind,
        "normalization": normalization,
        "source_model_name": config.get("model_name"),
        "source_config": {k: config[k] for k in _INFERENCE_KEYS if k in config},
    }
    if config.get("context_size") is not None:
        facts["context_size"] = int(config["context_size"])
    sae_state = {k: state[k].detach().to(torch.float32).contiguous() for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
    fields = {"architecture": sae_arch, "d_in": d_in, "d_sae": d_sae, "apply_b_dec_to_input": True,
              "normalize_activations": normalize, "extra": extra}
    return fields, sae_state, facts


def merge_facts(entry: Optional[ReleaseSae], facts: Mapping[str, Any], what: str) -> dict[str, Any]:
    """Registry facts, checked against (and completed by) what the file says."""
    meta: dict[str, Any] = entry.metadata() if entry is not None else {"source_format": "prisma"}
    for key in ("hook_name", "token_policy"):
        if entry is not None and facts.get(key) is not None and meta.get(key) != facts[key]:
            raise ReleaseFormatError(
                f"{what}: the release directory says {key}={meta.get(key)!r} but the file's config says "
                f"{facts[key]!r}. The file is authoritative; the release entry needs fixing."
            )
    for key, value in facts.items():
        if key not in meta or meta[key] is None or key in ("normalization", "input_kind"):
            meta[key] = value
    if entry is None or "model" in entry.unverified:
        if facts.get("source_model_name"):
            meta["model_name"] = facts["source_model_name"]
    meta.setdefault("model_class_name", "HookedViT")
    return meta


def _files(hub_path: str) -> tuple[str, str]:
    """(weights file, config.json) paths for a Prisma SAE path (a .pt file, or a folder with weights.pt)."""
    if hub_path.endswith(".pt"):
        return hub_path, join_path(posixpath.dirname(hub_path), "config.json")
    return join_path(hub_path, "weights.pt"), join_path(hub_path, "config.json")


def get_config(
    repo_id: str, folder_name: str, device: str = "cpu", force_download: bool = False,
    cfg_overrides: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """SAELens config getter: the cfg dict from ``config.json`` alone (no weights read).

    ``d_sae`` comes from ``d_in * expansion_factor`` here (the loader checks it against the tensors).
    """
    hub_repo, hub_path, entry, _ = resolve(repo_id, folder_name)
    _, config_file = _files(hub_path)
    what = f"{hub_repo}/{config_file}"
    config = read_json(fetch_file(hub_repo, config_file, force_download=force_download), what)
    d_in = int(config["d_in"])
    d_sae = d_in * int(config.get("expansion_factor") or 0) or int(config.get("d_sae") or 0)
    fake = {"W_enc": torch.empty(d_in, d_sae, device="meta"), "b_enc": torch.empty(d_sae, device="meta"),
            "W_dec": torch.empty(d_sae, d_in, device="meta"), "b_dec": torch.empty(d_in, device="meta")}
    fields, _, facts = convert_prisma(config, fake, what=what)
    return _cfg(fields, merge_facts(entry, facts, what), cfg_overrides, device)


def _cfg(fields: dict[str, Any], meta: dict[str, Any], cfg_overrides: Optional[dict[str, Any]], device: str) -> dict[str, Any]:
    return build_cfg_dict(
        architecture=fields["architecture"], d_in=fields["d_in"], d_sae=fields["d_sae"],
        apply_b_dec_to_input=fields["apply_b_dec_to_input"], normalize_activations=fields["normalize_activations"],
        metadata=meta, cfg_overrides=cfg_overrides, device=device, extra=fields["extra"],
    )


def load_sae(
    repo_id: str, folder_name: str, device: str = "cpu", force_download: bool = False,
    cfg_overrides: Optional[dict[str, Any]] = None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor], None]:
    """SAELens loader (``conversion_func: mm_prisma``)."""
    hub_repo, hub_path, entry, _ = resolve(repo_id, folder_name)
    weights_file, config_file = _files(hub_path)
    what = f"{hub_repo}/{weights_file}"
    config_local = fetch_file(hub_repo, config_file, force_download=force_download, required=False)
    weights_local = fetch_file(hub_repo, weights_file, force_download=force_download)
    state, embedded = read_prisma_weights(weights_local, what)
    if config_local is not None:
        config = read_json(config_local, f"{hub_repo}/{config_file}")
        version = "config.json + " + ("{cfg, state_dict} pickle" if embedded is not None else "state-dict pickle")
    elif embedded is not None:
        config, version = embedded, "{cfg, state_dict} pickle (embedded config)"
    else:  # plain state dict and no config.json: raise the standard "missing file" error for it
        fetch_file(hub_repo, config_file, force_download=force_download, required=True)
        raise AssertionError("unreachable")
    fields, sae_state, facts = convert_prisma(config, state, what=what)
    meta = merge_facts(entry, facts, what)
    meta["source_format_version"] = version
    cfg = _cfg(fields, meta, cfg_overrides, device)
    return cfg, {k: v.to(device) for k, v in sae_state.items()}, None


register_format_loader("prisma", load_sae, get_config)
