"""HookedCLIP: both towers of a CLIP / SigLIP model with TransformerLens hook points.

``model.vision`` is a :class:`HookedViT` and ``model.text`` a :class:`HookedText`; both are submodules, so
their hook names inside HookedCLIP carry the tower as a prefix (``vision.blocks.9.hook_resid_post``,
``text.blocks.3.hook_resid_post``). An SAE whose ``hook_name`` is a bare tower name (recorded on a
standalone HookedViT, e.g. ``blocks.9.hook_resid_post``) is spliced into the vision tower unchanged; see
:meth:`HookedCLIP.sae_hook_location` for the full rule (docs/clip.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from transformer_lens.ActivationCache import ActivationCache

from sae_lens_multimodal.core.contract import HookSpec, nest_specs
from sae_lens_multimodal.core.hooked_root import MultimodalHookedRootModule
from sae_lens_multimodal.core.nested import NestedSAEHostMixin
from sae_lens_multimodal.core.sae_metadata import record_model_names
from sae_lens_multimodal.models.conversions import UnsupportedModelError, _hub_json
from sae_lens_multimodal.models.conversions._hf_common import load_checkpoint
from sae_lens_multimodal.models.conversions.hf_clip_text import load_hf_tokenizer
from sae_lens_multimodal.models.conversions.open_clip_vit import load_open_clip
from sae_lens_multimodal.models.hooked_text import HookedText, TextInput
from sae_lens_multimodal.models.hooked_vit import HookedViT, ImageInput, ViTActivationCache
from sae_lens_multimodal.models.registry import model_name_aliases, resolve_model_name

__all__ = ["HookedCLIP", "HookedCLIPConfig", "CLIPActivationCache", "TOWERS"]

TOWERS = ("vision", "text")
Scoring = Literal["softmax", "sigmoid"]


@dataclass
class HookedCLIPConfig:
    """What HookedCLIP adds on top of its two towers' own configs (``model.vision.cfg``, ``model.text.cfg``).

    ``scoring`` is how logits become probabilities: ``"softmax"`` over texts (CLIP) or an independent
    ``"sigmoid"`` per image-text pair (SigLIP, whose logits include ``logit_bias``).
    """

    d_embed: int
    scoring: Scoring = "softmax"
    model_name: str = "custom"
    original_architecture: str = "custom"
    device: str = "cpu"
    dtype: torch.dtype = torch.float32


class CLIPActivationCache(ActivationCache):
    """A TransformerLens ActivationCache over both towers, keyed by full names (``vision.blocks.0...``).

    ``cache.vision`` / ``cache.text`` are the per-tower caches with bare names, on which TransformerLens
    helpers that need ``model.cfg`` (``accumulated_resid``, ``decompose_resid``, ``apply_ln_to_stack``...)
    work as on a standalone HookedViT / HookedText cache.
    """

    def _tower(self, tower: str) -> ActivationCache:
        prefix = tower + "."
        sub = {k[len(prefix):]: v for k, v in self.cache_dict.items() if k.startswith(prefix)}
        model = getattr(self.model, tower)
        cls = ViTActivationCache if tower == "vision" else ActivationCache
        return cls(sub, model, has_batch_dim=self.has_batch_dim)

    @property
    def vision(self) -> ActivationCache:
        return self._tower("vision")

    @property
    def text(self) -> ActivationCache:
        return self._tower("text")


class HookedCLIP(NestedSAEHostMixin, MultimodalHookedRootModule):
    """A CLIP-style dual encoder with every activation of both towers hookable.

    Build it with :meth:`from_pretrained` (open_clip CLIP incl. QuickGELU variants, transformers CLIPModel
    and SiglipModel; by object or name), or from two hooked towers. ``logit_scale`` (and ``logit_bias``)
    are stored as the sources store them: the scale as its logarithm, applied as ``logit_scale.exp()``.
    """

    #: Parts where a bare hook name (as recorded on a standalone sub-model) may live, preferred first.
    BARE_NAME_PARTS = TOWERS
    PART_PREFIXES = {"vision": "vision", "text": "text"}

    activation_cache_class = CLIPActivationCache

    def __init__(
        self,
        vision: HookedViT,
        text: HookedText,
        logit_scale: Union[float, torch.Tensor] = 0.0,
        logit_bias: Optional[Union[float, torch.Tensor]] = None,
        scoring: Optional[Scoring] = None,
        model_name: str = "custom",
        original_architecture: str = "custom",
    ):
        super().__init__()
        if vision.cfg.output_dim != text.cfg.output_dim:
            raise ValueError(
                f"The towers' embeddings differ in width (vision {vision.cfg.output_dim}, text "
                f"{text.cfg.output_dim}); a CLIP model needs both projected into one joint space."
            )
        self.vision = vision
        self.text = text
        dtype = vision.cfg.dtype
        self.logit_scale = nn.Parameter(torch.as_tensor(logit_scale, dtype=dtype).reshape(()).clone())
        if logit_bias is not None:
            self.logit_bias = nn.Parameter(torch.as_tensor(logit_bias, dtype=dtype).reshape(()).clone())
        else:
            self.register_parameter("logit_bias", None)
        self.cfg = HookedCLIPConfig(
            d_embed=vision.cfg.output_dim,
            scoring=scoring or ("sigmoid" if logit_bias is not None else "softmax"),
            model_name=model_name,
            original_architecture=original_architecture,
            device=vision.cfg.device,
            dtype=dtype,
        )
        # SAE hook name (the key SAELens's splicing uses) -> (input location, output location) in this model.
        self._sae_locations: dict[str, tuple[str, str]] = {}
        self.setup()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls,
        model: Union[str, nn.Module],
        *,
        tokenizer: Any = None,
        device: Optional[Union[str, torch.device]] = None,
        dtype: Optional[torch.dtype] = None,
        **source_kwargs: Any,
    ) -> "HookedCLIP":
        """Convert a CLIP / SigLIP model exactly.

        ``model`` is an open_clip ``CLIP`` / ``CustomTextCLIP``, a transformers ``CLIPModel`` or
        ``SiglipModel``, or a name: ``"open-clip:ViT-B-32/laion2b_s34b_b79k"``, ``"open-clip:hf-hub:org/repo"``,
        a Hugging Face repo id or local directory of a transformers CLIP / SigLIP model, or a name from this
        package's model registry (e.g. ``"shapes-clip"``). ``tokenizer`` overrides the tokenizer found for
        the source (open_clip's works offline; a transformers tokenizer is loaded from the model's directory
        or hub cache when present). ``source_kwargs`` go to the source library's loader.
        """
        found_tokenizer, names = None, ()
        if isinstance(model, (str, Path)):
            names = model_name_aliases(str(model))  # what an SAE's recorded model_name is checked against
            model, found_tokenizer = load_clip_source(str(model), **source_kwargs)
        elif source_kwargs:
            raise TypeError(
                f"Keyword arguments {sorted(source_kwargs)} only apply when loading by name; got a built model."
            )
        if isinstance(model, HookedCLIP):
            return model
        scale, bias = _logit_scale_and_bias(model)
        vision = HookedViT.from_pretrained(model, device=device, dtype=dtype)
        text = HookedText.from_pretrained(model, device=device, dtype=dtype)
        if tokenizer is not None or found_tokenizer is not None:
            text.tokenizer = tokenizer if tokenizer is not None else found_tokenizer
        hooked = cls(
            vision, text, logit_scale=scale, logit_bias=bias,
            model_name=vision.cfg.model_name if vision.cfg.model_name != "custom" else text.cfg.model_name,
            original_architecture=f"{type(model).__module__.split('.')[0]}.{type(model).__name__}",
        )
        if device is not None:
            hooked.to(device)
        for part in (hooked, vision, text):
            record_model_names(part, names)
        return hooked.eval()

    # ------------------------------------------------------------------ encoding
    @property
    def preprocess(self) -> Any:
        """The source model's image preprocessing (one PIL image -> (C, H, W) tensor)."""
        return self.vision.preprocess

    def encode_image(self, images: ImageInput, normalize: bool = False) -> torch.Tensor:
        """Image embeddings [batch, d_embed] in the joint space (the vision tower's ``hook_out``)."""
        out = self.vision(images)
        assert out is not None
        return F.normalize(out, dim=-1) if normalize else out

    def encode_text(
        self, texts: TextInput, normalize: bool = False, attention_mask: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Text embeddings [batch, d_embed] from strings (source tokenizer) or token ids."""
        out = self.text(texts, attention_mask=attention_mask)
        assert out is not None
        return F.normalize(out, dim=-1) if normalize else out

    def logits_from_embeddings(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """logits [n_images, n_texts] = exp(logit_scale) * cos(image, text) (+ logit_bias), as the source."""
        img = F.normalize(image_embeds, dim=-1)
        txt = F.normalize(text_embeds, dim=-1)
        logits = self.logit_scale.exp() * img @ txt.T
        if self.logit_bias is not None:
            logits = logits + self.logit_bias
        return logits

    def forward(
        self,
        images: Optional[ImageInput] = None,
        texts: Optional[TextInput] = None,
        attention_mask: Optional[torch.Tensor] = None,
        return_type: Optional[Literal["logits", "embeddings"]] = "logits",
    ) -> Any:
        """Image-text logits [n_images, n_texts] with the model's logit scale (and bias for SigLIP).

        ``return_type="embeddings"`` returns ``(image_embeds, text_embeds)`` (unnormalised; either is None
        when its input is not given); ``None`` runs the towers for their hooks only.
        """
        if images is None and texts is None:
            raise ValueError("Pass images, texts, or both.")
        if return_type == "logits" and (images is None or texts is None):
            raise ValueError(
                "Logits need both images and texts. For one modality use encode_image / encode_text, or "
                "return_type='embeddings'."
            )
        img = self.encode_image(images) if images is not None else None
        txt = self.encode_text(texts, attention_mask=attention_mask) if texts is not None else None
        if return_type == "logits":
            return self.logits_from_embeddings(img, txt)  # type: ignore[arg-type]
        if return_type == "embeddings":
            return img, txt
        return None

    def logits_to_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Probabilities as the model scores: softmax over texts (CLIP) or a sigmoid per pair (SigLIP)."""
        return torch.sigmoid(logits) if self.cfg.scoring == "sigmoid" else logits.softmax(dim=-1)

    # ------------------------------------------------------------------ hook names
    def setup(self) -> None:
        # The towers' own dictionaries stay valid too (SAE splicing replaces HookPoints inside them).
        for tower in TOWERS:
            if tower in self._modules:
                self._modules[tower].setup()  # type: ignore[operator]
        super().setup()

    def _build_hook_specs(self) -> dict[str, HookSpec]:
        # Each tower describes its own hooks; here they carry the tower's prefix.
        return {**nest_specs(self.vision.hook_specs().values(), "vision"),
                **nest_specs(self.text.hook_specs().values(), "text")}

    # ------------------------------------------------------------------ SAE splicing (core/nested.py)
    def _part_named_by_metadata(self, metadata: Any) -> Optional[str]:
        # An SAE recorded on a standalone tower names that tower's class.
        return {"HookedText": "text", "HookedViT": "vision"}.get(metadata.get("model_class_name"))

    def _apply(self, fn, *args, **kwargs):  # keep cfg.device/dtype in step with .to()/.half()
        out = super()._apply(fn, *args, **kwargs)
        self.cfg.device, self.cfg.dtype = str(self.logit_scale.device), self.logit_scale.dtype
        return out


# ---------------------------------------------------------------------------------------------- sources
def _logit_scale_and_bias(model: Any) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    scale = getattr(model, "logit_scale", None)
    if scale is None:
        raise TypeError(
            f"{type(model).__name__} has no logit_scale: HookedCLIP.from_pretrained needs a whole CLIP / SigLIP "
            "model (both towers and the logit scale), not a single tower."
        )
    bias = getattr(model, "logit_bias", None)
    return scale.detach().reshape(()).clone(), (bias.detach().reshape(()).clone() if bias is not None else None)


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def load_clip_source(name: str, **kwargs: Any) -> tuple[Any, Any]:
    """The source-library CLIP model and tokenizer (or None) a name refers to."""
    name = resolve_model_name(name)  # a registered short name ("shapes-clip") -> its source name
    if name.startswith("open-clip:"):
        import open_clip  # open_clip: optional heavy import, only for open_clip names

        rest = name[len("open-clip:"):]
        model = load_open_clip(rest, **kwargs)
        arch = rest if rest.startswith(("hf-hub:", "local-dir:")) else rest.partition("/")[0]
        try:
            tokenizer = open_clip.get_tokenizer(arch)
        except Exception:  # hub tokenizer files not cached offline
            tokenizer = None
        return model, tokenizer
    path = Path(name).expanduser()
    if path.is_dir():
        config = _read_json(path / "config.json")
        if config is None and (path / "open_clip_config.json").exists():
            return load_clip_source(f"open-clip:local-dir:{path}", **kwargs)
    elif "/" in name and not name.startswith(("/", ".")):
        config = _hub_json(name, "config.json")
        if config is None and _hub_json(name, "open_clip_config.json") is not None:
            return load_clip_source(f"open-clip:hf-hub:{name}", **kwargs)
    else:
        config = None
    model_type = (config or {}).get("model_type")
    if model_type in ("clip", "siglip"):
        import transformers  # transformers: optional heavy import, only for transformers checkpoints

        cls = transformers.CLIPModel if model_type == "clip" else transformers.SiglipModel
        model, _ = load_checkpoint(cls, name, **kwargs)  # refuses missing / damaged weights, naming the files
        return model, load_hf_tokenizer(name, model.config.text_config.vocab_size)
    raise UnsupportedModelError(
        f"Cannot load {name!r} as a CLIP model. Name forms: 'open-clip:<model>/<tag>', "
        "'open-clip:hf-hub:<org>/<repo>', a Hugging Face repo id or local directory of a transformers CLIP "
        f"or SigLIP model{' (found model_type ' + repr(model_type) + ')' if model_type else ''}, or a "
        "registered model name."
    )
