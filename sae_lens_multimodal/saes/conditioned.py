"""Timestep-conditioned SAE: ONE shared dictionary whose encoder is modulated by the timestep.

Pre-activations are ``(x' @ W_enc + b_enc) * timestep_scale[b] + timestep_bias[b]`` where ``b`` is the
timestep bucket of the row (``x'`` = input after SAELens's usual processing). Scale and bias are
learned per bucket, end to end with the dictionary; at initialisation (scale 1, bias 0) the SAE is
exactly its inner SAELens architecture. The decoder is shared by all timesteps, so latent ``i`` means
the same direction at every timestep.

Implementation: the SAE object is an instance of a subclass of the inner SAELens class itself (e.g.
``TimestepConditionedTrainingSAE_TopKTrainingSAE``), built on first use, so SAELens's losses,
auxiliary terms, weight folding and inference conversion (batchtopk -> jumprelu) all apply unchanged;
only the encoder is overridden. Supported inner architectures: standard, topk, batchtopk (training),
jumprelu.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from sae_lens.saes.jumprelu_sae import JumpReLU, JumpReLUSAE, JumpReLUTrainingSAE
from sae_lens.saes.sae import SAE, SAEConfig, TrainingSAE, TrainingSAEConfig, TrainStepInput, TrainStepOutput
from sae_lens.saes.standard_sae import StandardSAE, StandardTrainingSAE
from sae_lens.saes.topk_sae import TopKSAE, TopKTrainingSAE
from torch import nn
from typing_extensions import override

from sae_lens_multimodal.saes._shared import (
    RowPlan,
    RowRoutingMixin,
    TimestepFields,
    inner_classes,
    timestep_inference_cfg_dict,
)

__all__ = [
    "TimestepConditionedSAE",
    "TimestepConditionedSAEConfig",
    "TimestepConditionedTrainingSAE",
    "TimestepConditionedTrainingSAEConfig",
]

SUPPORTED_INNER = {False: ("standard", "topk", "jumprelu"), True: ("standard", "topk", "batchtopk", "jumprelu")}


class _InnerConfigView:
    """Lets the inherited SAELens code read ``cfg.k``, ``cfg.rescale_acts_by_decoder_norm``, ... from
    ``cfg.inner_config`` (and write them back there), so that config stays the one place they live."""

    def __getattr__(self, name: str) -> Any:
        inner = self.__dict__.get("inner_config")
        if not name.startswith("__") and inner and name in inner:
            return inner[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        inner = self.__dict__.get("inner_config")
        if name not in type(self).__dataclass_fields__ and inner is not None and name in inner:  # type: ignore[attr-defined]
            inner[name] = value
        else:
            object.__setattr__(self, name, value)


def _check_inner(cfg: Any, training: bool) -> None:
    if cfg.inner_architecture not in SUPPORTED_INNER[training]:
        raise ValueError(
            f"Timestep-conditioned SAEs support inner_architecture in {SUPPORTED_INNER[training]} "
            f"{'for training' if training else 'for inference'}, got {cfg.inner_architecture!r}. "
            "For any other SAELens architecture use the bucketed SAE (architecture 'timestep_bucketed')."
        )


@dataclass(kw_only=True)
class TimestepConditionedSAEConfig(_InnerConfigView, TimestepFields, SAEConfig):
    """Config of :class:`TimestepConditionedSAE` (see ``TimestepFields`` for the timestep fields)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_inner(self, training=False)
        self._init_timestep_fields(training=False)

    @classmethod
    def architecture(cls) -> str:
        return "timestep_conditioned"


@dataclass(kw_only=True)
class TimestepConditionedTrainingSAEConfig(_InnerConfigView, TimestepFields, TrainingSAEConfig):
    """Training config of the timestep-conditioned SAE; ``inner_architecture`` is a SAELens training
    architecture (standard, topk, batchtopk, jumprelu) and ``inner_config`` its settings."""

    def __post_init__(self) -> None:
        _check_inner(self, training=True)
        self._init_timestep_fields(training=True)
        super().__post_init__()

    @classmethod
    def architecture(cls) -> str:
        return "timestep_conditioned"

    @override
    def get_inference_sae_cfg_dict(self) -> dict[str, Any]:
        return timestep_inference_cfg_dict(self, super().get_inference_sae_cfg_dict())


