"""HookedUNet and HookedDiT: TransformerLens hook points inside diffusers denoisers, without copying weights.

The wrapped diffusers module keeps its own code and weights. HookPoints become real attributes of its
blocks (``down_blocks.2.attentions.1.hook_out``), attention processors are wrapped (``...attn2.hook_pattern``)
and the wrapper registers the denoiser's children as its own, so hook names are the diffusers module paths
and SAELens's ``add_sae`` (which walks attributes along the hook name) works unchanged.
"""

from __future__ import annotations

import inspect
import json
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from sae_lens import SAE
from torch import nn
from transformer_lens.hook_points import HookPoint

from sae_lens_multimodal.core.hooked_root import MultimodalHookedRootModule, unknown_hook_error
from sae_lens_multimodal.core.contract import HookSpec
from sae_lens_multimodal.core.names import expand_unet_alias
from sae_lens_multimodal.models.registry import resolve_model_name
from sae_lens_multimodal.diffusion.pipeline_classes import load_checked
from sae_lens_multimodal.diffusion._attention import (
    HookedAttentionProcessor,
    attention_hook_specs,
    install_attention,
    uninstall_attention,
)
from sae_lens_multimodal.diffusion._blocks import block_hook_specs, block_streams, install_block
from sae_lens_multimodal.core.denoising import (
    DenoisingState,
    current_branch,
    current_denoising_state,
    current_timestep,
    denoising_state,
)

__all__ = ["HookedUNet", "HookedDiT", "HookedDenoiser", "SUPPORTED_UNETS", "SUPPORTED_DITS"]

#: denoiser class name -> family
SUPPORTED_UNETS = {"UNet2DConditionModel": "unet"}
SUPPORTED_DITS = {
    "PixArtTransformer2DModel": "pixart",
    "Transformer2DModel": "transformer2d",
    "DiTTransformer2DModel": "dit",
    "SD3Transformer2DModel": "sd3",
    "FluxTransformer2DModel": "flux",
}
#: Flux is called with ``timestep / 1000``; multiply back to report scheduler units.
TIMESTEP_SCALE = {"flux": 1000.0}


def _family(denoiser: nn.Module, supported: dict[str, str]) -> str | None:
    for cls in type(denoiser).__mro__:
        if cls.__name__ in supported:
            return supported[cls.__name__]
    return None


def _scalar_timestep(t: Any, scale: float) -> int | float | torch.Tensor | None:
    """The call's timestep as a Python number (a tensor if the batch mixes timesteps)."""
    if t is None:
        return None
    if isinstance(t, torch.Tensor):
        flat = t.detach().flatten()
        if flat.numel() == 0:
            return None
        if flat.numel() > 1 and not bool((flat == flat[0]).all()):
            return flat * scale if scale != 1 else flat
        value = flat[0].item()
    else:
        value = t
    if scale != 1:
        return float(value) * scale
    return value


