"""SAEs: an SAE whose metadata records another model (name, weight fingerprint) warns when it is spliced into a
model or evaluated on a cache, or is refused with ``on_model_mismatch="error"``; a matching SAE, or one that
records no model (most public releases), splices silently; a width mismatch is still its own clear error
(issue 15)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from sae_lens import SAE, StandardSAE, StandardSAEConfig
from sae_lens.saes.sae import SAEMetadata

from sae_lens_multimodal.core.sae_metadata import (
    SAEModelMismatchError,
    SAEModelMismatchWarning,
    check_sae_model_match,
    model_identity,
)

CLIP_RELEASE, CLIP_HOOK = "shapes-clip-saes", "blocks.2.hook_resid_post"


def _mismatch_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, SAEModelMismatchWarning)]


def _splice(model, sae, **kwargs) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.add_sae(sae, **kwargs)
        model.reset_saes()
    return _mismatch_warnings(caught)


@pytest.fixture(scope="module")
def shapes_sae() -> SAE:
    return SAE.from_pretrained(CLIP_RELEASE, CLIP_HOOK)


@pytest.fixture(scope="module")
def shapes_clip():
    from sae_lens_multimodal.models.hooked_clip import HookedCLIP

    return HookedCLIP.from_pretrained("shapes-clip")


@pytest.fixture(scope="module")
def typographic_clip():
    from sae_lens_multimodal.models.hooked_clip import HookedCLIP

    return HookedCLIP.from_pretrained("shapes-clip-typographic")  # same architecture, other weights


# --------------------------------------------------------------------------------- splicing (add_sae)
def test_bundled_sae_splices_silently_into_its_own_model(shapes_sae, shapes_clip):
    assert shapes_sae.cfg.metadata.model_fingerprint == model_identity(shapes_clip.vision)["trunk_fingerprint"]
    assert _splice(shapes_clip, shapes_sae) == []
    assert _splice(shapes_clip.vision, shapes_sae) == []


def _splice_strictly(model, sae) -> None:
    """Splice with every SAEModelMismatchWarning an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", SAEModelMismatchWarning)
        model.add_sae(sae)
    model.reset_saes()


def test_trunk_fingerprint_leaves_out_only_the_readout_head(shapes_clip):
    identity = model_identity(shapes_clip.vision)
    assert any(k.startswith("head.") for k in shapes_clip.vision.state_dict())
    assert identity["trunk_fingerprint"] != identity["fingerprint"]
    headless = {k: v for k, v in shapes_clip.vision.state_dict().items() if not k.startswith("head.")}
    module = torch.nn.Module()
    module.state_dict = lambda: headless  # the same weights, no readout
    assert model_identity(module)["fingerprint"] == model_identity(module)["trunk_fingerprint"] \
        == identity["trunk_fingerprint"]


def test_bundled_clip_sae_splices_silently_into_the_same_tower_inside_a_vlm(shapes_sae, shapes_clip):
    from sae_lens_multimodal import HookedVLM

    vlm = HookedVLM.from_pretrained("shapes-vlm")  # its vision tower: shapes-clip's, without the CLIP projection
    assert not any(k.startswith("head.") for k in vlm.part("vision").state_dict())
    _splice_strictly(vlm, shapes_sae)
    _splice_strictly(shapes_clip, shapes_sae)
    _splice_strictly(shapes_clip.vision, shapes_sae)
    assert check_sae_model_match(shapes_sae, identity=model_identity(vlm.part("vision")), on_mismatch="error") is None


def test_clip_sae_still_warns_on_a_random_vit_of_the_same_architecture(shapes_sae, shapes_clip):
    from sae_lens_multimodal.models.hooked_vit import HookedViT

    torch.manual_seed(0)
    random_vit = HookedViT(shapes_clip.vision.cfg)  # same architecture and head, other (random) weights
    assert set(random_vit.state_dict()) == set(shapes_clip.vision.state_dict())
    messages = _splice(random_vit, shapes_sae)
    assert len(messages) == 1 and shapes_sae.cfg.metadata.model_fingerprint in messages[0]
    with pytest.raises(SAEModelMismatchError):
        check_sae_model_match(shapes_sae, identity=model_identity(random_vit), on_mismatch="error")