_CONCRETE: dict[tuple[type, type], type] = {}


def _concrete_class(base: type, inner_cls: type) -> type:
    """``base`` combined with the SAELens class it modulates; registered in this module by name so
    instances pickle."""
    key = (base, inner_cls)
    if key not in _CONCRETE:
        name = f"{base.__name__}_{inner_cls.__name__}"
        cls = type(name, (base, inner_cls), {"__module__": __name__, "__qualname__": name, "_inner_cls": inner_cls})
        globals()[name] = cls
        _CONCRETE[key] = cls
    return _CONCRETE[key]


class TimestepConditionedSAE(RowRoutingMixin, SAE[TimestepConditionedSAEConfig]):
    """Inference SAE with one dictionary and a per-timestep-bucket encoder scale and bias
    (architecture ``timestep_conditioned``). Instances are of a subclass that also derives from the
    inner SAELens class (``isinstance(sae, TopKSAE)`` holds for a topk inner architecture)."""

    _inner_cls: Any = None
    _training_inner = False
    timestep_scale: nn.Parameter
    timestep_bias: nn.Parameter

    def __new__(cls, cfg: Any = None, *args: Any, **kwargs: Any) -> Any:
        if cls._inner_cls is None:
            if cfg is None:
                raise TypeError(f"{cls.__name__}(cfg) needs its config")
            cls = _concrete_class(cls, inner_classes(cfg.inner_architecture, cls._training_inner)[0])
        return object.__new__(cls)

    def __init__(self, cfg: Any, use_error_term: bool = False):
        object.__setattr__(self, "_pending_timesteps", None)
        object.__setattr__(self, "_stash", None)
        object.__setattr__(self, "_active_plan", None)
        super().__init__(cfg, use_error_term)

    @override
    def initialize_weights(self) -> None:
        super().initialize_weights()
        n = len(self.cfg.timestep_ranges)
        kw = dict(dtype=self.dtype, device=self.device)
        self.timestep_scale = nn.Parameter(torch.ones(n, self.cfg.d_sae, **kw))
        self.timestep_bias = nn.Parameter(torch.zeros(n, self.cfg.d_sae, **kw))

    # ------------------------------------------------------------------ encoder
    def _in_training_pass(self) -> bool:
        # Inside training_forward_pass the input is already bucket-scaled and the loss is taken in
        # scaled units, so encode/decode must not scale again.
        return self.__dict__.get("_active_plan") is not None

    def _encode_core(self, x: torch.Tensor, plan: RowPlan) -> tuple[torch.Tensor, torch.Tensor]:
        sae_in = self.process_sae_in(x if self._in_training_pass() else self._scale_rows(x, plan))
        idx = plan.bucket.clamp(min=0)
        pre = (sae_in @ self.W_enc + self.b_enc) * self.timestep_scale[idx] + self.timestep_bias[idx]
        hidden_pre = self.hook_sae_acts_pre(pre)
        acts = self._activate(hidden_pre)
        if bool(plan.passthrough.any()):
            acts = torch.where(plan.passthrough[..., None], torch.zeros_like(acts), acts)
        return self.hook_sae_acts_post(acts), hidden_pre

    def _activate(self, hidden_pre: torch.Tensor) -> torch.Tensor:
        # The activation stage of each supported SAELens architecture, after its pre-activation.
        if isinstance(self, JumpReLUTrainingSAE):
            return JumpReLU.apply(hidden_pre, self.threshold.to(hidden_pre.dtype), self.bandwidth,
                                  self.cfg.jumprelu_ste_to_input)  # type: ignore[return-value]
        if isinstance(self, JumpReLUSAE):
            return self.activation_fn(hidden_pre) * (hidden_pre > self.threshold).to(hidden_pre.dtype)
        if isinstance(self, (TopKSAE, TopKTrainingSAE)):  # also BatchTopK (its activation_fn)
            if self.cfg.rescale_acts_by_decoder_norm:
                hidden_pre = hidden_pre * self.W_dec.norm(dim=-1)
            return self.activation_fn(hidden_pre)
        if isinstance(self, (StandardSAE, StandardTrainingSAE)):
            return self.activation_fn(hidden_pre)
        raise NotImplementedError(f"No timestep-conditioned encoder for {type(self).__mro__[2].__name__}")

    @override
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        plan = self.__dict__.get("_active_plan") or self.plan_rows(x.shape[:-1], x.device)
        acts, _ = self._encode_core(x, plan)
        object.__setattr__(self, "_stash", (plan, x if bool(plan.passthrough.any()) else None))
        return acts

    @override
    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        rows = feature_acts.shape[:-1]
        stash = self.__dict__.get("_stash")
        object.__setattr__(self, "_stash", None)
        plan = self.__dict__.get("_active_plan")
        passthrough_x = None
        if plan is None:
            if stash is not None and stash[0].bucket.shape == rows:
                plan, passthrough_x = stash
            else:
                plan = self.plan_rows(rows, feature_acts.device)
        out = super().decode(feature_acts)
        if not self._in_training_pass():
            out = self._scale_rows(out, plan, inverse=True)
        if bool(plan.passthrough.any()):
            if passthrough_x is None:
                raise RuntimeError(
                    "decode() got rows that pass through unchanged (outside every timestep range, or the "
                    "other CFG branch) without the matching encode() call, so their input is unknown."
                )
            out = torch.where(plan.passthrough[..., None], passthrough_x.to(out.dtype), out)
        return out

    # ------------------------------------------------------------------ weight processing
    @override
    @torch.no_grad()
    def fold_and_get_W_dec_norm(self) -> torch.Tensor:
        # pre = (x W + b) * s + beta: scaling W and b by the norms needs beta scaled too.
        norms = super().fold_and_get_W_dec_norm()
        self.timestep_bias.data.mul_(norms)
        return norms