class Installation:
    """Everything added to one diffusers denoiser; shared by every wrapper of that denoiser."""

    def __init__(self, denoiser: nn.Module, family: str) -> None:
        self.denoiser = denoiser
        self.family = family
        self.timestep_scale = TIMESTEP_SCALE.get(family, 1.0)
        self.handles: list[Any] = []
        #: hook name -> HookSpec (core/contract.py), built once here from the blocks' and attentions' shapes.
        self.specs: dict[str, HookSpec] = {}
        self.attention: dict[str, tuple[nn.Module, list[str], bool]] = {}
        self.block_hooks: dict[str, list[str]] = {}
        self.unhooked_attention: dict[str, str] = {}
        #: Set by HookedDiffusionPipeline during a run: (args, kwargs, raw timestep) -> DenoisingState.
        self.state_provider: Callable[[tuple, dict, Any], DenoisingState] | None = None
        self._open_states: list[ExitStack | None] = []  # one per denoiser call in progress (nested calls stack)
        self._calls = 0
        params = list(inspect.signature(type(denoiser).forward).parameters)[1:]  # class forward, minus self
        self._timestep_pos = params.index("timestep") if "timestep" in params else None
        self._install()

    # -------------------------------------------------------------- install / remove
    def _install(self) -> None:
        modules = list(self.denoiser.named_modules())
        kinds = {path: type(m).__name__ for path, m in modules}
        for path, module in modules:
            if not path:
                continue
            streams = block_streams(module)
            if streams is not None:
                handles, widths = install_block(module, streams)
                self.handles += handles
                self.block_hooks[path] = list(widths)
                grid = self._image_token_grid()
                self.specs.update({sp.name: (replace(sp, grid=grid) if grid and sp.layout == "tokens"
                                             and sp.stream in (None, "image") else sp)
                                   for sp in block_hook_specs(path, streams)})
            if hasattr(module, "processor") and hasattr(module, "set_processor"):
                parent = path.rsplit(".", 1)[0] if "." in path else ""
                single = kinds.get(parent) == "FluxSingleTransformerBlock"
                widths = install_attention(module, single_stream=single)
                if widths is None:
                    self.unhooked_attention[path] = type(module.processor).__name__
                    continue
                self.attention[path] = (module, list(widths), single)
                self.specs.update({sp.name: sp for sp in attention_hook_specs(path, module, widths)})
        self.handles.append(self.denoiser.register_forward_pre_hook(self._enter, with_kwargs=True))
        self.handles.append(self.denoiser.register_forward_hook(self._exit, with_kwargs=True, always_call=True))

    def _image_token_grid(self) -> tuple[int, int] | None:
        """Rows x columns (row-major) of a patchifying DiT's image tokens at its native size: the block hooks'
        contract ``grid``, so analyses can put tokens back on the image (PixArt / DiT / SD3; None otherwise)."""
        cfg = getattr(self.denoiser, "config", None)
        patch, size = getattr(cfg, "patch_size", None), getattr(cfg, "sample_size", None)
        if self.family not in ("pixart", "dit", "sd3") or not isinstance(patch, int) or not isinstance(size, int) or patch < 1:
            return None
        return (size // patch, size // patch)

    def refresh(self) -> None:
        """Re-wrap attention processors that were replaced since installation (e.g. set_attn_processor)."""
        for path, (module, names, single) in self.attention.items():
            if not isinstance(module.processor, HookedAttentionProcessor):
                if install_attention(module, single_stream=single) is None:
                    warnings.warn(
                        f"Attention {path!r} now uses {type(module.processor).__name__}, which has no hooked "
                        "version: its attention hooks will not fire. Use AttnProcessor2_0 / JointAttnProcessor2_0 "
                        "/ FluxAttnProcessor to observe q/k/v/pattern/z/result.",
                        stacklevel=3,
                    )

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        for module, names, _ in self.attention.values():
            uninstall_attention(module, names)
        for path, names in self.block_hooks.items():
            block = self.denoiser.get_submodule(path)
            for name in names:
                block._modules.pop(name, None)
        self.denoiser.__dict__.pop("_slm_installation", None)

    # -------------------------------------------------------------- denoising state
    def _enter(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._open_states.append(None)  # balanced by _exit even when something below raises
        if self._timestep_pos is not None and len(args) > self._timestep_pos:
            raw = args[self._timestep_pos]
        else:
            raw = kwargs.get("timestep")
        if self.state_provider is not None:
            state = self.state_provider(args, kwargs, raw)
        else:
            state = DenoisingState(timestep=_scalar_timestep(raw, self.timestep_scale), call_index=self._calls)
        self._calls += 1
        # torch runs _enter and _exit as separate hooks, so the state's context is held open in an ExitStack
        stack = ExitStack()
        stack.enter_context(denoising_state(state))
        self._open_states[-1] = stack

    def _exit(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        stack = self._open_states.pop() if self._open_states else None
        if stack is not None:
            stack.close()


def get_installation(denoiser: nn.Module, family: str) -> Installation:
    inst = denoiser.__dict__.get("_slm_installation")
    if inst is None:
        inst = Installation(denoiser, family)
        denoiser.__dict__["_slm_installation"] = inst
    return inst


class _AliasAwareDict(dict):
    """SAELens keeps attached SAEs in a dict keyed by hook name; make alias keys find canonical entries."""

    def __init__(self, resolve: Callable[[str], str]) -> None:
        super().__init__()
        self._resolve = resolve

    def __contains__(self, key: object) -> bool:
        return super().__contains__(self._resolve(key) if isinstance(key, str) else key)

    def __getitem__(self, key: Any) -> Any:
        return super().__getitem__(self._resolve(key) if isinstance(key, str) else key)

    def __setitem__(self, key: Any, value: Any) -> None:
        super().__setitem__(self._resolve(key) if isinstance(key, str) else key, value)

    def __delitem__(self, key: Any) -> None:
        super().__delitem__(self._resolve(key) if isinstance(key, str) else key)

    def get(self, key: Any, default: Any = None) -> Any:
        return super().get(self._resolve(key) if isinstance(key, str) else key, default)

    def pop(self, key: Any, *default: Any) -> Any:
        return super().pop(self._resolve(key) if isinstance(key, str) else key, *default)


class HookedDenoiser(MultimodalHookedRootModule):
    """Shared machinery of HookedUNet, HookedDiT and HookedDiffusionPipeline (hook names = denoiser paths)."""

    _supported: dict[str, str] = {}

    hook_docs = "docs/hooks-diffusion.md"

    def __init__(self, denoiser: nn.Module) -> None:
        family = _family(denoiser, self._supported)
        if family is None:
            raise TypeError(
                f"{type(self).__name__} does not support {type(denoiser).__name__}. Supported denoisers: "
                f"{', '.join(sorted(self._supported))}"
                + (" (use HookedDiT for transformer denoisers)" if self._supported is SUPPORTED_UNETS else "")
                + (" (use HookedUNet for UNets)" if self._supported is SUPPORTED_DITS else "")
                + "."
            )
        super().__init__()
        self.__dict__["_denoiser"] = denoiser  # not a submodule: its children are registered below instead
        self.__dict__["_installation"] = get_installation(denoiser, family)
        self.family = family
        self._adopt(denoiser)
        self._acts_to_saes = _AliasAwareDict(self.canonical_hook_name)
        self.setup()

    def _adopt(self, denoiser: nn.Module) -> None:
        # Register the denoiser's children (and direct parameters/buffers) as this module's own, so that
        # hook names, state_dict keys and parameters() match the diffusers module's exactly.
        # (Direct dict writes: add_module's hasattr check would see the denoiser through __getattr__.)
        for name, child in denoiser.named_children():
            self._modules[name] = child
        for name, param in denoiser.named_parameters(recurse=False):
            self._parameters[name] = param
        for name, buf in denoiser.named_buffers(recurse=False):
            self._buffers[name] = buf
            if name in denoiser._non_persistent_buffers_set:
                self._non_persistent_buffers_set.add(name)

    # -------------------------------------------------------------- plumbing
    def setup(self) -> None:
        """TransformerLens ``setup``, except that only HookPoints get a ``.name``.

        TransformerLens writes ``module.name`` on every submodule, which would clobber diffusers attributes
        of that name (``Upsample2D.name`` selects its conv layer).
        """
        self.mod_dict = {}
        self.hook_dict = {}
        for name, module in self.named_modules():
            if name == "":
                continue
            self.mod_dict[name] = module
            if isinstance(module, HookPoint):
                module.name = name
                self.hook_dict[name] = module

    @property
    def denoiser(self) -> nn.Module:
        """The wrapped diffusers module (its weights are this wrapper's weights)."""
        return self.__dict__["_denoiser"]

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_") or "_denoiser" not in self.__dict__:
                raise
            # config, dtype, device, ... of the diffusers module
            return getattr(self.__dict__["_denoiser"], name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Exactly the wrapped denoiser's forward: same arguments, same return value."""
        return self.denoiser(*args, **kwargs)

    # Aliases of the functions in sae_lens_multimodal.core.denoising (one definition of each).
    @property
    def current_timestep(self) -> Any:
        """Same as :func:`sae_lens_multimodal.core.denoising.current_timestep`."""
        return current_timestep()

    @property
    def current_branch(self) -> Any:
        """Same as :func:`sae_lens_multimodal.core.denoising.current_branch`."""
        return current_branch()

    @property
    def current_state(self) -> DenoisingState | None:
        """Same as :func:`sae_lens_multimodal.core.denoising.current_denoising_state`."""
        return current_denoising_state()

    @property
    def unhooked_attention(self) -> dict[str, str]:
        """Attention modules whose processor has no hooked version (path -> processor class): no q/k/v/... hooks."""
        return dict(self._installation.unhooked_attention)

    def restore(self) -> nn.Module:
        """Remove every hook point, torch hook and processor wrapper from the denoiser and return it.

        Every wrapper of this denoiser stops working afterwards.
        """
        self.reset_saes()
        self.reset_hooks(including_permanent=True)
        self._installation.remove()
        return self.denoiser

    def set_always_observed(self, enabled: bool = True, names_filter: Any = None) -> None:
        """Call hook points even when no TransformerLens hook watches them.

        Needed to read hook points through nnsight (``envoy.hook_out.output``), which instruments modules
        without registering torch hooks. Watching attention scores/patterns switches those attention
        modules from fused SDPA to the explicit softmax path (same values up to float rounding).
        """
        names = self._filter_names(names_filter)
        for name in names:
            self.hook_dict[name].__dict__["_always_observed"] = enabled

    # -------------------------------------------------------------- hook names
    def canonical_hook_name(self, name: str) -> str:
        """Resolve a short alias (``up.1.1.hook_out``) to the diffusers path (``up_blocks.1.attentions.1.hook_out``)."""
        if name in self.mod_dict or self.family != "unet":
            return name
        return expand_unet_alias(name)

    def aliases(self) -> dict[str, str]:
        """Short alias -> canonical block path, for the blocks of this model."""
        out: dict[str, str] = {}
        if self.family != "unet":
            return out
        for path, module in self.denoiser.named_modules():
            parts = path.split(".")
            if len(parts) == 4 and parts[0] in ("down_blocks", "up_blocks") and parts[2] == "attentions":
                out[f"{parts[0][:-7]}.{parts[1]}.{parts[3]}"] = path
            elif len(parts) == 3 and parts[0] == "mid_block" and parts[1] == "attentions":
                out[f"mid.{parts[2]}"] = path
        return out

    def _unknown(self, given: str, what: str = "hook") -> KeyError:
        canonical = self.canonical_hook_name(given)
        err = unknown_hook_error(canonical, self.hook_dict.keys(), what=what, docs=self.hook_docs)
        if canonical == given:
            return err
        return KeyError(f"{given!r} is an alias of {canonical!r}, which does not exist. {err.args[0]}")

    def _filter_names(self, names_filter: Any) -> list[str]:
        if names_filter is None:
            return list(self.hook_dict)
        if isinstance(names_filter, str):
            names_filter = [names_filter]
        if callable(names_filter):
            return [n for n in self.hook_dict if names_filter(n)]
        names = [self.canonical_hook_name(n) for n in names_filter]
        for name, given in zip(names, names_filter):
            if name not in self.hook_dict:
                raise self._unknown(given)
        return names

    def _canonical_filter(self, names_filter: Any) -> Any:
        if isinstance(names_filter, str):
            return self._filter_names(names_filter)[0]
        if isinstance(names_filter, (list, tuple, set)):
            return self._filter_names(list(names_filter))
        return names_filter

    def _enable_hook_with_name(self, name: str, hook: Callable, dir: str) -> None:  # type: ignore[override]
        canonical = self.canonical_hook_name(name)
        if canonical not in self.mod_dict:
            raise self._unknown(name)
        super()._enable_hook_with_name(canonical, hook, dir)

    @contextmanager
    def hooks(self, fwd_hooks: list = [], bwd_hooks: list = [], reset_hooks_end: bool = True,  # noqa: B006
              clear_contexts: bool = False) -> Iterator[HookedDenoiser]:
        """TransformerLens ``hooks`` context manager; hook names may be aliases. Hooks are removed on exit."""
        self._installation.refresh()
        with super().hooks(fwd_hooks, bwd_hooks, reset_hooks_end, clear_contexts) as model:
            yield model

    def run_with_cache(self, *model_args: Any, names_filter: Any = None, **kwargs: Any) -> tuple[Any, Any]:  # type: ignore[override]
        """TransformerLens ``run_with_cache`` over one denoiser call; ``names_filter`` may use aliases."""
        return super().run_with_cache(*model_args, names_filter=self._canonical_filter(names_filter), **kwargs)

    # -------------------------------------------------------------- hook contract (core/contract.py)
    PART = "denoiser"

    def _build_hook_specs(self) -> dict[str, HookSpec]:
        # Built when the hooks were installed, from the same block / attention modules.
        return dict(self._installation.specs)

    def _canonical_name(self, name: str) -> str:
        return self.canonical_hook_name(name)

    def _unknown_hook(self, name: str, what: str = "hook") -> KeyError:
        return self._unknown(name, what=what)

    # -------------------------------------------------------------- SAE splicing with aliases
    def add_sae(self, sae: SAE, use_error_term: bool | None = None, exclude_special_tokens: Any = False, *,
                on_model_mismatch: str = "warn") -> None:
        """SAELens ``add_sae``; ``sae.cfg.metadata.hook_name`` may be an alias (e.g. ``up.0.1.hook_out``).
        ``on_model_mismatch``: see MultimodalHookedRootModule.add_sae."""
        meta = sae.cfg.metadata
        given, given_out = meta.hook_name, getattr(meta, "hook_name_out", None)
        if given is None:
            return super().add_sae(sae, use_error_term, exclude_special_tokens, on_model_mismatch=on_model_mismatch)
        try:
            meta.hook_name = self.canonical_hook_name(given)
            if given_out is not None:
                meta.hook_name_out = self.canonical_hook_name(given_out)
            super().add_sae(sae, use_error_term, exclude_special_tokens, on_model_mismatch=on_model_mismatch)
        except KeyError as err:
            if given != meta.hook_name:
                raise self._unknown(given, what="hook for this SAE") from err
            raise
        finally:
            meta.hook_name = given
            if given_out is not None:
                meta.hook_name_out = given_out

    def _reset_sae(self, act_name: str, prev_wrapper: Any = None) -> None:  # type: ignore[override]
        MultimodalHookedRootModule._reset_sae(self, self.canonical_hook_name(act_name), prev_wrapper)

    def reset_saes(self, act_names: str | list[str] | None = None) -> None:  # type: ignore[override]
        if isinstance(act_names, str):
            act_names = [act_names]
        if act_names is not None:
            act_names = [self.canonical_hook_name(n) for n in act_names]
        MultimodalHookedRootModule.reset_saes(self, act_names)


def _local_config(path: Path, subfolder: str) -> tuple[str | None, dict | None]:
    for sub in (subfolder, None):
        cfg = (path / sub / "config.json") if sub else (path / "config.json")
        if cfg.is_file():
            return sub, json.loads(cfg.read_text())
    return None, None


def _load(name: str | os.PathLike, subfolder: str | None, default_sub: str, loader: Callable, **kwargs: Any) -> nn.Module:
    """Load a denoiser from a local directory (component or full pipeline layout) or a hub id."""
    path = Path(name)
    if subfolder is None and path.is_dir():
        subfolder, cfg = _local_config(path, default_sub)
        if cfg is None:
            raise FileNotFoundError(
                f"{name!s} has neither {default_sub}/config.json (pipeline layout) nor config.json "
                f"(component layout)."
            )
        return loader(str(name), subfolder=subfolder, **kwargs)
    if subfolder is not None:
        return loader(str(name), subfolder=subfolder, **kwargs)
    try:  # a hub id: full pipeline repos keep the denoiser in a subfolder
        return loader(str(name), subfolder=default_sub, **kwargs)
    except (OSError, EnvironmentError, ValueError) as first:
        try:
            return loader(str(name), **kwargs)
        except (OSError, EnvironmentError, ValueError):
            raise first from None


class HookedUNet(HookedDenoiser):
    """A diffusers ``UNet2DConditionModel`` (SD 1.x/2.x, SDXL layouts) with TransformerLens hook points.

    Hook names are the diffusers module paths plus ``hook_in`` / ``hook_out`` / ``hook_update`` for every
    resnet and attention/transformer block, and attention hooks on ``...attn1`` / ``...attn2``
    (see docs/hooks-diffusion.md). 4-D feature maps are shown channel-last (b, h, w, c).
    """

    _supported = SUPPORTED_UNETS

    @classmethod
    def from_pretrained(cls, unet_or_name: nn.Module | str | os.PathLike, *, subfolder: str | None = None,
                        **kwargs: Any) -> HookedUNet:
        """Wrap a UNet2DConditionModel, a pipeline's ``.unet``, or load one (hub id, pipeline or unet dir).

        ``kwargs`` go to ``UNet2DConditionModel.from_pretrained`` (e.g. ``torch_dtype``, ``variant``).
        """
        if isinstance(unet_or_name, (str, os.PathLike)):
            from diffusers import UNet2DConditionModel  # diffusers: heavy, loaded only to read a saved UNet

            unet_or_name = resolve_model_name(str(unet_or_name))  # registered names ("shapes-diffusion")
            name = unet_or_name
            load_unet = UNet2DConditionModel.from_pretrained
            return cls(load_checked(lambda: _load(name, subfolder, "unet", load_unet, **kwargs), name,
                                    what="UNet checkpoint", subfolder=subfolder or "unet"))
        if not isinstance(unet_or_name, nn.Module) and hasattr(unet_or_name, "unet"):
            unet_or_name = unet_or_name.unet
        return cls(unet_or_name)


class HookedDiT(HookedDenoiser):
    """A diffusers transformer denoiser (PixArt / Transformer2DModel / DiT, SD3, Flux) with hook points.

    Blocks are ``transformer_blocks.N`` (and Flux's ``single_transformer_blocks.N``). Joint-attention
    blocks expose the image stream under plain names and the text stream under ``*_text`` names.
    """

    _supported = SUPPORTED_DITS

    @classmethod
    def from_pretrained(cls, dit_or_name: nn.Module | str | os.PathLike, *, subfolder: str | None = None,
                        **kwargs: Any) -> HookedDiT:
        """Wrap a supported transformer, a pipeline's ``.transformer``, or load one by hub id / directory."""
        if isinstance(dit_or_name, (str, os.PathLike)):
            import diffusers  # diffusers: heavy, loaded only to read a saved transformer

            def loader(name: str, **kw: Any) -> nn.Module:
                path = Path(name) / (kw.get("subfolder") or "") / "config.json"
                if path.is_file():
                    cls_name = json.loads(path.read_text()).get("_class_name")
                    if cls_name not in SUPPORTED_DITS:
                        raise TypeError(
                            f"{name} holds a {cls_name}; HookedDiT supports {', '.join(sorted(SUPPORTED_DITS))}."
                        )
                    return getattr(diffusers, cls_name).from_pretrained(name, **kw)
                return diffusers.AutoModel.from_pretrained(name, **kw)

            name = resolve_model_name(str(dit_or_name))  # registered names ("shapes-dit"), as HookedUNet's
            return cls(load_checked(lambda: _load(name, subfolder, "transformer", loader, **kwargs), name,
                                    what="diffusion transformer checkpoint", subfolder=subfolder or "transformer"))
        if not isinstance(dit_or_name, nn.Module) and hasattr(dit_or_name, "transformer"):
            dit_or_name = dit_or_name.transformer
        return cls(dit_or_name)
