"""Steering: clamp, add, scale or ablate SAE features or raw directions at hook points.

One API for every hooked model of this package (HookedViT, HookedCLIP, HookedVLM, HookedUNet, HookedDiT,
HookedDiffusionPipeline). A steer says *what* to edit (:class:`FeatureSteer`: SAE latents;
:class:`DirectionSteer`: a direction in the hook's activation space), *how* (``mode``), *where* (hook,
token / spatial positions) and, for diffusion models, *when* (timesteps, CFG branch). Apply steers with

* ``model.run_with_hooks(x, fwd_hooks=steering_hooks(model, [s1, s2]))`` (also inside ``model.saes(...)``
  and with ``run_with_hooks_with_saes``), or
* ``with steer(model, s1, s2): model(x)`` (also around or inside ``run_with_saes`` / ``model.saes``).

SAE features keep the SAE error term: the steered activation is ``x + decode(f') - decode(f)`` where ``f``
is the SAE's encoding of ``x`` and ``f'`` the edited encoding, so only the decoder change of the edited
features is added and an edit that changes nothing leaves ``x`` bit-for-bit unchanged. When the same SAE
is spliced into the model (``run_with_saes`` / ``model.saes``), the edit is made on its feature
activations (``hook_sae_acts_post``) instead and the splice's own ``use_error_term`` decides whether the
error term is kept (SAELens semantics).

>>> from sae_lens import SAE
>>> from sae_lens_multimodal import HookedCLIP
>>> from sae_lens_multimodal.steering import FeatureSteer, steer
>>> model = HookedCLIP.from_pretrained("shapes-clip")
>>> sae = SAE.from_pretrained("shapes-clip-saes", "blocks.2.hook_resid_post")
>>> with steer(model, FeatureSteer(sae, 17, "clamp", value=8.0, positions="patches")):
...     emb = model.encode_image(images)
"""


from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Optional

import torch

from sae_lens_multimodal.core.positions import Positions, token_mask
from sae_lens_multimodal.steering.hooks import _bind, _Steerer, steering_hooks
from sae_lens_multimodal.steering.specs import MODES, DirectionSteer, FeatureSteer, Steer
from sae_lens_multimodal.steering.targets import _module_at, _spliced_sae

__all__ = ["MODES", "FeatureSteer", "DirectionSteer", "Steer", "steering_hooks", "steer", "token_mask", "Positions"]


@contextmanager
def steer(model: Any, *steers: Steer) -> Iterator[Any]:
    """Apply ``steers`` to every forward pass of ``model`` inside the block; removed on exit, also on errors.

    Works around or inside ``model.run_with_saes`` / ``model.saes(...)``: a steer on the latents of an SAE
    that gets spliced while the block runs edits those latents in the splice.

    >>> with steer(model, FeatureSteer(sae, 5, "clamp", 6.0), DirectionSteer(hook, v, "add", 2.0)):
    ...     logits = model(images, texts)
    """
    if len(steers) == 1 and isinstance(steers[0], (list, tuple)):
        steers = tuple(steers[0])
    bound = _bind(model, steers)
    handles = []
    try:
        for s in bound:
            if s.sae is None:
                continue
            point = s.sae.hook_sae_acts_post

            def on_splice(module: Any, inputs: Any, output: Any, s: _Steerer = s) -> Optional[torch.Tensor]:
                # Fires only while the SAE is spliced into this model after the hooks below were added
                # (a splice present at entry is steered through the TransformerLens hook instead).
                if s.via_splice_hook and any(_spliced_sae(w) is s.sae for w in getattr(model, "_acts_to_saes", {}).values()):
                    s.splice_fired = True
                    return s.hook(output, hook=module)
                return None

            handles.append(point.register_forward_hook(on_splice))
        hooks = []
        for s in bound:
            target = s.target()
            # A steer on a spliced SAE's latents at entry goes through the TransformerLens hook on them;
            # otherwise the hook point gets the hook and the splice hook covers a later splice.
            s.via_splice_hook = not target.endswith(".hook_sae_acts_post")
            hooks.append((target, s.hook))
        entry = [_module_at(model, s.location) if s.via_splice_hook else None for s in bound]
        with model.hooks(fwd_hooks=hooks):
            yield model
        for s, point in zip(bound, entry):
            # Splicing an SAE replaces the hook point, so a steer registered on it before the splice did
            # not run while that SAE was in place (unless it steers this SAE's own latents).
            if point is not None and _module_at(model, s.location) is not point and not s.splice_fired:
                warnings.warn(
                    f"The steer at {s.location!r} was bypassed while an SAE was spliced there inside the steer() "
                    "block (splicing replaces the hook point). Enter steer() inside run_with_saes / model.saes(...), "
                    "or pass steering_hooks(...) to run_with_hooks_with_saes.",
                    RuntimeWarning,
                    stacklevel=3,
                )
    finally:
        for h in handles:
            h.remove()
