"""Shared fixtures of the report tests: one headless Chromium per test module, the shapes models."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="module")
def browser():
    """A started :class:`PageChecker`. Skips when Chromium (or Playwright) is missing, except in CI
    (env CI set), where the page tests must run and a missing browser fails them."""
    from sae_lens_multimodal.reports.browser import chromium_executable

    missing = None
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing = "playwright is not installed (pip install playwright; it drives the system Chromium)"
    if missing is None and chromium_executable() is None:
        missing = "Chromium is not installed (apt-get install chromium)"
    if missing is not None:
        if os.environ.get("CI"):
            pytest.fail(f"Headless page tests need a browser in CI: {missing}.")
        pytest.skip(missing)
    from sae_lens_multimodal.reports.browser import PageChecker

    with PageChecker() as checker:
        yield checker


@pytest.fixture(scope="module")
def shapes_clip():
    from sae_lens_multimodal.models.hooked_clip import HookedCLIP

    return HookedCLIP.from_pretrained("shapes-clip")


@pytest.fixture(scope="module")
def shapes_pipe():
    from sae_lens_multimodal.diffusion import HookedDiffusionPipeline

    pipe = HookedDiffusionPipeline.from_pretrained("shapes-diffusion", local_files_only=True)
    pipe.pipe.set_progress_bar_config(disable=True)
    return pipe
