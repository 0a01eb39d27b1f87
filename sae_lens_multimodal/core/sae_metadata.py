"""One schema for what SAE metadata and the command line say about models and inputs.

Every SAE this package trains, converts or loads describes itself in ``sae.cfg.metadata`` with the values
defined here, and only these:

* ``input_kind`` (:data:`INPUT_KINDS`): which activation the SAE reads (a block's output, the update a
  block adds, an MLP's or attention layer's output...); :func:`input_kind_of_hook` derives it from a hook name.
* ``token_policy`` (:data:`TOKEN_POLICIES`): which tokens of an image it was trained on.
* ``cfg_branch`` (:data:`CFG_BRANCHES`, from core/denoising.py): which classifier-free-guidance rows of a
  diffusion call it reads.
* the model kind (:data:`MODEL_KINDS`) the command line and the loader use.
* ``model_name`` and ``model_fingerprint``: the model an SAE was trained on (:func:`model_identity`, recorded
  by training on this package's caches and by the bundled SAEs); :func:`check_sae_model_match` compares them
  with a model an SAE is spliced into or a cache it is evaluated on.

The ``normalize_*`` functions map accepted foreign spellings (a source format's own names, old CLI names)
onto these values and refuse anything else with an error naming where the value came from (``source``)
and the accepted values. Loaders of foreign formats (pretrained/) call them on what a file says.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Iterable, Mapping, MutableMapping
from pathlib import Path
from typing import Any, Optional

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
    "MODEL_MISMATCH_ACTIONS",
    "SAEModelMismatchError",
    "SAEModelMismatchWarning",
    "check_sae_model_match",
    "model_identity",
    "READOUT_PARAMETER_PREFIXES",
    "record_model_names",
    "sae_model_metadata",
]


def __getattr__(name: str) -> Any:
    # CFG_BRANCHES lives in core/denoising.py, which imports torch; the command line's parsers import this
    # module and must not (``sae-lens-mm --help``), so it is looked up there on first use.
    if name == "CFG_BRANCHES":
        from sae_lens_multimodal.core.denoising import CFG_BRANCHES

        return CFG_BRANCHES
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

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
    from sae_lens_multimodal.core.denoising import CFG_BRANCHES  # (see __getattr__ above)

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


# ------------------------------------------------------------------------------ the model an SAE belongs to
#: What to do when an SAE's recorded model is not the model at hand (``add_sae(..., on_model_mismatch=...)``).
MODEL_MISMATCH_ACTIONS: tuple[str, ...] = ("warn", "error", "ignore")
#: model names that say nothing about which weights a model holds (a model built from an object or a config)
_GENERIC_MODEL_NAMES = frozenset({"", "custom", "open_clip", "unknown", "none"})
#: library prefixes of model names: ``open-clip:hf-hub:org/repo`` and ``org/repo`` name the same weights
_NAME_PREFIXES = ("open-clip:", "timm:", "hf-hub:", "local-dir:")


class SAEModelMismatchWarning(UserWarning):
    """An SAE is used with a model (or a cache of a model) other than the one its metadata records."""


class SAEModelMismatchError(ValueError):
    """As :class:`SAEModelMismatchWarning`, raised when ``on_model_mismatch="error"``."""


#: state_dict prefixes of top-level readout modules (CLIP's projection ``head``), left out of the trunk
#: fingerprint: a readout after the last block feeds no block hook, so an SAE at a block reads the same
#: activations with or without it, and a vision tower inside a VLM drops it (LLaVA keeps no CLIP projection).
READOUT_PARAMETER_PREFIXES: tuple[str, ...] = ("head.",)


def _weights_fingerprint(state: Mapping[str, Any]) -> str:
    h = hashlib.sha256()
    for pname, p in state.items():
        h.update(f"{pname}:{tuple(p.shape)}:{p.dtype};".encode())
        if p.numel():
            h.update(p.detach().reshape(-1)[:64].float().cpu().numpy().tobytes())
    return "sha256:" + h.hexdigest()[:32]


def model_identity(model: Any, name: Optional[str] = None) -> dict[str, str]:
    """Name, class and weight fingerprints of a model (a torch module): what a cache records and is checked
    against on read, and what an SAE trained on that cache records as ``model_name`` / ``model_fingerprint``.

    ``fingerprint`` hashes every parameter's name, shape, dtype and first values, so two random-init
    models of the same architecture (same ``model_name``) still differ. ``trunk_fingerprint`` is the same
    hash without the readout parameters (:data:`READOUT_PARAMETER_PREFIXES`): what SAEs record, so that an
    SAE trained on a CLIP's vision part also matches the same tower inside a VLM. Without readout
    parameters both are equal.
    """
    state = model.state_dict()
    trunk = {k: v for k, v in state.items() if not k.startswith(READOUT_PARAMETER_PREFIXES)}
    full = _weights_fingerprint(state)
    cfg = getattr(model, "cfg", None)
    return {
        "name": name or str(getattr(cfg, "model_name", None) or type(model).__name__),
        "class": type(model).__name__,
        "fingerprint": full,
        "trunk_fingerprint": full if len(trunk) == len(state) else _weights_fingerprint(trunk),
    }


def sae_model_metadata(identity: Mapping[str, Any]) -> dict[str, Any]:
    """The SAE metadata fields (``model_name``, ``model_fingerprint``) for a model's :func:`model_identity`
    (as a cache records it under ``metadata["model"]``): the trunk fingerprint, or the full one of a cache
    made before trunk fingerprints were recorded."""
    return {"model_name": identity.get("name"),
            "model_fingerprint": identity.get("trunk_fingerprint") or identity.get("fingerprint")}


def record_model_names(model: Any, names: Iterable[Optional[str]]) -> Any:
    """Remember the names ``model`` was loaded by (given name, registry aliases), which
    :func:`check_sae_model_match` compares with an SAE's ``model_name``. Returns ``model``."""
    model.__dict__["source_names"] = tuple(dict.fromkeys(str(n) for n in names if n))
    return model


