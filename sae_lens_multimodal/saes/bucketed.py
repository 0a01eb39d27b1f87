"""Timestep-bucketed SAE: one dictionary per timestep range, each an ordinary SAELens SAE.

``timestep_ranges=[[0, 1000]]`` is one SAE pooled over all timesteps; one range per scheduler timestep
(``TimestepBuckets.per_timestep``) is one SAE per timestep. Inside each bucket sits any SAELens
architecture (``inner_architecture``: standard, topk, batchtopk, jumprelu, ...), built and trained by
SAELens's own classes, so its losses, auxiliary terms and inference conversion are SAELens's.

The latent space seen from outside has ``d_sae`` latents; which bucket's dictionary they belong to is
given by the timestep of the row. ``hook_sae_*`` fire on the assembled (all-bucket) tensors.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from sae_lens.saes.sae import (
    SAE,
    SAEConfig,
    TrainCoefficientConfig,
    TrainingSAE,
    TrainingSAEConfig,
    TrainStepInput,
    TrainStepOutput,
)
from torch import nn
from transformer_lens.hook_points import HookPoint
from typing_extensions import override

from sae_lens_multimodal.saes._shared import (
    RowPlan,
    RowRoutingMixin,
    TimestepFields,
    build_inner_cfg,
    inner_classes,
    timestep_inference_cfg_dict,
)

__all__ = [
    "TimestepBucketedSAE",
    "TimestepBucketedSAEConfig",
    "TimestepBucketedTrainingSAE",
    "TimestepBucketedTrainingSAEConfig",
]


@dataclass(kw_only=True)
class TimestepBucketedSAEConfig(TimestepFields, SAEConfig):
    """Config of :class:`TimestepBucketedSAE` (see :class:`TimestepFields` for the timestep fields)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self._init_timestep_fields(training=False)

    @classmethod
    def architecture(cls) -> str:
        return "timestep_bucketed"


@dataclass(kw_only=True)
class TimestepBucketedTrainingSAEConfig(TimestepFields, TrainingSAEConfig):
    """Training config of the bucketed SAE. ``inner_architecture`` names a SAELens *training*
    architecture (``batchtopk`` is saved as ``jumprelu`` for inference, as in SAELens).

    ``dead_feature_window``: a latent of bucket b is dead for the inner auxiliary losses after this
    many steps in which bucket b had rows but the latent never fired (set it like SAETrainer's).
    """

    dead_feature_window: int = 1000

    def __post_init__(self) -> None:
        self._init_timestep_fields(training=True)
        super().__post_init__()

    @classmethod
    def architecture(cls) -> str:
        return "timestep_bucketed"

    @override
    def get_inference_sae_cfg_dict(self) -> dict[str, Any]:
        return timestep_inference_cfg_dict(self, super().get_inference_sae_cfg_dict())