def test_sae_recording_the_old_full_fingerprint_still_matches_its_model(shapes_clip, typographic_clip):
    full = model_identity(shapes_clip.vision)["fingerprint"]  # what SAEs recorded before trunk fingerprints
    old = _sae(64, CLIP_HOOK, model_name="shapes-clip", model_fingerprint=full)
    _splice_strictly(shapes_clip, old)
    _splice_strictly(shapes_clip.vision, old)
    old_cache_identity = {"name": "shapes-clip", "fingerprint": full}  # a cache without trunk_fingerprint
    assert check_sae_model_match(old, identity=old_cache_identity, on_mismatch="error") is None
    assert len(_splice(typographic_clip, old)) == 1  # ... and still tells other weights apart


def test_training_records_the_trunk_fingerprint_of_old_and_new_caches():
    from sae_lens_multimodal.core.sae_metadata import sae_model_metadata

    new = {"name": "m", "fingerprint": "sha256:full", "trunk_fingerprint": "sha256:trunk"}
    assert sae_model_metadata(new) == {"model_name": "m", "model_fingerprint": "sha256:trunk"}
    assert sae_model_metadata({"name": "m", "fingerprint": "sha256:full"})["model_fingerprint"] == "sha256:full"


def test_matching_sae_is_silent_through_load_model_and_run_with_saes(shapes_sae):
    from sae_lens_multimodal.models.loading import load_model

    model = load_model("shapes-clip")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.run_with_saes(torch.zeros(1, 3, 32, 32), saes=[shapes_sae], return_type="embeddings")
    assert _mismatch_warnings(caught) == []


def test_sae_from_another_model_warns_naming_both(shapes_sae, typographic_clip):
    messages = _splice(typographic_clip, shapes_sae)
    assert len(messages) == 1
    message = messages[0]
    assert "'shapes-clip'" in message and "'shapes-clip-typographic'" in message
    assert shapes_sae.cfg.metadata.model_fingerprint in message
    assert "on_model_mismatch" in message


def test_sae_from_another_model_warns_in_run_with_saes_too(shapes_sae, typographic_clip):
    with pytest.warns(SAEModelMismatchWarning, match="shapes-clip-typographic"):
        typographic_clip.run_with_saes(torch.zeros(1, 3, 32, 32), saes=[shapes_sae], return_type="embeddings")
    assert typographic_clip.acts_to_saes == {}  # the context removed it again


def test_sae_from_another_model_is_refused_on_request(shapes_sae, typographic_clip):
    with pytest.raises(SAEModelMismatchError, match="shapes-clip-typographic") as err:
        typographic_clip.add_sae(shapes_sae, on_model_mismatch="error")
    assert isinstance(err.value, ValueError)
    assert typographic_clip.acts_to_saes == {}  # nothing was spliced
    assert _splice(typographic_clip, shapes_sae, on_model_mismatch="ignore") == []
    with pytest.raises(ValueError, match="on_model_mismatch='sometimes' is not one of"):
        typographic_clip.add_sae(shapes_sae, on_model_mismatch="sometimes")


def test_warning_filter_can_make_every_mismatch_an_error(shapes_sae, typographic_clip):
    with warnings.catch_warnings():
        warnings.simplefilter("error", SAEModelMismatchWarning)
        with pytest.raises(SAEModelMismatchWarning):
            typographic_clip.add_sae(shapes_sae)
    typographic_clip.reset_saes()


