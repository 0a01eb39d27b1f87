"""Where a dictionary's nodes live, for SAEs and MLP transcoders alike.

An SAE reads and rewrites one hook: ``x = decode(encode(x)) + error``. A transcoder (SAELens ``Transcoder`` /
``SkipTranscoder``) reads the MLP's input (``cfg.metadata.hook_name``, e.g. ``blocks.1.ln2.hook_normalized``) and
rewrites the MLP's output (``cfg.metadata.hook_name_out``, e.g. ``blocks.1.hook_mlp_out``)::

    mlp_out = decode(encode(mlp_in)) [+ mlp_in W_skip^T] + error,     error = mlp_out - transcoder(mlp_in)

so the model's output is unchanged, and its nodes (features x position, and the error node per position) sit
at the hook it writes. Every circuit function keys a dictionary by that written hook (:func:`write_hook`);
:func:`read_hook` is where its features are computed from. :func:`decomposition_hooks` gives the forward hooks
that hand each dictionary its input and its hook's activation together (the read hook runs first), and
:func:`spliced` splices dictionaries with their error terms (SAELens's ``add_sae(use_error_term=True)`` does
the same for transcoders on our models; this one also passes gradients through the error term, as the
attribution code assumes).
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

import torch
from sae_lens import Transcoder

from sae_lens_multimodal.core.contract import HookSpec

__all__ = [
    "decomposition_hooks",
    "dictionary_map",
    "is_transcoder",
    "read_hook",
    "reconstruct",
    "spliced",
    "transcoder_specs",
    "write_hook",
]


def is_transcoder(sae: Any) -> bool:
    """Whether ``sae`` maps one hook to another: its ``cfg.metadata.hook_name_out`` names a hook other than
    ``hook_name`` (SAELens's transcoder convention), or it is a SAELens ``Transcoder``."""
    meta = getattr(getattr(sae, "cfg", None), "metadata", None)
    out = getattr(meta, "hook_name_out", None) if meta is not None else None
    if out is not None and out != getattr(meta, "hook_name", None):
        return True
    if isinstance(sae, Transcoder):
        raise ValueError("This transcoder has no cfg.metadata.hook_name_out, so it is not known which hook it "
                         "writes; set sae.cfg.metadata.hook_name_out = '<MLP output hook>' (e.g. "
                         "'blocks.1.hook_mlp_out').")
    return False


def transcoder_specs(model: Any, tc: Any) -> tuple[HookSpec, HookSpec]:
    """(read spec, write spec) of transcoder ``tc`` on ``model`` (located through the model contract), with
    its widths checked: ``d_in`` against the read hook, ``d_out`` against the written one."""
    spec_in = model.locate(tc)
    spec_out = model.locate(tc.cfg.metadata.hook_name_out)
    d_out = getattr(tc.cfg, "d_out", None)
    for spec, width, what in ((spec_in, tc.cfg.d_in, "d_in"), (spec_out, d_out, "d_out")):
        if spec.layout != "tokens" and spec.layout != "spatial":
            raise ValueError(f"A transcoder reads and writes feature vectors; hook {spec.name!r} has layout "
                             f"{spec.layout!r}.")
        if width is not None and spec.width is not None and width != spec.width:
            raise ValueError(f"Transcoder {what}={width} does not match hook {spec.name!r} of width {spec.width}; "
                             "use a transcoder trained on this model's MLP.")
    if spec_in.layer is not None and spec_out.layer is not None and spec_in.layer > spec_out.layer:
        raise ValueError(f"Transcoder reads {spec_in.name!r} after it writes {spec_out.name!r}; check its metadata.")
    return spec_in, spec_out


def write_hook(model: Any, sae: Any) -> str:
    """The full name of the hook ``sae`` rewrites (where its nodes are)."""
    return transcoder_specs(model, sae)[1].name if is_transcoder(sae) else model.locate(sae).name


def dictionary_map(model: Any, saes: Any) -> dict[str, Any]:
    """SAEs and transcoders (a list, a dict or one) by the full name of the hook each rewrites, located and
    width-checked through the model contract; two dictionaries rewriting one hook are refused."""
    if saes is None:
        return {}
    items = list(saes.values()) if isinstance(saes, Mapping) else list(saes) if isinstance(saes, (list, tuple)) else [saes]
    out: dict[str, Any] = {}
    for sae in items:
        if is_transcoder(sae):
            name = transcoder_specs(model, sae)[1].name
        else:
            spec = model.locate(sae)
            model.sae_width_check(sae, spec)
            name = spec.name
        if name in out:
            raise ValueError(f"Two SAEs / transcoders rewrite hook {name!r}; pass one per hook.")
        out[name] = sae
    return out


def read_hook(model: Any, sae: Any) -> str:
    """The full name of the hook ``sae``'s features are computed from."""
    return model.locate(sae).name


def reconstruct(sae: Any, x_read: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """What ``sae`` writes for features ``f`` computed from ``x_read``: its decoder, plus a skip
    transcoder's linear path ``x_read W_skip^T``."""
    out = sae.decode(f)
    w_skip = getattr(sae, "W_skip", None)
    if w_skip is not None:
        out = out + x_read.to(out.dtype) @ w_skip.T.to(out.dtype)
    return out


Rewrite = Callable[[str, Any, torch.Tensor, torch.Tensor], Optional[torch.Tensor]]


def decomposition_hooks(model: Any, by_hook: Mapping[str, Any], fn: Rewrite) -> list[tuple[str, Callable]]:
    """Forward hooks calling ``fn(written hook, sae, input it reads, activation of the written hook)`` at every
    dictionary's written hook (a returned tensor replaces the activation). A transcoder's input is captured at
    its read hook, which runs earlier in the same forward pass."""
    hooks: list[tuple[str, Callable]] = []
    for name, sae in by_hook.items():
        if is_transcoder(sae):
            box: dict[str, torch.Tensor] = {}

            def capture(act: torch.Tensor, hook: Any, box: dict = box) -> None:
                box["x"] = act

            def rewrite(act: torch.Tensor, hook: Any, name: str = name, sae: Any = sae, box: dict = box) -> Any:
                if "x" not in box:
                    raise RuntimeError(f"The transcoder writing {name!r} did not see its input hook run first.")
                return fn(name, sae, box.pop("x"), act)

            hooks += [(read_hook(model, sae), capture), (name, rewrite)]
        else:
            hooks.append((name, lambda act, hook, name=name, sae=sae: fn(name, sae, act, act)))
    return hooks


@contextmanager
def spliced(model: Any, saes: Any) -> Iterator[None]:
    """Splice SAEs and transcoders into ``model`` for the ``with`` block: each written hook becomes its
    dictionary's reconstruction plus the error term (computed on the fly, gradients passing), so the model's
    output is unchanged up to float rounding. The SAE objects are not modified; hooks are removed on exit."""
    def rewrite(name: str, sae: Any, x_read: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        recon = reconstruct(sae, x_read, sae.encode(x_read)).to(act.dtype)
        return recon + (act - recon)

    with model.hooks(fwd_hooks=decomposition_hooks(model, dictionary_map(model, saes), rewrite)):
        yield
