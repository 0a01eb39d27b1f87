"""Files: every reader of weight files and every model / SAE loader refuses a file it cannot fully load
(missing, truncated, garbage, missing keys), naming the file, instead of a raw library error or a randomly
initialised model; pickles that hold code are refused without running it (issue 15)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

from sae_lens_multimodal.core.files import (
    IncompleteCheckpointError,
    UnreadableFileError,
    UnsafePickleError,
    load_npy,
    load_safetensors,
    load_torch_weights,
)

transformers = pytest.importorskip("transformers")


class MakesDirectoryWhenUnpickled:
    """A pickle payload whose __reduce__ would call os.mkdir(marker) when loaded."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


# ---------------------------------------------------------------------------------------- damage kinds
def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garbage(path: Path) -> None:
    path.write_bytes(b"this is not a weights file, just some text " * 20)


def _empty(path: Path) -> None:
    path.write_bytes(b"")


DAMAGE: dict[str, Callable[[Path], None]] = {"truncated": _truncate, "garbage": _garbage, "empty": _empty}


def _drop_a_key(path: Path) -> str:
    """Re-save a safetensors file without one of its tensors; returns the dropped key."""
    state = safetensors.torch.load_file(str(path))
    key = sorted(state)[len(state) // 2]
    del state[key]
    safetensors.torch.save_file(state, str(path))
    return key


# ------------------------------------------------------------------------------------ the file readers
@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_safetensors_names_the_file_and_the_fix(tmp_path, damage):
    path = tmp_path / "weights.safetensors"
    safetensors.torch.save_file({"w": torch.randn(4, 4), "b": torch.randn(4)}, str(path))
    DAMAGE[damage](path)
    with pytest.raises(UnreadableFileError) as err:
        load_safetensors(path, what="test weights")
    message = str(err.value)
    assert str(path) in message and "test weights" in message
    assert "incomplete or not a safetensors file" in message
    assert "re-download" in message and "re-save" in message


def test_missing_safetensors_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
        load_safetensors(tmp_path / "nothing.safetensors")


def test_a_directory_is_not_a_weights_file(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a directory"):
        load_safetensors(tmp_path)


def _npy(tmp_path: Path) -> Path:
    path = tmp_path / "acts.npy"
    np.save(path, np.arange(24, dtype=np.float32).reshape(6, 4))
    return path


@pytest.mark.parametrize("mmap_mode", [None, "r"])
@pytest.mark.parametrize("damage", ["header", "truncated", "garbage", "empty"])
def test_damaged_npy_names_the_file(tmp_path, damage, mmap_mode):
    path = _npy(tmp_path)
    data = path.read_bytes()
    if damage == "header":  # magic intact, header dict corrupted
        path.write_bytes(data[:10] + b"{'descr': <f4', 'fortran" + data[34:])
    else:
        DAMAGE[damage](path)
    with pytest.raises(UnreadableFileError) as err:
        load_npy(path, mmap_mode=mmap_mode)
    message = str(err.value)
    assert str(path) in message
    assert "allow_pickle" not in message  # numpy's advice to unpickle is not passed on
    assert "Re-create it" in message


def test_npy_holding_objects_is_refused_without_unpickling(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.npy"
    np.save(path, np.array([MakesDirectoryWhenUnpickled(marker)], dtype=object), allow_pickle=True)
    with pytest.raises(UnreadableFileError, match="Python objects") as err:
        load_npy(path)
    assert str(path) in str(err.value)
    assert not marker.exists()
    np.load(path, allow_pickle=True)  # the fixture really is malicious
    assert marker.is_dir()


def test_good_files_load(tmp_path):
    path = _npy(tmp_path)
    assert load_npy(path, mmap_mode="r").shape == (6, 4)
    st = tmp_path / "w.safetensors"
    safetensors.torch.save_file({"w": torch.ones(3)}, str(st))
    assert torch.equal(load_safetensors(st)["w"], torch.ones(3))
    pt = tmp_path / "w.pt"
    torch.save({"w": torch.ones(3)}, pt)
    assert torch.equal(load_torch_weights(pt, what="w")["w"], torch.ones(3))


def test_pickle_holding_code_is_refused_because_it_holds_code(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "cfg": MakesDirectoryWhenUnpickled(marker)}, path)
    with pytest.raises(UnsafePickleError) as err:
        load_torch_weights(path, what="test checkpoint")
    message = str(err.value)
    assert "test checkpoint" in message and str(path) in message
    assert "holds code" in message and "Nothing from the file was executed" in message
    assert "weights_only=False" not in message and "weights_only" not in message
    assert not marker.exists()
    assert isinstance(err.value, pickle.UnpicklingError)


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_torch_checkpoint_is_unreadable_not_unsafe(tmp_path, damage):
    path = tmp_path / "w.pt"
    torch.save({"w": torch.randn(16, 16)}, path)
    DAMAGE[damage](path)
    with pytest.raises(UnreadableFileError) as err:
        load_torch_weights(path, what="test checkpoint")
    message = str(err.value)
    assert str(path) in message and "incomplete or not a torch checkpoint" in message


# ----------------------------------------------------------------------------- model directories
TINY_OPEN_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 50, "width": 16, "heads": 2, "layers": 1},
}