def test_width_mismatch_is_still_its_own_clear_error(shapes_sae, typographic_clip):
    wide = StandardSAE(StandardSAEConfig(d_in=65, d_sae=8, metadata=SAEMetadata(
        hook_name=CLIP_HOOK, model_name="some-other-model", model_fingerprint="sha256:0")))
    with pytest.raises(ValueError, match="d_in=65 does not match hook") as err:
        typographic_clip.add_sae(wide, on_model_mismatch="error")
    assert not isinstance(err.value, SAEModelMismatchError)


# ------------------------------------------------------------------------- SAEs recording only a name
def _sae(d_in: int, hook: str = "blocks.0.hook_resid_post", **metadata) -> StandardSAE:
    return StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=8, metadata=SAEMetadata(hook_name=hook, **metadata)))


@pytest.fixture(scope="module")
def local_vit(tmp_path_factory):
    """A tiny transformers ViT saved to a directory, loaded by that path."""
    import transformers

    from sae_lens_multimodal.models.hooked_vit import HookedViT

    folder = tmp_path_factory.mktemp("vit")
    transformers.ViTModel(transformers.ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                 intermediate_size=32, image_size=16, patch_size=8),
                          add_pooling_layer=False).save_pretrained(folder)
    return folder, HookedViT.from_pretrained(str(folder))


def test_public_release_without_identity_splices_silently(local_vit):
    _, model = local_vit
    assert _splice(model, _sae(16)) == []  # records no model at all


def test_recorded_name_matches_other_spellings_of_the_same_model(local_vit):
    folder, model = local_vit
    for name in (str(folder), f"{folder}/", f"local-dir:{folder}"):
        assert _splice(model, _sae(16, model_name=name)) == [], name


def test_recorded_name_that_clearly_differs_warns(local_vit):
    _, model = local_vit
    messages = _splice(model, _sae(16, model_name="open-clip:ViT-B-32/openai"))
    assert len(messages) == 1 and "open-clip:ViT-B-32/openai" in messages[0]


def test_model_built_from_an_object_is_not_compared_by_name():
    from sae_lens_multimodal.models.config import HookedViTConfig
    from sae_lens_multimodal.models.hooked_vit import HookedViT

    model = HookedViT(HookedViTConfig(n_layers=1, d_model=16, n_heads=2, d_mlp=32, image_size=16, patch_size=8))
    assert _splice(model, _sae(16, model_name="open-clip:ViT-B-32/openai")) == []
    # ... but a recorded fingerprint still decides
    messages = _splice(model, _sae(16, model_fingerprint="sha256:00000000"))
    assert len(messages) == 1 and "sha256:00000000" in messages[0]


def test_same_weights_under_another_name_are_silent_when_fingerprinted(local_vit):
    folder, model = local_vit
    sae = _sae(16, model_name="renamed-copy-of-the-model", model_fingerprint=model_identity(model)["fingerprint"])
    assert _splice(model, sae) == []


def test_registered_name_and_its_source_are_the_same_model(shapes_clip):
    from sae_lens_multimodal.models.registry import resolve_model_name

    source = resolve_model_name("shapes-clip")
    assert source != "shapes-clip"
    assert _splice(shapes_clip, _sae(64, CLIP_HOOK, model_name=source)) == []
    assert len(_splice(shapes_clip, _sae(64, CLIP_HOOK, model_name="shapes-clip-typographic"))) == 1


def test_check_needs_a_model_or_an_identity(shapes_sae):
    with pytest.raises(TypeError, match="needs a model or a model identity"):
        check_sae_model_match(shapes_sae)


# ------------------------------------------------------------------------------------ diffusion
def test_bundled_diffusion_sae_is_silent_on_its_pipeline_and_warns_on_another():
    from sae_lens_multimodal.diffusion import HookedDiffusionPipeline

    sae = SAE.from_pretrained("shapes-diffusion-saes", "up_blocks.0.attentions.1.hook_out")
    pipe = HookedDiffusionPipeline.from_pretrained("shapes-diffusion")
    assert _splice(pipe, sae) == []
    other = HookedDiffusionPipeline.from_pretrained("shapes-diffusion")  # same name, then other weights
    with torch.no_grad():
        next(other.denoiser.parameters()).add_(1.0)
    assert check_sae_model_match(sae, other, on_mismatch="ignore") is None
    with pytest.raises(SAEModelMismatchError, match="its weights differ"):
        other.add_sae(sae, on_model_mismatch="error")