class _CapturingHookPoint(HookPoint):
    """A HookPoint that remembers its last output (to read an inner SAE's pre-activations)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.__dict__["last"] = x
        return x


class _BucketedMixin(RowRoutingMixin):
    """encode/decode/weight handling shared by the inference and training bucketed SAEs."""

    cfg: Any
    buckets: nn.ModuleList
    _training_inner: bool = False

    # SAE.__init__ calls initialize_weights before the hook points exist.
    def initialize_weights(self) -> None:  # type: ignore[override]
        inner_cls, _ = inner_classes(self.cfg.inner_architecture, self._training_inner)
        inner_cfg = build_inner_cfg(self.cfg, self._training_inner)
        bucket_saes = []
        for _ in range(len(self.cfg.timestep_ranges)):
            inner = inner_cls(copy.deepcopy(inner_cfg))
            inner.hook_sae_acts_pre = _CapturingHookPoint()
            inner.setup()
            bucket_saes.append(inner)
        self.buckets = nn.ModuleList(bucket_saes)
        object.__setattr__(self, "_pending_timesteps", None)
        object.__setattr__(self, "_stash", None)

    def setup(self) -> None:  # type: ignore[override]
        # Expose only our own hook points: the buckets' internal hooks would otherwise show up (and be
        # copied by SAELens's splicing wrapper) as 'buckets.0.hook_sae_input', ...
        super().setup()  # type: ignore[misc]
        self.hook_dict = {k: v for k, v in self.hook_dict.items() if "." not in k}
        self.mod_dict = {k: v for k, v in self.mod_dict.items() if "." not in k}

    @property
    def n_buckets(self) -> int:
        return len(self.buckets)

    def bucket_sae(self, index: int) -> SAE[Any]:
        """The ordinary SAELens SAE of bucket ``index`` (shares weights with this one)."""
        return self.buckets[index]  # type: ignore[return-value]

    # Stacked views so that code reading sae.W_enc / W_dec / b_dec / b_enc gets every bucket:
    # shapes (n_buckets, d_in, d_sae), (n_buckets, d_sae, d_in), (n_buckets, d_in), (n_buckets, d_sae).
    @property
    def W_enc(self) -> torch.Tensor:  # type: ignore[override]
        return torch.stack([b.W_enc for b in self.buckets])

    @property
    def W_dec(self) -> torch.Tensor:  # type: ignore[override]
        return torch.stack([b.W_dec for b in self.buckets])

    @property
    def b_dec(self) -> torch.Tensor:  # type: ignore[override]
        return torch.stack([b.b_dec for b in self.buckets])

    @property
    def b_enc(self) -> torch.Tensor:
        return torch.stack([b.b_enc for b in self.buckets])

    # ------------------------------------------------------------------ encode / decode
    def encode(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self._encode_with_plan(x, self.plan_rows(x.shape[:-1], x.device))[0]

    def _encode_with_plan(self, x: torch.Tensor, plan: RowPlan) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.to(self.dtype)  # type: ignore[attr-defined]
        x = self.hook_sae_input(x)  # type: ignore[attr-defined]
        flat = self._scale_rows(x, plan).reshape(-1, x.shape[-1])
        idx = plan.bucket.reshape(-1)
        d_sae = self.cfg.d_sae
        acts = flat.new_zeros(flat.shape[0], d_sae)
        pre = flat.new_zeros(flat.shape[0], d_sae)
        for b in idx.unique().tolist():
            if b < 0:
                continue
            rows = (idx == b).nonzero(as_tuple=True)[0]
            inner = self.buckets[b]
            acts[rows] = _dense(inner.encode(flat[rows])).to(acts.dtype)
            pre[rows] = inner.hook_sae_acts_pre.__dict__.pop("last").to(pre.dtype)
        shape = tuple(x.shape[:-1]) + (d_sae,)
        pre_out = self.hook_sae_acts_pre(pre.reshape(shape))  # type: ignore[attr-defined]
        if pre_out is not None and pre_out.data_ptr() != pre.data_ptr():
            raise NotImplementedError(
                "Editing hook_sae_acts_pre of a timestep-bucketed SAE is not supported (each bucket applies "
                "its own activation function). Edit hook_sae_acts_post instead."
            )
        out = self.hook_sae_acts_post(acts.reshape(shape))  # type: ignore[attr-defined]
        object.__setattr__(self, "_stash", (plan, x if bool(plan.passthrough.any()) else None))
        return out, pre_out

    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        rows = feature_acts.shape[:-1]
        stash = self.__dict__.get("_stash")
        object.__setattr__(self, "_stash", None)
        if stash is not None and stash[0].bucket.shape == rows:
            plan, passthrough_x = stash
        else:
            plan, passthrough_x = self.plan_rows(rows, feature_acts.device), None
        flat = _dense(feature_acts).reshape(-1, feature_acts.shape[-1])
        idx = plan.bucket.reshape(-1)
        out = flat.new_zeros(flat.shape[0], self.cfg.d_in)
        if bool((idx < 0).any()):
            if passthrough_x is None:
                raise RuntimeError(
                    "decode() got rows that pass through unchanged (outside every timestep range, or the "
                    "other CFG branch) without the matching encode() call, so their input is unknown."
                )
            keep = (idx < 0).nonzero(as_tuple=True)[0]
            out[keep] = passthrough_x.reshape(-1, self.cfg.d_in)[keep].to(out.dtype)
        for b in idx.unique().tolist():
            if b < 0:
                continue
            sel = (idx == b).nonzero(as_tuple=True)[0]
            out[sel] = self.buckets[b].decode(flat[sel]).to(out.dtype)
        out = self._scale_rows(out.reshape(tuple(rows) + (self.cfg.d_in,)), plan, inverse=True)
        return self.hook_sae_recons(out)  # type: ignore[attr-defined]

    # ------------------------------------------------------------------ weight processing
    @torch.no_grad()
    def fold_W_dec_norm(self) -> None:  # type: ignore[override]
        for b in self.buckets:
            b.fold_W_dec_norm()

    @torch.no_grad()
    def fold_activation_norm_scaling_factor(self, scaling_factor: float) -> None:  # type: ignore[override]
        for b in self.buckets:
            b.fold_activation_norm_scaling_factor(scaling_factor)
        self.cfg.normalize_activations = "none"

    def _per_bucket_state(self, state_dict: dict[str, Any], method: str) -> None:
        for b, inner in enumerate(self.buckets):
            prefix = f"buckets.{b}."
            sub = {k[len(prefix):]: state_dict.pop(k) for k in list(state_dict) if k.startswith(prefix)}
            getattr(inner, method)(sub)
            state_dict.update({prefix + k: v for k, v in sub.items()})

    def process_state_dict_for_saving(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        self._per_bucket_state(state_dict, "process_state_dict_for_saving")

    def process_state_dict_for_loading(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        self._per_bucket_state(state_dict, "process_state_dict_for_loading")

    def to(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        out = super().to(*args, **kwargs)  # type: ignore[misc]
        for b in self.buckets:  # keep each bucket's cfg.device/dtype in step (SAE.to updates them)
            b.to(*args, **kwargs)
        return out


def _dense(t: torch.Tensor) -> torch.Tensor:
    return t.to_dense() if t.is_sparse else t


class TimestepBucketedSAE(_BucketedMixin, SAE[TimestepBucketedSAEConfig]):
    """Inference SAE with one SAELens dictionary per timestep range (architecture ``timestep_bucketed``).

    Spliced into a diffusion pipeline it reads the current timestep (and CFG branch) from the running
    denoiser call (``sae_lens_multimodal.core.denoising``); on cached activations use
    ``with timestep_context(t): sae(x)``. ``sae.bucket_sae(i)`` is bucket i's
    own SAELens SAE.
    """

    _training_inner = False

    def __init__(self, cfg: TimestepBucketedSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)


class TimestepBucketedTrainingSAE(_BucketedMixin, TrainingSAE[TimestepBucketedTrainingSAEConfig]):
    """Training version: each bucket is a SAELens TrainingSAE trained on the rows of its timesteps.

    One ``SAETrainer`` trains all buckets in one pass over timestep-labelled rows: the data provider
    hands each batch's timesteps to :meth:`set_row_timesteps`; every bucket runs its own
    ``training_forward_pass`` on its rows (with its own dead-latent mask), and the losses are weighted
    by row count so the total is the mean over all rows.
    """

    _training_inner = True

    def __init__(self, cfg: TimestepBucketedTrainingSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)

    @property
    def steps_since_fired(self) -> torch.Tensor:
        """(n_buckets, d_sae): training steps with rows of the bucket since each latent last fired.
        Training-run state like SAETrainer's own counters, so it is not part of the weights."""
        counts = self.__dict__.get("_steps_since_fired")
        if counts is None or counts.device != self.device:
            counts = torch.zeros(self.n_buckets, self.cfg.d_sae, device=self.device)
            self.__dict__["_steps_since_fired"] = counts
        return counts

    @override
    def get_coefficients(self) -> dict[str, float | TrainCoefficientConfig]:
        return self.buckets[0].get_coefficients()

    @override
    def encode_with_hidden_pre(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._encode_with_plan(x, self.plan_rows(x.shape[:-1], x.device))

    @override
    def calculate_aux_loss(self, step_input: TrainStepInput, feature_acts: torch.Tensor,
                           hidden_pre: torch.Tensor, sae_out: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError("Bucketed SAEs compute auxiliary losses per bucket in training_forward_pass.")

    @override
    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        sae_in = step_input.sae_in
        n = sae_in.shape[0]
        pending = self._take_pending()
        if pending is not None and pending[0].shape[0] != n:
            raise ValueError(
                f"The timestep labels handed over with set_row_timesteps have {pending[0].shape[0]} rows but "
                f"the batch has {n}: the data provider and the batch are out of step."
            )
        plan = self.plan_rows(sae_in.shape[:-1], sae_in.device, labels=pending)
        scaled = self._scale_rows(sae_in, plan)
        idx = plan.bucket
        d_sae = self.cfg.d_sae
        feature_acts = sae_in.new_zeros(n, d_sae)
        hidden_pre = sae_in.new_zeros(n, d_sae)
        sae_out = sae_in.clone()  # rows outside every bucket are not trained: they pass through
        loss = sae_in.new_zeros(())
        losses: dict[str, torch.Tensor] = {}
        metrics: dict[str, Any] = {}
        window = self.cfg.dead_feature_window
        for b in idx.unique().tolist():
            if b < 0:
                continue
            rows = (idx == b).nonzero(as_tuple=True)[0]
            out = self.buckets[b].training_forward_pass(
                TrainStepInput(
                    sae_in=scaled[rows],
                    coefficients=step_input.coefficients,
                    dead_neuron_mask=self.steps_since_fired[b] > window,
                    n_training_steps=step_input.n_training_steps,
                    is_logging_step=step_input.is_logging_step,
                )
            )
            weight = rows.numel() / n
            loss = loss + weight * out.loss
            for k, v in out.losses.items():
                losses[k] = losses.get(k, 0.0) + weight * v
            for k, v in out.metrics.items():
                metrics[f"bucket_{b}/{k}"] = v
            acts_b = _dense(out.feature_acts)
            feature_acts[rows] = acts_b.to(feature_acts.dtype)
            hidden_pre[rows] = out.hidden_pre.to(hidden_pre.dtype)
            sae_out[rows] = out.sae_out.to(sae_out.dtype)
            with torch.no_grad():
                fired = (acts_b != 0).any(dim=0)
                self.steps_since_fired[b] += 1
                self.steps_since_fired[b][fired] = 0
        sae_out = self._scale_rows(sae_out, plan, inverse=True) if self.cfg.bucket_scaling_factors else sae_out
        return TrainStepOutput(
            sae_in=sae_in, sae_out=sae_out, feature_acts=feature_acts, hidden_pre=hidden_pre,
            loss=loss, losses=losses, metrics=metrics,
        )

    @override
    def process_state_dict_for_saving_inference(self, state_dict: dict[str, Any]) -> None:
        # Each bucket converts its own weights (topk norm folding, batchtopk -> jumprelu threshold).
        self._per_bucket_state(state_dict, "process_state_dict_for_saving_inference")

    @override
    def log_histograms(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for b, inner in enumerate(self.buckets):
            out.update({f"bucket_{b}/{k}": v for k, v in inner.log_histograms().items()})
        return out
