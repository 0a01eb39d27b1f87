"""Test-wide settings: no network, deterministic, and a thread count that suits the 2-core CI machine."""

import os

# Must be set before huggingface_hub is imported anywhere: tests never touch the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import pytest  # noqa: E402
import torch  # noqa: E402

# One intra-op thread: the models under test are small enough that threads buy little, and on a shared
# 2-core machine a second busy-waiting OpenMP thread per process slows the suite by an order of magnitude
# (measured: the whole default suite takes ~2.5 min with one thread).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _quiet_transformers():
    """transformers warns about every randomly initialised model the tests build; keep the output readable."""
    from transformers.utils import logging as hf_logging

    old = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    yield
    hf_logging.set_verbosity(old)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failing ``shipped_weights`` test says that its threshold was measured on the shipped weights."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and item.get_closest_marker("shipped_weights") is not None:
        report.sections.append((
            "shipped weights",
            "This threshold was measured on the shipped shapes-world weights (marker shipped_weights). If the "
            "weights were retrained, re-measure it; otherwise this is a code regression.",
        ))
