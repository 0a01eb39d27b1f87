"""compat.py: every patch of SAELens / TransformerLens internals, applied once, with clear version errors."""

from __future__ import annotations

import re
import sys

import pytest
import sae_lens.load_model as lm
from sae_lens.analysis import hooked_sae_transformer as hst
from sae_lens.loading import pretrained_saes_directory as psd

from sae_lens_multimodal import compat
from sae_lens_multimodal.core.hooked_root import MultimodalHookedRootModule


@pytest.fixture
def fresh_checks():
    """Clear compat's cached checks before and after, so a simulated version is checked anew."""
    compat.sae_splicing_methods.cache_clear()
    compat.check_version_ranges.cache_clear()
    yield
    compat.sae_splicing_methods.cache_clear()
    compat.check_version_ranges.cache_clear()


def test_installed_versions_are_the_tested_ones():
    versions = compat.installed_versions()
    assert versions["sae-lens"].startswith(compat.TESTED_VERSIONS["sae-lens"] + ".")
    assert versions["transformer-lens"].startswith(compat.TESTED_VERSIONS["transformer-lens"] + ".")


def test_hooked_models_borrow_the_checked_splicing_methods(fresh_checks):
    methods = compat.sae_splicing_methods()
    assert set(methods) == set(compat.SPLICING_METHODS)
    for name, member in methods.items():
        assert hst.HookedSAETransformer.__dict__[name] is member
        if name != "add_sae":  # add_sae is wrapped (width check first), the rest are used unchanged
            assert MultimodalHookedRootModule.__dict__[name] is member


def test_missing_splicing_method_names_version_and_feature(fresh_checks, monkeypatch):
    monkeypatch.delattr(hst.HookedSAETransformer, "run_with_saes")
    with pytest.raises(compat.IncompatibleVersionError) as err:
        compat.sae_splicing_methods()
    message = str(err.value)
    installed = compat.installed_versions()["sae-lens"]
    assert f"sae-lens {installed}" in message and "tested: 6.54.x" in message
    assert "SAE splicing" in message and "HookedSAETransformer.run_with_saes is missing" in message


def test_splicing_method_relying_on_new_private_state_is_refused(fresh_checks, monkeypatch):
    def add_sae(self, sae, use_error_term=None):  # a future SAELens whose add_sae keeps new private state
        self._sae_registry[sae] = sae

    monkeypatch.setattr(hst.HookedSAETransformer, "add_sae", add_sae)
    with pytest.raises(compat.IncompatibleVersionError, match=re.escape("add_sae now relies on ['_sae_registry']")):
        compat.sae_splicing_methods()


def test_missing_directory_internals_warn_and_leave_sae_lens_alone(monkeypatch):
    current = psd.get_pretrained_saes_directory
    monkeypatch.delattr(psd, "PretrainedSAELookup")
    with pytest.warns(compat.CompatibilityWarning, match=r"SAE.from_pretrained .* sae-lens \d.*PretrainedSAELookup"):
        assert compat.patch_pretrained_directory() is False
    assert psd.get_pretrained_saes_directory is current


def test_version_outside_the_supported_range_warns(fresh_checks, monkeypatch):
    monkeypatch.setattr(compat, "installed_versions", lambda: {"sae-lens": "7.1.0", "transformer-lens": "3.9.0"})
    with pytest.warns(compat.CompatibilityWarning, match=r"sae-lens 7\.1\.0 is outside the range .*6\.54 <= version < 7\.0"):
        assert compat.check_version_ranges() == ("sae-lens",)


def test_patches_are_idempotent():
    compat.apply_patches()
    wrapper = psd.get_pretrained_saes_directory
    loader = lm.load_model
    for _ in range(3):
        compat.apply_patches()
        compat.patch_load_model(*compat._LOAD_MODEL_HANDLER[0])
    assert psd.get_pretrained_saes_directory is wrapper and lm.load_model is loader
    original = getattr(wrapper, "_sae_lens_multimodal_original")
    assert getattr(original, "_sae_lens_multimodal_original", None) is None  # a wrapper, not a wrapper of one
    assert loader.__wrapped_original__.__module__ == "sae_lens.load_model"
    assert not hasattr(loader.__wrapped_original__, "__wrapped_original__")
    # every loaded sae_lens module that imported the function by name sees the wrapper
    for name, module in list(sys.modules.items()):
        if name.startswith("sae_lens.") and hasattr(module, "get_pretrained_saes_directory"):
            assert module.get_pretrained_saes_directory is wrapper, name


def test_directory_extenders_run_on_every_read():
    seen = []
    compat.add_directory_extender("tests.test_compat", lambda directory: seen.append(len(directory)))
    try:
        psd.get_pretrained_saes_directory.cache_clear()
        directory = psd.get_pretrained_saes_directory()
        assert seen and seen[-1] == len(directory)
        assert "prisma-clip-vit-b-32-vanilla-x64" in directory  # our releases came back after cache_clear
    finally:
        compat._DIRECTORY_EXTENDERS.pop("tests.test_compat", None)