def _open_clip_dir(root: Path) -> tuple[Path, str]:
    import open_clip

    folder = root / "open_clip"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_OPEN_CLIP, "preprocess_cfg": {}}))
    model = open_clip.create_model(f"local-dir:{folder}")  # no weights yet: random init, saved below
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    safetensors.torch.save_file(state, str(folder / "open_clip_model.safetensors"))
    return folder, "open_clip_model.safetensors"


def _hf_vit_dir(root: Path) -> tuple[Path, str]:
    folder = root / "hf_vit"
    transformers.ViTModel(transformers.ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                 intermediate_size=32, image_size=16, patch_size=8),
                          add_pooling_layer=False).save_pretrained(folder)
    return folder, "model.safetensors"


def _hf_clip_dir(root: Path) -> tuple[Path, str]:
    folder = root / "hf_clip"
    config = transformers.CLIPConfig(
        text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "vocab_size": 50, "max_position_embeddings": 8},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 16, "patch_size": 8},
        projection_dim=8)
    transformers.CLIPModel(config).save_pretrained(folder)
    return folder, "model.safetensors"


def _timm_dir(root: Path) -> tuple[Path, str]:
    import timm
    from timm.models import save_for_hf

    folder = root / "timm"
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, img_size=32, num_classes=0)
    save_for_hf(model, str(folder), safe_serialization=True)
    return folder, "model.safetensors"


def _sd_dir(root: Path) -> tuple[Path, str]:
    from tests.diffusion import _tiny

    folder = root / "sd"
    _tiny.sd_pipeline().save_pretrained(folder)
    return folder, "unet/diffusion_pytorch_model.safetensors"


def _load_vit(path: Path):
    from sae_lens_multimodal.models.hooked_vit import HookedViT

    return HookedViT.from_pretrained(str(path))


def _load_clip(path: Path):
    from sae_lens_multimodal.models.hooked_clip import HookedCLIP

    return HookedCLIP.from_pretrained(str(path))


def _load_open_clip_prefixed(path: Path):
    from sae_lens_multimodal.models.hooked_vit import HookedViT

    return HookedViT.from_pretrained(f"open-clip:local-dir:{path}")


def _load_any(path: Path):
    from sae_lens_multimodal.models.loading import load_model

    return load_model(str(path))


def _load_pipeline(path: Path):
    from sae_lens_multimodal.diffusion import HookedDiffusionPipeline

    return HookedDiffusionPipeline.from_pretrained(str(path))


def _load_unet(path: Path):
    from sae_lens_multimodal.diffusion.hooked import HookedUNet

    return HookedUNet.from_pretrained(str(path))