def _name_forms(name: str) -> set[str]:
    """``name`` and the spellings of the same model: library prefixes stripped, a local path resolved."""
    forms = {name}
    bare = name
    while bare.startswith(_NAME_PREFIXES):
        bare = bare.split(":", 1)[1]
    forms.add(bare)
    try:
        path = Path(bare).expanduser()
        if path.exists():
            forms.add(str(path.resolve()))
    except (OSError, ValueError):  # not a path
        pass
    return {f.rstrip("/") for f in forms if f}


def _model_names(model: Any) -> list[str]:
    names = list(model.__dict__.get("source_names", ()))
    cfg = getattr(model, "cfg", None)
    for candidate in (getattr(cfg, "model_name", None), getattr(model, "model_name", None)):
        if isinstance(candidate, str) and candidate.lower() not in _GENERIC_MODEL_NAMES and candidate not in names:
            names.append(candidate)
    return names


def _model_fingerprints(model: Any, sae: Any) -> tuple[str, ...]:
    """The full and trunk fingerprints of the part of ``model`` the SAE reads, as a cache of that part records
    them (the vision tower of a CLIP / VLM; a diffusion pipeline's raw denoiser); empty when unknown."""
    target, part = model, None
    if hasattr(model, "locate") and hasattr(model, "part"):
        try:
            part = model.locate(sae).part
        except Exception:  # an unknown hook: splicing reports it with its own message
            return ()
        target = model.part(part)
    if part == "denoiser":
        target = getattr(target, "denoiser", target)
    if not hasattr(target, "state_dict"):
        return ()
    identity = model_identity(target)
    return tuple(dict.fromkeys((identity["fingerprint"], identity["trunk_fingerprint"])))


def check_sae_model_match(
    sae: Any,
    model: Any = None,
    *,
    identity: Optional[Mapping[str, Any]] = None,
    on_mismatch: str = "warn",
) -> Optional[str]:
    """Compare the model an SAE's metadata records with ``model`` (a hooked model it is spliced into) or
    ``identity`` (a cache's ``metadata["model"]``: ``name``, ``fingerprint``, optionally ``names``).

    With a recorded ``model_fingerprint`` (SAEs trained on this package's caches, the bundled ones) the
    weights decide; otherwise the recorded ``model_name`` is compared with the names the model was loaded
    by (library prefixes and registry aliases count as the same name; a model built from an object, with no
    name, is not compared). SAEs that record neither (most public releases) pass silently.

    A mismatch warns with :class:`SAEModelMismatchWarning` (``on_mismatch="warn"``), raises
    :class:`SAEModelMismatchError` (``"error"``) or is ignored (``"ignore"``); the message is returned.
    """
    if on_mismatch not in MODEL_MISMATCH_ACTIONS:
        raise ValueError(f"on_model_mismatch={on_mismatch!r} is not one of {MODEL_MISMATCH_ACTIONS}.")
    meta = sae.cfg.metadata
    recorded_name, recorded_fp = meta.get("model_name"), meta.get("model_fingerprint")
    if on_mismatch == "ignore" or not (recorded_name or recorded_fp):
        return None
    if model is not None:
        names = _model_names(model)
        fingerprints = _model_fingerprints(model, sae) if recorded_fp else ()
        where = "this model"
    elif identity is not None:
        names = [str(n) for n in (identity.get("name"), *identity.get("names", ())) if n]
        fingerprints = tuple(fp for fp in (identity.get("fingerprint"), identity.get("trunk_fingerprint")) if fp)
        where = "the model that made these activations"
    else:
        raise TypeError("check_sae_model_match needs a model or a model identity.")
    shown = repr(names[0]) if names else "an unnamed model"
    if recorded_fp and fingerprints:
        if recorded_fp in fingerprints:  # the full weights, or the trunk without readouts (the SAE's record)
            return None
        fingerprint = fingerprints[-1]  # shown: the trunk's, what an SAE records
        name_agrees = bool(recorded_name) and any(_name_forms(str(recorded_name)) & _name_forms(n) for n in names)
        reason = (f"its weights differ (fingerprint {fingerprint}, recorded {recorded_fp}): other weights under the "
                  "same name, or the same weights in another dtype or processed (fold_ln...)"
                  if name_agrees else f"{where} is {shown} with weight fingerprint {fingerprint}, not {recorded_fp}")
    elif recorded_name and names:
        if any(_name_forms(str(recorded_name)) & _name_forms(n) for n in names):
            return None
        reason = f"{where} is {shown}"
    else:
        return None
    hook = meta.get("hook_name")
    message = (
        f"The SAE{f' for {hook!r}' if hook else ''} was trained on "
        f"{f'model {recorded_name!r}' if recorded_name else 'a model recorded by its weight fingerprint only'}, "
        f"but {reason}. Its latents may mean nothing here: use the SAE with the model it was trained on "
        f"(its cfg.metadata.model_name). To use it anyway, pass on_model_mismatch='ignore'; "
        f"on_model_mismatch='error' refuses instead of warning."
    )
    if on_mismatch == "error":
        raise SAEModelMismatchError(message)
    warnings.warn(message, SAEModelMismatchWarning, stacklevel=3)
    return message
