"""Pieces shared by the timestep-aware SAE architectures: config fields and validation, the inner
SAELens architecture each one wraps, and the per-row routing (which bucket, or pass-through)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Literal, Optional

import torch
from sae_lens.registry import get_sae_class, get_sae_training_class
from sae_lens.saes.sae import SAEMetadata, TrainingSAEConfig

from sae_lens_multimodal.core.denoising import (
    BRANCH_CODES,
    branch_codes,
    broadcast_rows,
    current_branch_codes,
    current_timestep,
)
from sae_lens_multimodal.core.sae_metadata import normalize_sae_metadata
from sae_lens_multimodal.saes.timesteps import TimestepBuckets

OUR_ARCHITECTURES = ("timestep_bucketed", "timestep_conditioned")
OUT_OF_RANGE = ("error", "passthrough")
# Fields every SAELens (training) config has; everything else an inner architecture defines goes
# into ``inner_config``.
_BASE_FIELDS = frozenset(f.name for f in fields(TrainingSAEConfig))


@dataclass(kw_only=True)
class TimestepFields:
    """Config fields shared by the timestep-aware architectures (mixed into their SAELens configs).

    * ``inner_architecture`` / ``inner_config``: the SAELens architecture used inside (e.g. ``"topk"``
      with ``{"k": 32}``); ``inner_config`` is completed with that architecture's defaults.
    * ``timestep_ranges``: half-open ``[start, end)`` ranges in scheduler units, one per bucket.
    * ``num_train_timesteps``: the scheduler's ``config.num_train_timesteps``.
    * ``out_of_range``: ``"error"`` or ``"passthrough"`` (leave the activation unchanged) for a timestep
      outside every range, and for rows of the other CFG branch.
    * ``bucket_scaling_factors``: optional per-bucket input scale applied before encoding and undone
      after decoding (activation norms differ a lot between timesteps).

    Where/how to apply it lives in ``metadata`` (SAELens 6.x): ``hook_name``, ``model_name`` (model id),
    ``input_kind`` (``"block_output"`` / ``"residual_update"``...), ``cfg_branch`` (``"cond"``,
    ``"uncond"``, ``"both"``), checked against core/sae_metadata.py; the timestep fields are mirrored
    there too so tools that only read metadata see them.
    """

    inner_architecture: str = "standard"
    inner_config: dict[str, Any] = field(default_factory=dict)
    timestep_ranges: Optional[list[list[float]]] = None
    num_train_timesteps: Optional[int] = None
    out_of_range: Literal["error", "passthrough"] = "error"
    bucket_scaling_factors: Optional[list[float]] = None

    # ------------------------------------------------------------------ validation
    def _init_timestep_fields(self, training: bool) -> None:
        if isinstance(self.metadata, dict):  # SAEConfig.from_dict passes the raw dict first
            self.metadata = SAEMetadata(**self.metadata)
        md = self.metadata
        # Restore fields a loader dropped (top-level keys) from the metadata mirror.
        if self.timestep_ranges is None and md.get("timestep_ranges") is not None:
            self.timestep_ranges = md["timestep_ranges"]
        if self.num_train_timesteps is None and md.get("num_train_timesteps") is not None:
            self.num_train_timesteps = md["num_train_timesteps"]
        if self.timestep_ranges is None or self.num_train_timesteps is None:
            raise ValueError(
                f"{type(self).__name__} needs timestep_ranges (list of [start, end) in scheduler units) and "
                "num_train_timesteps (scheduler.config.num_train_timesteps). For one SAE over all "
                "timesteps use timestep_ranges=[[0, num_train_timesteps]]."
            )
        buckets = TimestepBuckets(self.timestep_ranges, self.num_train_timesteps)
        self.timestep_ranges = buckets.to_list()
        self.num_train_timesteps = int(self.num_train_timesteps)
        if self.out_of_range not in OUT_OF_RANGE:
            raise ValueError(f"out_of_range must be one of {OUT_OF_RANGE}, got {self.out_of_range!r}")
        if self.bucket_scaling_factors is not None:
            self.bucket_scaling_factors = [float(f) for f in self.bucket_scaling_factors]
            if len(self.bucket_scaling_factors) != len(buckets):
                raise ValueError(
                    f"bucket_scaling_factors has {len(self.bucket_scaling_factors)} entries but there are "
                    f"{len(buckets)} timestep ranges."
                )
        if self.reshape_activations != "none":
            raise ValueError("Timestep-aware SAEs support reshape_activations='none' only.")
        if self.normalize_activations == "covariance_whitening":
            raise ValueError(
                "normalize_activations='covariance_whitening' is not supported by timestep-aware SAEs; "
                "use 'expected_average_only_in' or bucket_scaling_factors."
            )
        normalize_sae_metadata(md, source=f"{type(self).__name__} metadata")
        self.inner_config = complete_inner_config(self, training)
        md.timestep_ranges = self.timestep_ranges
        md.num_train_timesteps = self.num_train_timesteps
        md.bucket_scaling_factors = self.bucket_scaling_factors

    @property
    def buckets(self) -> TimestepBuckets:
        return TimestepBuckets(self.timestep_ranges or [], int(self.num_train_timesteps or 0))


# ---------------------------------------------------------------------- inner architectures
def inner_classes(architecture: str, training: bool) -> tuple[type, type]:
    if architecture in OUR_ARCHITECTURES:
        raise ValueError(f"inner_architecture cannot be {architecture!r} (timestep-aware SAEs do not nest).")
    try:
        return get_sae_training_class(architecture) if training else get_sae_class(architecture)
    except KeyError:
        from sae_lens.registry import SAE_CLASS_REGISTRY, SAE_TRAINING_CLASS_REGISTRY

        known = SAE_TRAINING_CLASS_REGISTRY if training else SAE_CLASS_REGISTRY
        names = sorted(k for k in known if k not in OUR_ARCHITECTURES)
        raise ValueError(
            f"Unknown inner_architecture {architecture!r} for {'training' if training else 'inference'}; "
            f"SAELens knows {names}."
        ) from None


def inner_extra_fields(cfg_cls: type) -> list[str]:
    return [f.name for f in fields(cfg_cls) if f.name not in _BASE_FIELDS]


def inner_base_kwargs(cfg: Any, training: bool) -> dict[str, Any]:
    kw: dict[str, Any] = dict(
        d_in=cfg.d_in, d_sae=cfg.d_sae, dtype=cfg.dtype, device=cfg.device,
        apply_b_dec_to_input=cfg.apply_b_dec_to_input,
        # A global 'expected_average_only_in' factor is estimated and folded by SAETrainer at our level.
        normalize_activations=(
            "none" if cfg.normalize_activations == "expected_average_only_in" else cfg.normalize_activations
        ),
    )
    if training:
        kw["decoder_init_norm"] = cfg.decoder_init_norm
    return kw


def build_inner_cfg(cfg: Any, training: bool) -> Any:
    _, cfg_cls = inner_classes(cfg.inner_architecture, training)
    return cfg_cls(**inner_base_kwargs(cfg, training), **dict(cfg.inner_config))


def complete_inner_config(cfg: Any, training: bool) -> dict[str, Any]:
    """Validate ``cfg.inner_config`` against the inner architecture and fill in its defaults."""
    _, cfg_cls = inner_classes(cfg.inner_architecture, training)
    extra = inner_extra_fields(cfg_cls)
    unknown = sorted(set(cfg.inner_config) - set(extra))
    if unknown:
        raise ValueError(
            f"inner_config keys {unknown} are not fields of {cfg_cls.__name__} "
            f"(architecture {cfg.inner_architecture!r}); valid keys: {extra}. "
            "d_in, d_sae, dtype, device and normalisation are set on the outer config."
        )
    inner = build_inner_cfg(cfg, training)
    return {name: getattr(inner, name) for name in extra}


def inference_inner(cfg: Any) -> tuple[str, dict[str, Any]]:
    """The inference architecture and config a trained inner architecture is saved as
    (e.g. batchtopk -> jumprelu), as SAELens's ``save_inference_model`` does."""
    inner = build_inner_cfg(cfg, training=True)
    inf = inner.get_inference_sae_cfg_dict()
    arch = inf["architecture"]
    _, inf_cfg_cls = inner_classes(arch, training=False)
    return arch, {name: inf[name] for name in inner_extra_fields(inf_cfg_cls) if name in inf}


