"""Block-level hooks (``hook_in`` / ``hook_out`` / ``hook_update`` and their ``_text`` twins).

Each supported diffusers block class gets HookPoints as real attributes plus one forward pre-hook and
one forward hook (torch's own hook mechanism, so the block's code and weights stay untouched). The
HookPoints are only called when something watches them, so an unwatched model runs the original code.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformer_lens.hook_points import HookPoint

from sae_lens_multimodal.core.contract import HookSpec
from sae_lens_multimodal.diffusion._hookutil import hook_channel_last, observed

try:  # BaseOutput is a dict-like dataclass; the Transformer2DModel returns one when return_dict=True.
    from diffusers.utils import BaseOutput
except ImportError:  # pragma: no cover
    BaseOutput = ()  # type: ignore[assignment,misc]


@dataclass
class Stream:
    """One residual stream through a block: where its input is in the call and its output in the result."""

    suffix: str  # "" (image / main stream) or "_text"
    in_param: str  # forward parameter holding the stream's input
    in_pos: int | None  # its positional index (None: keyword-only)
    out_index: int | None  # None: the output is the tensor; else index into the returned tuple/BaseOutput
    has_out: bool
    has_update: bool
    width_in: int | None
    width_out: int | None
    spatial: bool = False  # a (b, c, h, w) feature map (shown channel-last), not (b, tokens, d) tokens

    def get_input(self, args: tuple, kwargs: dict) -> Any:
        if self.in_pos is not None and len(args) > self.in_pos:
            return args[self.in_pos]
        return kwargs.get(self.in_param)

    def set_input(self, args: tuple, kwargs: dict, value: torch.Tensor) -> tuple[tuple, dict]:
        if self.in_pos is not None and len(args) > self.in_pos:
            args = args[: self.in_pos] + (value,) + args[self.in_pos + 1 :]
        else:
            kwargs = dict(kwargs)
            kwargs[self.in_param] = value
        return args, kwargs

    def get_output(self, output: Any) -> Any:
        if self.out_index is None:
            return output
        if isinstance(output, BaseOutput):
            return output.to_tuple()[self.out_index]
        return output[self.out_index]

    def set_output(self, output: Any, value: torch.Tensor) -> Any:
        if self.out_index is None:
            return value
        if isinstance(output, BaseOutput):
            key = list(output.keys())[self.out_index]
            output[key] = value
            return output
        items = list(output)
        items[self.out_index] = value
        return tuple(items) if isinstance(output, tuple) else items


def _param_pos(module: nn.Module, name: str) -> int | None:
    # The class's forward: an instance-level replacement (nnsight's controller) hides the real signature.
    params = list(inspect.signature(type(module).forward).parameters.values())[1:]
    for i, p in enumerate(params):
        if p.name == name:
            return i if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) else None
    raise TypeError(f"{type(module).__name__}.forward has no parameter {name!r}")


def _resnet(m: nn.Module) -> list[Stream]:
    same = m.in_channels == m.out_channels and not getattr(m, "up", False) and not getattr(m, "down", False)
    return [Stream("", "input_tensor", _param_pos(m, "input_tensor"), None, True, same, m.in_channels, m.out_channels,
                   spatial=True)]


def _transformer_2d(m: nn.Module) -> list[Stream]:
    continuous = getattr(m, "is_input_continuous", True)  # continuous input is a (b, c, h, w) latent
    same = continuous and m.in_channels == m.out_channels
    return [Stream("", "hidden_states", _param_pos(m, "hidden_states"), 0, True, same, m.in_channels, m.out_channels,
                   spatial=continuous)]


def _basic_block(m: nn.Module) -> list[Stream]:
    dim = getattr(m, "dim", None) or m.attn1.query_dim
    return [Stream("", "hidden_states", _param_pos(m, "hidden_states"), None, True, True, dim, dim)]


def _single_image_block(m: nn.Module) -> list[Stream]:
    dim = m.attn.query_dim
    return [Stream("", "hidden_states", _param_pos(m, "hidden_states"), None, True, True, dim, dim)]


def _joint_block(m: nn.Module) -> list[Stream]:
    """SD3 JointTransformerBlock and Flux double/single-stream blocks: they return (text, image)."""
    dim = m.attn.query_dim
    text_dim = getattr(m.attn, "added_kv_proj_dim", None) or dim
    text_out = not bool(getattr(m, "context_pre_only", False))  # SD3's last block drops the text stream
    return [
        Stream("", "hidden_states", _param_pos(m, "hidden_states"), 1, True, True, dim, dim),
        Stream(
            "_text",
            "encoder_hidden_states",
            _param_pos(m, "encoder_hidden_states"),
            0,
            text_out,
            text_out,
            text_dim,
            text_dim if text_out else None,
        ),
    ]


def _flux_single(m: nn.Module) -> list[Stream]:
    dim = m.attn.query_dim
    return [
        Stream("", "hidden_states", _param_pos(m, "hidden_states"), 1, True, True, dim, dim),
        Stream("_text", "encoder_hidden_states", _param_pos(m, "encoder_hidden_states"), 0, True, True, dim, dim),
    ]


#: diffusers block class name -> how to find its streams. Matched by class name so subclasses and
#: re-exports under other module paths are recognised too.
BLOCK_SPECS: dict[str, Callable[[nn.Module], list[Stream]]] = {
    "ResnetBlock2D": _resnet,
    "ResnetBlockCondNorm2D": _resnet,
    "Transformer2DModel": _transformer_2d,
    "BasicTransformerBlock": _basic_block,
    "SD3SingleTransformerBlock": _single_image_block,
    "JointTransformerBlock": _joint_block,
    "FluxTransformerBlock": _joint_block,
    "FluxSingleTransformerBlock": _flux_single,
}


def block_streams(module: nn.Module) -> list[Stream] | None:
    for cls in type(module).__mro__:
        spec = BLOCK_SPECS.get(cls.__name__)
        if spec is not None:
            return spec(module)
    return None


def block_hook_specs(path: str, streams: list[Stream]) -> list[HookSpec]:
    """The contract (core/contract.py) for the block hooks :func:`install_block` adds at ``path``."""
    joint = len(streams) > 1  # image and text streams through one block
    specs = []
    for st in streams:
        layout = "spatial" if st.spatial else "tokens"
        stream = ("text" if st.suffix == "_text" else "image") if joint else None
        names = [(f"hook_in{st.suffix}", st.width_in)]
        names += [(f"hook_out{st.suffix}", st.width_out)] if st.has_out else []
        names += [(f"hook_update{st.suffix}", st.width_out)] if st.has_update else []
        specs += [HookSpec(f"{path}.{name}", "denoiser", layout, width, stream=stream) for name, width in names]
    return specs


def install_block(module: nn.Module, streams: list[Stream]) -> tuple[list[Any], dict[str, int | None]]:
    """Add HookPoints to ``module`` and the torch hooks that call them. Returns (handles, widths by suffix)."""
    widths: dict[str, int | None] = {}
    for st in streams:
        module.add_module(f"hook_in{st.suffix}", HookPoint())
        widths[f"hook_in{st.suffix}"] = st.width_in
        if st.has_out:
            module.add_module(f"hook_out{st.suffix}", HookPoint())
            widths[f"hook_out{st.suffix}"] = st.width_out
        if st.has_update:
            module.add_module(f"hook_update{st.suffix}", HookPoint())
            widths[f"hook_update{st.suffix}"] = st.width_out
    slots = module._modules  # looked up at call time: add_sae swaps wrappers into these slots
    names = [(st, f"hook_in{st.suffix}", f"hook_out{st.suffix}", f"hook_update{st.suffix}") for st in streams]
    is_flux_single = any(c.__name__ == "FluxSingleTransformerBlock" for c in type(module).__mro__)

    def pre_hook(mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if is_flux_single:
            # The single-stream attention sees [text, image] concatenated; tell it where the split is.
            text = kwargs.get("encoder_hidden_states") if len(args) < 2 else args[1]
            mod.attn.__dict__["_slm_text_len"] = None if text is None else text.shape[1]
        changed = False
        for st, in_name, _, _ in names:
            hp = slots.get(in_name)
            if not observed(hp):
                continue
            x = st.get_input(args, kwargs)
            if not isinstance(x, torch.Tensor):
                continue
            y, _ = hook_channel_last(hp, x)
            if y is not x:
                args, kwargs = st.set_input(args, kwargs, y)
                changed = True
        return (args, kwargs) if changed else None

    def fwd_hook(mod: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        changed = False
        for st, _, out_name, upd_name in names:
            hp_out = slots.get(out_name) if st.has_out else None
            hp_upd = slots.get(upd_name) if st.has_update else None
            watch_out, watch_upd = observed(hp_out), observed(hp_upd)
            if not (watch_out or watch_upd):
                continue
            out = st.get_output(output)
            if not isinstance(out, torch.Tensor):
                continue
            new = out
            if watch_upd:
                inp = st.get_input(args, kwargs)
                update, modified = hook_channel_last(hp_upd, out - inp)
                if modified or modified is None:  # None: inference mode, in-place edits undetectable
                    new = inp + update
            if watch_out:
                new, _ = hook_channel_last(hp_out, new)
            if new is not out:
                output = st.set_output(output, new)
                changed = True
        return output if changed else None

    handles = [
        module.register_forward_pre_hook(pre_hook, with_kwargs=True),
        module.register_forward_hook(fwd_hook, with_kwargs=True),
    ]
    return handles, widths
