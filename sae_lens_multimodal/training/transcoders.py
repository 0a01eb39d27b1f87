"""MLP transcoders (Dunefsky et al. 2024; Anthropic's attribution graphs) trained through our training path.

A transcoder reads an MLP's input and predicts its output through a sparse dictionary:
``y_hat = relu(x W_enc + b_enc) W_dec + b_dec`` (plus ``x W_skip^T`` for a skip transcoder). The weights are
SAELens's own inference classes (``sae_lens.Transcoder`` / ``SkipTranscoder``), so a saved transcoder loads
with ``SAE.load_from_disk`` / ``Transcoder.load_from_disk`` and splices with ``model.add_sae(tc,
use_error_term=True)`` (SAELens's transcoder splice: input at ``cfg.metadata.hook_name``, output at
``cfg.metadata.hook_name_out``).

Training goes through :func:`~sae_lens_multimodal.training.train.train_sae`, i.e. SAELens's ``SAETrainer``:
the rows the trainer sees are ``[mlp input | mlp output]`` pairs (from one ``ImageActivationStore`` over the
two hooks, so they stay aligned), and :class:`TranscoderTrainingSAE` -- a SAELens ``TrainingSAE`` -- splits
them, reconstructs the output from the input and adds an L1 penalty weighted by the decoder norms (SAELens's
"standard" sparsity loss). SAELens ships no transcoder training class and its inference transcoders use a
ReLU (or JumpReLU), so ReLU + L1 is the architecture whose trained weights the inference classes run exactly.

>>> tc = train_transcoder(vit, images, layer=1, d_sae=512, l1_coefficient=3.0)
>>> tc.save_model("tc/blocks.1")       # SAELens on-disk format (cfg.json + sae_weights.safetensors)
>>> vit.add_sae(tc, use_error_term=True)  # the model's output is unchanged
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch
from sae_lens import SkipTranscoder, Transcoder
from sae_lens.saes.sae import SAEMetadata, TrainingSAE, TrainingSAEConfig, TrainStepInput, TrainStepOutput
from sae_lens.saes.transcoder import SkipTranscoderConfig, TranscoderConfig
from torch import nn

from sae_lens_multimodal.analysis.transcoder_sites import is_transcoder, reconstruct

__all__ = [
    "SkipTranscoderTrainingConfig",
    "TranscoderTrainingConfig",
    "TranscoderTrainingSAE",
    "evaluate_transcoder",
    "is_transcoder",
    "mlp_hooks",
    "mlp_pairs",
    "to_inference_transcoder",
    "train_transcoder",
]


@dataclass(kw_only=True)
class TranscoderTrainingConfig(TrainingSAEConfig):
    """Training config of a ReLU transcoder (inference class: SAELens's ``Transcoder``)."""

    d_out: int
    l1_coefficient: float = 1.0
    l1_warm_up_steps: int = 0
    apply_b_dec_to_input: bool = False  # b_dec lives in the output space

    @classmethod
    def architecture(cls) -> str:
        return "transcoder"

    def get_inference_config_class(self) -> type:
        return TranscoderConfig


@dataclass(kw_only=True)
class SkipTranscoderTrainingConfig(TranscoderTrainingConfig):
    """Training config of a ReLU transcoder with a linear skip path (inference class: ``SkipTranscoder``)."""

    @classmethod
    def architecture(cls) -> str:
        return "skip_transcoder"

    def get_inference_config_class(self) -> type:
        return SkipTranscoderConfig


class TranscoderTrainingSAE(TrainingSAE[TranscoderTrainingConfig]):
    """A SAELens ``TrainingSAE`` that learns to predict ``y`` (width ``d_out``) from ``x`` (width ``d_in``).

    SAELens's ``SAETrainer`` hands it rows ``[x | y]`` (width ``d_in + d_out``); everything else (optimiser,
    schedules, dead-latent tracking) is the trainer's. ``encode`` / ``decode`` take ``x`` and give ``y_hat``
    as the inference transcoder's do.
    """

    W_skip: Optional[nn.Parameter]

    def __init__(self, cfg: TranscoderTrainingConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)
        self.W_skip = (nn.Parameter(torch.zeros(cfg.d_out, cfg.d_in, dtype=self.dtype, device=self.device))
                       if isinstance(cfg, SkipTranscoderTrainingConfig) else None)

    def initialize_weights(self) -> None:
        # Not TrainingSAE's: it ties W_enc = W_dec.T, which needs d_in == d_out.
        g_dec = torch.randn(self.cfg.d_sae, self.cfg.d_out, dtype=self.dtype, device=self.device)
        g_dec *= (self.cfg.decoder_init_norm or 0.1) / g_dec.norm(dim=-1, keepdim=True)
        g_enc = torch.randn(self.cfg.d_in, self.cfg.d_sae, dtype=self.dtype, device=self.device)
        g_enc /= g_enc.norm(dim=0, keepdim=True)
        self.W_dec = nn.Parameter(g_dec)
        self.W_enc = nn.Parameter(g_enc)
        self.b_enc = nn.Parameter(torch.zeros(self.cfg.d_sae, dtype=self.dtype, device=self.device))
        self.b_dec = nn.Parameter(torch.zeros(self.cfg.d_out, dtype=self.dtype, device=self.device))

    def process_sae_in(self, sae_in: torch.Tensor) -> torch.Tensor:
        # SAE.process_sae_in subtracts b_dec (width d_out) from the input; a transcoder's input is never centred by it
        return self.run_time_activation_norm_fn_in(self.hook_sae_input(sae_in.to(self.dtype)))

    def get_coefficients(self) -> dict[str, Any]:
        from sae_lens.saes.sae import TrainCoefficientConfig

        return {"l1": TrainCoefficientConfig(value=self.cfg.l1_coefficient, warm_up_steps=self.cfg.l1_warm_up_steps)}

    def encode_with_hidden_pre(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden_pre = self.hook_sae_acts_pre(self.process_sae_in(x) @ self.W_enc + self.b_enc)
        return self.hook_sae_acts_post(self.activation_fn(hidden_pre)), hidden_pre

    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        return self.hook_sae_recons(feature_acts @ self.W_dec + self.b_dec)

    def predict(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(y_hat, feature activations)`` for MLP inputs ``x`` (the skip path included)."""
        f, _ = self.encode_with_hidden_pre(x)
        y = self.decode(f)
        if self.W_skip is not None:
            y = y + x.to(self.dtype) @ self.W_skip.T
        return y, f

    def calculate_aux_loss(self, step_input: TrainStepInput, feature_acts: torch.Tensor, hidden_pre: torch.Tensor,
                           sae_out: torch.Tensor) -> dict[str, torch.Tensor]:
        sparsity = (feature_acts * self.W_dec.norm(dim=1)).sum(-1)
        return {"l1_loss": (step_input.coefficients["l1"] * sparsity).mean()}

    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        rows = step_input.sae_in
        if rows.shape[-1] != self.cfg.d_in + self.cfg.d_out:
            raise ValueError(f"A transcoder trains on rows [mlp input | mlp output] of width d_in + d_out = "
                             f"{self.cfg.d_in + self.cfg.d_out}; got width {rows.shape[-1]}. Build them with mlp_pairs.")
        x, y = rows[..., : self.cfg.d_in], rows[..., self.cfg.d_in:]
        f, hidden_pre = self.encode_with_hidden_pre(x)
        y_hat = self.decode(f)
        if self.W_skip is not None:
            y_hat = y_hat + x @ self.W_skip.T
        mse = self.mse_loss_fn(y_hat, y.to(y_hat.dtype)).sum(-1).mean()
        aux = self.calculate_aux_loss(step_input, f, hidden_pre, y_hat)
        return TrainStepOutput(sae_in=y, sae_out=y_hat, feature_acts=f, hidden_pre=hidden_pre,
                               loss=mse + sum(aux.values()), losses={"mse_loss": mse, **aux})

    def process_state_dict_for_saving_inference(self, state_dict: dict[str, Any]) -> None:
        if self.W_skip is None:
            state_dict.pop("W_skip", None)


def to_inference_transcoder(sae: TranscoderTrainingSAE) -> Transcoder:
    """The SAELens inference ``Transcoder`` / ``SkipTranscoder`` with the same weights and metadata."""
    cls = SkipTranscoder if sae.W_skip is not None else Transcoder
    cfg_cls = SkipTranscoderConfig if sae.W_skip is not None else TranscoderConfig
    cfg = cfg_cls.from_dict(sae.cfg.get_inference_sae_cfg_dict())
    tc = cls(cfg)
    state = {k: v.detach().clone() for k, v in sae.state_dict().items()}
    sae.process_state_dict_for_saving_inference(state)
    tc.load_state_dict(state)
    return tc.eval()


# ----------------------------------------------------------------------------------------- data
def mlp_hooks(model: Any, layer: int, part: Optional[str] = None) -> tuple[str, str]:
    """(MLP input hook, MLP output hook) of block ``layer``, found through the model contract: the block's
    ``ln2.hook_normalized`` (what the MLP reads) and ``hook_mlp_out`` (what it writes into the residual)."""
    found: dict[str, str] = {}
    for name, spec in model.hook_specs().items():
        if spec.layer != layer or (part is not None and spec.part != part) or spec.local_name is None:
            continue
        for key, suffix in (("in", "ln2.hook_normalized"), ("out", "hook_mlp_out")):
            if spec.local_name == f"blocks.{layer}.{suffix}":
                if key in found and found[key] != name:
                    raise ValueError(f"Block {layer} has MLP hooks in several parts ({found[key]!r}, {name!r}); "
                                     "pass part='vision' or 'text'.")
                found[key] = name
    if set(found) != {"in", "out"}:
        raise ValueError(f"{type(model).__name__} has no pre-norm MLP at block {layer} (no blocks.{layer}."
                         "ln2.hook_normalized / hook_mlp_out hooks); see model.hook_specs().")
    return found["in"], found["out"]


def mlp_pairs(model: Any, images: Any, layers: Union[int, Sequence[int]], *, token_policy: str = "all",
              batch_size: int = 128, model_name: Optional[str] = None,
              progress: bool = False) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """layer -> (MLP inputs [rows, d_model], MLP outputs [rows, d_model]) of the vision tower on ``images``
    (one ``ImageActivationStore`` pass over every asked layer's two hooks, rows aligned)."""
    from sae_lens_multimodal.training.image_store import ImageActivationStore

    layers = [layers] if isinstance(layers, int) else list(layers)
    names = {layer: mlp_hooks(model, layer, part="vision") for layer in layers}
    store = ImageActivationStore(model, [h for pair in names.values() for h in pair], images,
                                 token_policy=token_policy, batch_size=batch_size, model_name=model_name,
                                 progress=progress)  # type: ignore[arg-type]
    parts: dict[str, list[torch.Tensor]] = {h: [] for pair in names.values() for h in pair}
    for _, _, chunks in store.iter_chunks():
        for h in parts:
            parts[h].append(chunks[h].acts)
    return {layer: (torch.cat(parts[i]), torch.cat(parts[o])) for layer, (i, o) in names.items()}


@torch.no_grad()
def evaluate_transcoder(tc: Any, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 8192) -> dict[str, float]:
    """Fraction of the MLP output's variance explained (``1 - sum|y - y_hat|^2 / sum|y - mean y|^2``), MSE per
    row, mean L0 and dead latents (never active on these rows) of a transcoder on pairs ``(x, y)``."""
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(f"Give as many MLP inputs as outputs (and at least one); got {x.shape[0]} and {y.shape[0]}.")
    was_training = tc.training
    tc.eval()
    sq_err, l0, fired = 0.0, 0.0, torch.zeros(tc.cfg.d_sae, dtype=torch.bool)
    try:
        for s in range(0, x.shape[0], batch_size):
            xb, yb = x[s:s + batch_size].to(tc.dtype), y[s:s + batch_size].to(tc.dtype)
            f = tc.encode(xb)
            y_hat = reconstruct(tc, xb, f)
            sq_err += float((y_hat - yb).double().pow(2).sum())
            active = f > 0
            l0 += float(active.sum())
            fired |= active.any(0).cpu()
    finally:
        tc.train(was_training)
    total = float((y.double() - y.double().mean(0)).pow(2).sum())
    n = x.shape[0]
    return {"explained_variance": 1.0 - sq_err / total if total > 0 else float("nan"), "mse": sq_err / n,
            "l0": l0 / n, "dead_latents": int((~fired).sum()), "dead_fraction": float((~fired).float().mean()),
            "n_rows": n}


# ----------------------------------------------------------------------------------------- training
def train_transcoder(
    model: Any,
    images: Any = None,
    *,
    layer: int,
    d_sae: int = 512,
    l1_coefficient: float = 1.0,
    l1_warm_up_steps: Optional[int] = None,
    skip: bool = False,
    pairs: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    total_training_samples: int = 1_000_000,
    batch_size: int = 1024,
    lr: float = 1e-3,
    lr_end: Optional[float] = None,
    lr_warm_up_steps: int = 50,
    token_policy: str = "all",
    model_name: Optional[str] = None,
    seed: int = 0,
    progress: bool = False,
    **train_kwargs: Any,
) -> Transcoder:
    """Train a transcoder for the MLP of block ``layer`` of ``model``'s vision tower and return SAELens's
    inference ``Transcoder`` (``SkipTranscoder`` with ``skip=True``), metadata ``hook_name`` = the MLP's input
    hook, ``hook_name_out`` = its output hook.

    The data is ``images`` (anything :class:`~sae_lens_multimodal.training.image_store.ImageActivationStore`
    reads), or precomputed ``pairs`` ``(mlp inputs, mlp outputs)`` from :func:`mlp_pairs`. Training runs through
    :func:`~sae_lens_multimodal.training.train.train_sae` (SAELens's ``SAETrainer``) with an Adam ``lr``
    decaying to ``lr_end`` over the last third; ``l1_coefficient`` weighs the decoder-norm-weighted L1
    penalty (warmed up over ``l1_warm_up_steps``, default a tenth of the steps). Extra ``train_kwargs`` go to
    ``train_sae``.
    """
    from sae_lens_multimodal.training.train import train_sae

    in_hook, out_hook = mlp_hooks(model, layer, part="vision")
    if pairs is None:
        if images is None:
            raise ValueError("Give images (to run the model on) or pairs=(mlp inputs, mlp outputs).")
        pairs = mlp_pairs(model, images, layer, token_policy=token_policy, model_name=model_name)[layer]
    x, y = pairs
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"pairs must be two (rows, width) tensors with the same rows; got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}.")
    widths = (model.hook_spec(in_hook).width, model.hook_spec(out_hook).width)
    if (x.shape[1], y.shape[1]) != widths:
        raise ValueError(f"pairs have widths {(x.shape[1], y.shape[1])} but block {layer}'s MLP reads and writes "
                         f"{widths}; compute them with mlp_pairs(model, images, {layer}).")
    if d_sae < 1 or not l1_coefficient >= 0:
        raise ValueError(f"d_sae must be >= 1 and l1_coefficient >= 0; got {d_sae}, {l1_coefficient}.")
    steps = max(1, total_training_samples // batch_size)
    torch.manual_seed(seed)
    cfg_cls = SkipTranscoderTrainingConfig if skip else TranscoderTrainingConfig
    meta = SAEMetadata(hook_name=in_hook, model_name=model_name)
    meta.hook_name_out = out_hook
    sae = TranscoderTrainingSAE(cfg_cls(
        d_in=x.shape[1], d_out=y.shape[1], d_sae=d_sae, l1_coefficient=l1_coefficient,
        l1_warm_up_steps=steps // 10 if l1_warm_up_steps is None else l1_warm_up_steps,
        dtype="float32", device="cpu", metadata=meta,
    ))
    with torch.no_grad():
        sae.b_dec.copy_(y.float().mean(0))  # start from the mean output: the L1 then only pays for variation
        sae.W_enc.mul_(1.0 / math.sqrt(float(x.float().pow(2).sum(-1).mean()) + 1e-8))
    rows = torch.cat([x.float(), y.float()], dim=-1)
    train_sae(sae, rows, total_training_samples=total_training_samples, batch_size=batch_size, lr=lr,
              lr_end=lr / 10 if lr_end is None else lr_end, lr_warm_up_steps=lr_warm_up_steps,
              lr_decay_steps=max(1, steps // 3), seed=seed, progress=progress, **train_kwargs)
    return to_inference_transcoder(sae)