# --------------------------------------------------------------------------- evaluate on a cache
@pytest.fixture(scope="module")
def two_models_and_caches(tmp_path_factory):
    """Two tiny ViTs of one architecture (different weights), a cache of each, and an SAE trained on the first."""
    import transformers
    from PIL import Image

    from sae_lens_multimodal.cli import main

    root = tmp_path_factory.mktemp("mismatch")
    images = root / "images"
    images.mkdir()
    for i in range(4):
        Image.fromarray((torch.rand(16, 16, 3) * 255).to(torch.uint8).numpy()).save(images / f"{i}.png")
    out = {}
    for seed in (0, 1):
        torch.manual_seed(seed)
        folder = root / f"vit{seed}"
        transformers.ViTModel(transformers.ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                     intermediate_size=32, image_size=16, patch_size=8),
                              add_pooling_layer=False).save_pretrained(folder)
        assert main(["cache", "--model", str(folder), "--hook", "blocks.0.hook_resid_post", "--images", str(images),
                     "--out", str(root / f"cache{seed}"), "--no-progress"]) == 0
        out[seed] = (folder, root / f"cache{seed}" / "blocks.0.hook_resid_post")
    assert main(["train", "--cache", str(out[0][1]), "--out", str(root / "sae"), "--total-training-samples", "40",
                 "--batch-size", "8", "--k", "2", "--d-sae", "16", "--no-progress"]) == 0
    return out, root / "sae"


def test_trained_sae_records_the_cache_model_fingerprint(two_models_and_caches):
    from sae_lens_multimodal.training.cache import ActivationCacheReader

    caches, sae_dir = two_models_and_caches
    recorded = json.loads((sae_dir / "cfg.json").read_text())["metadata"]
    made_by = ActivationCacheReader(caches[0][1]).metadata["model"]
    assert recorded["model_fingerprint"] == made_by["trunk_fingerprint"] and recorded["model_fingerprint"]
    assert recorded["model_name"] == made_by["name"]


def test_evaluate_on_a_cache_of_another_model_warns(two_models_and_caches):
    from sae_lens_multimodal.training.evaluate import evaluate_sae

    caches, sae_dir = two_models_and_caches
    sae = SAE.load_from_disk(str(sae_dir))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        evaluate_sae(sae, caches[0][1], n_rows=16)
    assert _mismatch_warnings(caught) == []
    with pytest.warns(SAEModelMismatchWarning, match=str(caches[1][0].name)):
        evaluate_sae(sae, caches[1][1], n_rows=16)
    with pytest.raises(SAEModelMismatchError):
        evaluate_sae(sae, caches[1][1], n_rows=16, on_model_mismatch="error")


def test_evaluate_command_warns_about_another_model(two_models_and_caches, capsys):
    from sae_lens_multimodal.cli import main

    caches, sae_dir = two_models_and_caches
    with pytest.warns(SAEModelMismatchWarning):
        assert main(["evaluate", "--sae-path", str(sae_dir), "--cache", str(caches[1][1]), "--n-rows", "16"]) == 0


def test_spliced_into_the_other_model_warns_and_into_its_own_is_silent(two_models_and_caches):
    from sae_lens_multimodal.models.loading import load_model

    caches, sae_dir = two_models_and_caches
    sae = SAE.load_from_disk(str(sae_dir))
    assert _splice(load_model(str(caches[0][0])), sae) == []
    assert len(_splice(load_model(str(caches[1][0])), sae)) == 1
