"""Import-time registration with SAELens / TransformerLens: idempotent, offline, and effective."""

import importlib
import socket

import open_clip
import pytest
import torch

import sae_lens_multimodal
from sae_lens_multimodal import HookedViT


def test_import_and_reload_are_idempotent_and_offline(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("importing sae_lens_multimodal touched the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    importlib.reload(sae_lens_multimodal)
    importlib.reload(sae_lens_multimodal)
    sae_lens_multimodal.register_with_ecosystem()
    import sae_lens.load_model as lm

    # One wrapper, not a wrapper of a wrapper, however often we register.
    assert lm.load_model.__wrapped_original__.__module__ == "sae_lens.load_model"


def test_sae_lens_runners_resolve_our_model_class_names(tmp_path):
    source = open_clip.create_model("ViT-B-32", pretrained=None)
    open_clip_dir = tmp_path / "clip"
    open_clip_dir.mkdir()
    # open_clip's own hub layout: config + weights
    import json

    from open_clip.factory import get_model_config

    (open_clip_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": get_model_config("ViT-B-32")}))
    torch.save(source.state_dict(), open_clip_dir / "open_clip_pytorch_model.bin")

    from sae_lens.cache_activations_runner import load_model as runner_load_model
    from sae_lens.load_model import load_model

    for loader in (load_model, runner_load_model):
        model = loader("HookedViT", f"open-clip:local-dir:{open_clip_dir}", device="cpu")
        assert isinstance(model, HookedViT)
        x = torch.randn(1, 3, 224, 224)
        with torch.no_grad():
            assert (model(x) - source.eval().encode_image(x)).abs().max() < 1e-4
    with pytest.raises(ValueError, match="Unknown model class"):
        load_model("NotAModel", "x")


def test_top_level_exports_resolve():
    for name in sae_lens_multimodal.__all__:
        assert getattr(sae_lens_multimodal, name) is not None
    with pytest.raises(AttributeError):
        sae_lens_multimodal.not_a_name  # noqa: B018