#: case -> (build the checkpoint, load it)
MODEL_CASES: dict[str, tuple[Callable[[Path], tuple[Path, str]], Callable[[Path], object]]] = {
    "open_clip-clip": (_open_clip_dir, _load_clip),
    "open_clip-vit-prefixed": (_open_clip_dir, _load_open_clip_prefixed),
    "open_clip-load_model": (_open_clip_dir, _load_any),
    "hf_vit": (_hf_vit_dir, _load_vit),
    "hf_clip": (_hf_clip_dir, _load_clip),
    "hf_vit-load_model": (_hf_vit_dir, _load_any),
    "timm": (_timm_dir, _load_vit),
    "diffusers-pipeline": (_sd_dir, _load_pipeline),
    "diffusers-load_model": (_sd_dir, _load_any),
    "diffusers-unet": (_sd_dir, _load_unet),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """Each library's checkpoint once, in its own on-disk layout (copied per test before damaging it)."""
    root = tmp_path_factory.mktemp("checkpoints")
    torch.manual_seed(0)
    built: dict[Callable, tuple[Path, str]] = {}
    out = {}
    for case, (build, _) in MODEL_CASES.items():
        if build not in built:
            built[build] = build(root)
        out[case] = built[build]
    return out


def _copy(checkpoints, case: str, tmp_path: Path) -> tuple[Path, Path]:
    folder, weights = checkpoints[case]
    target = tmp_path / folder.name
    shutil.copytree(folder, target)
    return target, target / weights


@pytest.mark.parametrize("case", sorted(MODEL_CASES))
def test_intact_checkpoint_loads(checkpoints, case, tmp_path):
    folder, _ = _copy(checkpoints, case, tmp_path)
    assert MODEL_CASES[case][1](folder) is not None


@pytest.mark.parametrize("case", sorted(MODEL_CASES))
def test_missing_weights_file_is_refused_naming_the_directory(checkpoints, case, tmp_path):
    folder, weights = _copy(checkpoints, case, tmp_path)
    weights.unlink()
    with pytest.raises(FileNotFoundError) as err:
        MODEL_CASES[case][1](folder)
    message = str(err.value)
    assert str(weights.parent) in message
    assert "no weights file" in message or "holds no weights" in message


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
@pytest.mark.parametrize("case", sorted(MODEL_CASES))
def test_damaged_weights_file_is_refused_naming_the_file(checkpoints, case, damage, tmp_path):
    folder, weights = _copy(checkpoints, case, tmp_path)
    DAMAGE[damage](weights)
    with pytest.raises(UnreadableFileError) as err:
        MODEL_CASES[case][1](folder)
    message = str(err.value)
    assert str(weights) in message and "incomplete or not a safetensors file" in message


@pytest.mark.parametrize("case", ["open_clip-clip", "hf_vit", "hf_clip", "timm", "diffusers-pipeline",
                                  "diffusers-unet"])
def test_checkpoint_missing_a_weight_is_refused(checkpoints, case, tmp_path):
    folder, weights = _copy(checkpoints, case, tmp_path)
    _drop_a_key(weights)
    with pytest.raises(IncompleteCheckpointError) as err:
        MODEL_CASES[case][1](folder)
    message = str(err.value)
    assert str(folder) in message
    assert "randomly initialised" in message or "does not hold all" in message


def test_missing_text_encoder_weight_in_a_pipeline_is_refused(checkpoints, tmp_path):
    folder, _ = _copy(checkpoints, "diffusers-pipeline", tmp_path)
    _drop_a_key(folder / "text_encoder" / "model.safetensors")
    with pytest.raises(IncompleteCheckpointError, match="MISSING|newly initialized"):
        _load_pipeline(folder)


def test_sharded_checkpoint_with_a_missing_shard_is_refused(checkpoints, tmp_path):
    folder, weights = _copy(checkpoints, "hf_vit", tmp_path)
    state = safetensors.torch.load_file(str(weights))
    keys = sorted(state)
    weights.unlink()
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, part in shards.items():
        safetensors.torch.save_file({k: state[k] for k in part}, str(folder / name))
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: name for name, part in shards.items() for k in part}}))
    assert _load_vit(folder) is not None  # both shards there: loads
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        _load_vit(folder)


