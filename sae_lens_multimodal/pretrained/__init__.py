"""Public vision and diffusion SAE releases, loadable with ``sae_lens.SAE.from_pretrained(release, sae_id)``.

``register_releases()`` (run when ``sae_lens_multimodal`` is imported; idempotent, offline) adds the releases
of ``releases.yaml`` to SAELens's pretrained directory and one loader per source format to
``NAMED_PRETRAINED_SAE_LOADERS``. Each converted SAE's ``cfg.metadata`` carries the hook name in our
namespace and how the SAE was trained (token policy, input kind, CFG branch, normalisation, source format).
See docs/releases.md for the table of releases and the source formats.

Layout: releases.py (the release table parsed from releases.yaml), registry.py (registration with SAELens
and the lookup the loaders use), listing.py (``list_releases``), _formats.py (source format -> loader),
one converter module per source format (prisma, saev, sdxl_unbox, sparsify, bundled), local.py (an SAE
directory on disk, ``--sae-path``).
"""

# The converter modules register their SAELens loaders (pretrained/_formats.py) when imported.
from sae_lens_multimodal.pretrained import bundled, prisma, saev, sdxl_unbox, sparsify  # noqa: F401
from sae_lens_multimodal.pretrained._common import ReleaseFormatError
from sae_lens_multimodal.pretrained._hub import MissingReleaseFileError, UnsafePickleError
from sae_lens_multimodal.pretrained.listing import ReleaseTable, list_releases
from sae_lens_multimodal.pretrained.local import load_sae_dir
from sae_lens_multimodal.pretrained.registry import (
    expand_manifest_release,
    get_release,
    register_release,
    register_releases,
    registered_releases,
    unregister_release,
)
from sae_lens_multimodal.pretrained.releases import Release, ReleaseSae
from sae_lens_multimodal.pretrained.saev import fold_saev_normalization
from sae_lens_multimodal.pretrained.sdxl_unbox import load_latent_stats

__all__ = [
    "MissingReleaseFileError",
    "Release",
    "ReleaseFormatError",
    "ReleaseSae",
    "ReleaseTable",
    "UnsafePickleError",
    "expand_manifest_release",
    "fold_saev_normalization",
    "get_release",
    "list_releases",
    "load_latent_stats",
    "load_sae_dir",
    "register_release",
    "register_releases",
    "registered_releases",
    "unregister_release",
]