def timestep_inference_cfg_dict(cfg: Any, base: dict[str, Any]) -> dict[str, Any]:
    arch, inner_config = inference_inner(cfg)
    base["inner_architecture"] = arch
    base["inner_config"] = inner_config
    return base


# ---------------------------------------------------------------------- per-row routing
@dataclass
class RowPlan:
    """For each activation row: its bucket index, or -1 to pass it through unchanged."""

    bucket: torch.Tensor  # long, shape = leading shape of the activation

    @property
    def passthrough(self) -> torch.Tensor:
        return self.bucket < 0


class RowRoutingMixin:
    """Resolves, for an activation ``x`` of shape (..., d_in), which bucket each row belongs to."""

    cfg: Any
    _pending_timesteps: Optional[tuple[torch.Tensor, Optional[torch.Tensor]]]

    def set_row_timesteps(self, timesteps: torch.Tensor, branch: Optional[torch.Tensor] = None) -> None:
        """Labels for the rows of the NEXT training batch (one timestep per row; optional branch codes).

        SAELens's ``SAETrainer`` passes the SAE activations only, so our data providers hand the labels
        over here just before yielding the batch; ``training_forward_pass`` consumes them.
        """
        object.__setattr__(self, "_pending_timesteps", (timesteps, branch))

    def _take_pending(self) -> Optional[tuple[torch.Tensor, Optional[torch.Tensor]]]:
        pending = self.__dict__.get("_pending_timesteps")
        object.__setattr__(self, "_pending_timesteps", None)
        return pending

    @property
    def timestep_buckets(self) -> TimestepBuckets:
        return self.cfg.buckets

    def _is_pooled_over_all(self) -> bool:
        b = self.timestep_buckets
        return len(b) == 1 and b.ranges[0] == (0.0, float(b.num_train_timesteps))

    def plan_rows(self, rows: torch.Size, device: torch.device,
                  labels: Optional[tuple[torch.Tensor, Optional[torch.Tensor]]] = None,
                  out_of_range: Optional[str] = None) -> RowPlan:
        """Bucket of every row (-1: pass through). ``labels`` = (timesteps, branches) given explicitly;
        otherwise they come from core/denoising.py (``timestep_context``, else the running denoiser call)."""
        buckets = self.timestep_buckets
        policy = out_of_range or self.cfg.out_of_range
        t_value = labels[0] if labels is not None else current_timestep()
        if t_value is None:
            if self._is_pooled_over_all():  # one dictionary for every timestep: none needed
                idx = torch.zeros(rows, dtype=torch.long, device=device)
            else:
                hook = self.cfg.metadata.get("hook_name")
                raise RuntimeError(
                    f"{type(self).__name__}{f' at {hook!r}' if hook else ''} needs the current diffusion "
                    "timestep, and none is set. Run it inside HookedDiffusionPipeline (which sets "
                    "sae_lens_multimodal.current_timestep()), or wrap the call in "
                    "`with sae_lens_multimodal.timestep_context(t): ...`."
                )
        else:
            t = broadcast_rows(t_value, rows, device, "timesteps")
            idx = buckets.bucket_of(t)
            outside = idx < 0
            if bool(outside.any()) and policy == "error":
                bad = sorted({float(v) for v in t[outside].flatten()[:8].tolist()})
                raise ValueError(
                    f"Timestep(s) {bad} lie outside every range of this SAE ({buckets.describe()}; "
                    f"num_train_timesteps={buckets.num_train_timesteps}). Use an SAE trained for these "
                    "timesteps, or set cfg.out_of_range='passthrough' to leave such activations unchanged."
                )
        sae_branch = self.cfg.metadata.get("cfg_branch")
        if sae_branch in BRANCH_CODES:
            codes = branch_codes(labels[1], rows, device) if labels is not None else current_branch_codes(rows, device)
            if codes is not None:
                other = (codes >= 0) & (codes != BRANCH_CODES[sae_branch])
                idx = torch.where(other, torch.full_like(idx, -1), idx)
        return RowPlan(idx)

    def _scale_rows(self, x: torch.Tensor, plan: RowPlan, inverse: bool = False) -> torch.Tensor:
        factors = self.cfg.bucket_scaling_factors
        if factors is None:
            return x
        f = torch.tensor([1.0] + list(factors), dtype=x.dtype, device=x.device)[plan.bucket + 1]
        return x / f[..., None] if inverse else x * f[..., None]