def test_refusing_partial_loads_restores_the_library_loggers(checkpoints, tmp_path):
    import logging

    folder, weights = _copy(checkpoints, "diffusers-unet", tmp_path)
    logger = logging.getLogger("diffusers.models.modeling_utils")
    level, filters = logger.level, list(logger.filters)
    _drop_a_key(weights)
    with pytest.raises(IncompleteCheckpointError):
        _load_unet(folder)
    assert (logger.level, logger.filters) == (level, filters)


# ------------------------------------------------------------------- sae-lens-mm cache on a broken model
@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    from PIL import Image

    path = tmp_path_factory.mktemp("images")
    for i in range(3):
        Image.fromarray(np.full((32, 32, 3), 40 * i, dtype=np.uint8)).save(path / f"{i}.png")
    return path


@pytest.mark.parametrize("case", ["open_clip-clip", "hf_vit"])
def test_cache_command_on_a_model_without_weights_exits_2_and_writes_nothing(checkpoints, case, image_dir, tmp_path,
                                                                             capsys):
    from sae_lens_multimodal.cli import main

    folder, weights = _copy(checkpoints, case, tmp_path)
    out = tmp_path / "cache"
    args = ["cache", "--model", str(folder), "--hook", "blocks.0.hook_resid_post", "--images", str(image_dir),
            "--out", str(out), "--no-progress"]
    weights.unlink()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert str(folder) in err and "weights" in err
    assert not out.exists() or not list(out.rglob("*.npy"))  # no activations of a random model written


# ------------------------------------------------------------------------------- SAE directories
def _sae_dir(tmp_path: Path) -> Path:
    from sae_lens import StandardSAE, StandardSAEConfig

    sae = StandardSAE(StandardSAEConfig(d_in=8, d_sae=16))
    sae.cfg.metadata.hook_name = "blocks.0.hook_resid_post"
    folder = tmp_path / "sae"
    sae.save_model(str(folder))
    return folder


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_sae_directory_names_the_weights_file(tmp_path, damage):
    from sae_lens_multimodal.pretrained import load_sae_dir

    folder = _sae_dir(tmp_path)
    assert load_sae_dir(folder).cfg.d_sae == 16
    DAMAGE[damage](folder / "sae_weights.safetensors")
    with pytest.raises(UnreadableFileError) as err:
        load_sae_dir(folder)
    assert str(folder / "sae_weights.safetensors") in str(err.value)


def test_sae_directory_missing_files_or_keys(tmp_path):
    from sae_lens_multimodal.pretrained import load_sae_dir

    folder = _sae_dir(tmp_path)
    _drop_a_key(folder / "sae_weights.safetensors")
    with pytest.raises(IncompleteCheckpointError, match="sae_weights.safetensors"):
        load_sae_dir(folder)
    (folder / "sae_weights.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weights file sae_weights.safetensors"):
        load_sae_dir(folder)
    (folder / "cfg.json").write_text("{not json")
    with pytest.raises(ValueError, match="cfg.json"):
        load_sae_dir(folder)
    (folder / "cfg.json").unlink()
    with pytest.raises(FileNotFoundError, match="no cfg.json"):
        load_sae_dir(folder)
    with pytest.raises(FileNotFoundError, match="No SAE directory"):
        load_sae_dir(tmp_path / "nowhere")


@pytest.mark.parametrize("command", ["evaluate", "dashboards"])
def test_cli_sae_path_to_a_truncated_sae_is_one_error_line(tmp_path, command, capsys):
    from sae_lens_multimodal.cli import main

    folder = _sae_dir(tmp_path)
    _truncate(folder / "sae_weights.safetensors")
    args = {"evaluate": ["evaluate", "--sae-path", str(folder), "--model", "nowhere-model-x"],
            "dashboards": ["dashboards", "--sae-path", str(folder), "--model", "shapes-clip", "--out",
                           str(tmp_path / "d")]}[command]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sae_weights.safetensors" in err[0] and "incomplete" in err[0]