class TimestepConditionedTrainingSAE(TimestepConditionedSAE, TrainingSAE[TimestepConditionedTrainingSAEConfig]):
    """Training version, trained end to end by SAELens's ``SAETrainer`` on timestep-labelled rows
    (the data provider hands each batch's timesteps over with :meth:`set_row_timesteps`)."""

    _training_inner = True

    @override
    def encode_with_hidden_pre(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        plan = self.__dict__.get("_active_plan") or self.plan_rows(x.shape[:-1], x.device)
        return self._encode_core(x, plan)

    @override
    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        sae_in = step_input.sae_in
        pending = self._take_pending()
        if pending is not None and pending[0].shape[0] != sae_in.shape[0]:
            raise ValueError(
                f"The timestep labels handed over with set_row_timesteps have {pending[0].shape[0]} rows but "
                f"the batch has {sae_in.shape[0]}: the data provider and the batch are out of step."
            )
        plan = self.plan_rows(sae_in.shape[:-1], sae_in.device, labels=pending)
        if bool(plan.passthrough.any()):  # rows this SAE does not cover are not trained on
            keep = ~plan.passthrough
            sae_in, plan = sae_in[keep], RowPlan(plan.bucket[keep])
        # The loss is computed on the bucket-scaled input, so every timestep weighs alike.
        scaled = self._scale_rows(sae_in, plan)
        object.__setattr__(self, "_active_plan", plan)
        try:
            return super().training_forward_pass(dataclasses.replace(step_input, sae_in=scaled))
        finally:
            object.__setattr__(self, "_active_plan", None)

    @override
    def process_state_dict_for_saving_inference(self, state_dict: dict[str, Any]) -> None:
        if isinstance(self, TopKTrainingSAE) and self.cfg.rescale_acts_by_decoder_norm:
            # SAELens folds the decoder norms into W_enc and b_enc here; the bias must follow.
            state_dict["timestep_bias"] = state_dict["timestep_bias"] * self.get_W_dec_norm()
        super().process_state_dict_for_saving_inference(state_dict)