# ------------------------------------------------------------- SAE releases through SAE.from_pretrained
from tests.pretrained.conftest import hub, test_release  # noqa: E402,F401  (fixtures)
from tests.pretrained.test_prisma import prisma_config, prisma_state  # noqa: E402
from tests.pretrained.test_sparsify import saeuron_cfg, sparsify_state  # noqa: E402
from tests.pretrained.test_sparsify import spec as sparsify_spec  # noqa: E402


def _prisma(tmp_path: Path) -> tuple[dict, dict, str]:
    import io

    buf = io.BytesIO()
    torch.save({"state_dict": prisma_state(8, 16)}, buf)
    files = {"config.json": json.dumps(prisma_config(1, "hook_resid_post", 8, 2)), "weights.pt": buf.getvalue()}
    spec = {"format": "prisma", "repo_id": "damaged-test/prisma", "model": "open-clip:ViT-B-32/openai",
            "model_class_name": "HookedViT", "defaults": {"token_policy": "all", "input_kind": "block_output"},
            "saes": [{"id": "blocks.1.hook_resid_post", "path": "weights.pt"}]}
    return files, spec, "weights.pt"


def _sparsify(tmp_path: Path) -> tuple[dict, dict, str]:
    folder = "unet.up_blocks.1.attentions.1"
    files = {f"{folder}/cfg.json": json.dumps(saeuron_cfg(8, 2, unit_norm=False)),
             f"{folder}/sae.safetensors": safetensors.torch.save(sparsify_state(8, 32))}
    return files, sparsify_spec("damaged-test/sparsify", SPARSIFY_ID, folder), f"{folder}/sae.safetensors"


SPARSIFY_ID = "up_blocks.1.attentions.1.hook_out"


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
@pytest.mark.parametrize("fmt", ["prisma", "sparsify"])
def test_damaged_release_file_names_the_file(hub, test_release, tmp_path, fmt, damage):
    from sae_lens import SAE

    files, spec, weights = {"prisma": _prisma, "sparsify": _sparsify}[fmt](tmp_path)
    data = files[weights]
    files[weights] = data[: len(data) // 2] if damage == "truncated" else b"garbage " * 40
    hub.write_repo(spec["repo_id"], files)
    test_release(f"test-damaged-{fmt}", spec)
    with pytest.raises(UnreadableFileError) as err:
        SAE.from_pretrained(f"test-damaged-{fmt}", SPARSIFY_ID if fmt == "sparsify" else "blocks.1.hook_resid_post")
    message = str(err.value)
    assert weights.rsplit("/", 1)[-1] in message and "incomplete" in message


# ------------------------------------------------------------ damaged files in the Hugging Face cache
@pytest.fixture
def offline_hub_cache(tmp_path, monkeypatch):
    """An empty, offline Hugging Face cache (huggingface_hub reads these constants at call time)."""
    import huggingface_hub.constants as hf_constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.mark.parametrize("case, name", [("hf_vit", "test-org/tiny-vit"), ("timm", "timm:hf-hub:test-org/tiny-vit"),
                                        ("open_clip-clip", "open-clip:hf-hub:test-org/tiny-vit")])
def test_truncated_file_in_the_hub_cache_names_the_repo_and_how_to_refetch(checkpoints, offline_hub_cache, case,
                                                                          name):
    from tests.models.test_open_clip_family import make_hub_cache

    folder, weights = checkpoints[case]
    make_hub_cache(offline_hub_cache, "test-org/tiny-vit", folder)
    cached = next(offline_hub_cache.rglob(weights))
    _truncate(cached)
    with pytest.raises(UnreadableFileError) as err:
        (_load_clip if case.startswith("open_clip") else _load_vit)(name)
    message = str(err.value)
    assert "test-org/tiny-vit" in message and "incomplete" in message
