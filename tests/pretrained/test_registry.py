"""The shipped release directory: consistent with the documented repo naming, injected into SAELens (also after
its cache is cleared), idempotent, offline; listing and the ``sae-lens-mm releases`` command."""

from __future__ import annotations

import json
import re
import socket
import time
from pathlib import Path

import pytest
from sae_lens import SAE
from sae_lens.loading import pretrained_sae_loaders as psl
from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

from sae_lens_multimodal.cli import main
from sae_lens_multimodal.models.registry import list_models
from sae_lens_multimodal.pretrained import list_releases, register_releases, registered_releases
from sae_lens_multimodal.pretrained.releases import FORMATS, load_release_file
from sae_lens_multimodal.pretrained.sdxl_unbox import hook_from_folder as unbox_hook
from sae_lens_multimodal.pretrained.sparsify import hook_from_folder as sparsify_hook
from tests.pretrained.conftest import torch_bytes
from tests.pretrained.test_prisma import prisma_config, prisma_state

DOCS = Path(__file__).resolve().parents[2] / "docs" / "releases.md"
SHIPPED = load_release_file()
ALL_SAES = [(rel, sae) for rel in SHIPPED.values() for sae in rel.saes.values()]

VIT_HOOK = re.compile(r"^blocks\.\d+\.hook_(resid_post|mlp_out)$")
DIFFUSION_HOOK = re.compile(r"^(down_blocks|up_blocks|mid_block|transformer_blocks|single_transformer_blocks)"
                            r"(\.\d+)?(\.attentions\.\d+)?\.hook_(out|update)$")
#: a transcoder reads an MLP's input (SAELens's convention: hook_name = the input hook, hook_name_out = the output)
TRANSCODER_IN = re.compile(r"^blocks\.\d+\.ln2\.hook_normalized$")
KIND_OF_HOOK = {"hook_resid_post": "block_output", "hook_mlp_out": "mlp_output", "hook_out": "block_output",
                "hook_update": "residual_update"}


def test_shipped_releases_cover_every_documented_family():
    names = set(SHIPPED)
    for family in ("prisma-clip-vit-b-32-vanilla-x64", "prisma-clip-vit-b-32-topk64-cls-only",
                   "prisma-clip-vit-b-32-vanilla-x64-cls-only", "prisma-clip-vit-b-32-vanilla-x64-patches-only",
                   "prisma-clip-vit-b-32-imagenet-sweep-all-patches", "prisma-dino-vit-b-vanilla-x64",
                   "saev-clip-vit-b-16-in1k", "saev-dinov2-vit-b-14-reg-in1k", "saev-bioclip-vit-b-16-inat21",
                   "saev-dinov3-vit-s-16-in1k", "saev-dinov3-vit-b-16-in1k", "saev-dinov3-vit-l-16-in1k",
                   "saev-dinov3-topk-vit-l-16-in1k", "sdxl-unbox-sdxl-turbo", "sdxl-unbox-flux-schnell",
                   "saeuron-sd15-unlearncanvas", "saeuron-sd15-coco"):
        assert family in names
    for coeff in ("1e-05", "5e-05", "8e-05", "0.0001"):
        assert len(SHIPPED[f"prisma-clip-vit-b-32-vanilla-x64-l1-{coeff}"].saes) == 24  # 12 layers x 2 hooks
    assert len(SHIPPED["prisma-clip-vit-b-32-vanilla-x64"].saes) == 24
    assert SHIPPED["saev-dinov3-vit-l-16-in1k"].layers == (13, 15, 17, 19, 21, 23)


@pytest.mark.parametrize("release, sae", ALL_SAES, ids=[f"{r.name}:{s.sae_id}" for r, s in ALL_SAES])
def test_every_shipped_sae_is_consistent(release, sae):
    hook_kind = sae.hook_name.rsplit(".", 1)[-1]
    transcoder = sae.architecture in ("transcoder", "skip_transcoder")
    if release.model_class_name == "HookedViT":
        assert (TRANSCODER_IN if transcoder else VIT_HOOK).match(sae.hook_name)
        assert release.model.startswith("open-clip:") or re.fullmatch(r"[\w.-]+/[\w.-]+", release.model) or (
            release.source_format == "bundled" and release.model in list_models())  # registered short names
    else:
        assert release.model_class_name in ("HookedUNet", "HookedDiT") and DIFFUSION_HOOK.match(sae.hook_name)
        # the conditional CFG branch, except the one SAE trained on the unconditional branch, which says so in its id
        assert sae.cfg_branch == ("uncond" if sae.sae_id.endswith(".conditioned.uncond") else "cond")
    assert sae.input_kind == ("block_middle" if transcoder else KIND_OF_HOOK[hook_kind])
    if release.source_format == "prisma":  # the repo name encodes layer, hook and token set
        repo = sae.hub_repo.split("/", 1)[1]
        layer = re.search(r"(?:layer[-_]|CLS_|Spatial_max_|all_patches_)(\d+)", repo)
        assert layer and sae.hook_name.startswith(f"blocks.{layer.group(1)}.")
        assert sae.hook_name.endswith(re.search(r"(resid_post|mlp_out)", repo).group(1))
        policy = "cls" if ("cls_only" in repo or "CLS_" in repo) else "patches" if "Spatial" in repo else "all"
        assert sae.token_policy == policy
        assert sae.d_sae == 64 * sae.d_in and sae.hub_path.endswith(".pt")
    elif release.source_format == "sdxl_unbox" and sae.path:
        assert unbox_hook(sae.path) == sae.hook_name
        assert f"_k{sae.k}_hidden{sae.d_sae}_" in sae.path
    elif release.source_format == "sparsify":
        assert sparsify_hook(sae.path) == sae.hook_name
    elif release.source_format == "saev":
        assert sae.token_policy == "patches" and sae.path == "sae.pt" and sae.d_sae == 32 * sae.d_in  # "24K" = x32
    if sae.l0 is not None:
        assert sae.l0 > 0
    if sae.variance_explained is not None:
        assert 0 < sae.variance_explained <= 1


def test_shipped_releases_are_in_sae_lens_directory_with_their_loaders():
    directory = get_pretrained_saes_directory()
    for name, release in SHIPPED.items():
        lookup = directory[name]
        assert lookup.repo_id == release.repo_id and lookup.model == release.model
        assert lookup.conversion_func == FORMATS[release.source_format]
        assert psl.NAMED_PRETRAINED_SAE_LOADERS[lookup.conversion_func] is not None
        assert psl.NAMED_PRETRAINED_SAE_CONFIG_GETTERS[lookup.conversion_func] is not None
        for sae_id, sae in release.saes.items():
            assert lookup.saes_map[sae_id] == sae.path
            if sae.l0 is not None:
                assert lookup.expected_l0[sae_id] == sae.l0
    rec = directory["prisma-clip-vit-b-32-vanilla-x64"]
    assert rec.expected_l0["blocks.2.hook_resid_post"] == 717.84
    assert rec.saes_map["blocks.11.hook_mlp_out"].startswith(
        "sparse-autoencoder-clip-b-32-sae-vanilla-x64-layer-11-hook_mlp_out-l1-5e-05/")


def _fixture_release(hub, test_release, name: str) -> None:
    hub.write_repo("registry-test/prisma", {"config.json": json.dumps(prisma_config(1, "hook_resid_post", 8, 2)),
                                            "weights.pt": torch_bytes(prisma_state(8, 16))})
    test_release(name, {"format": "prisma", "repo_id": "registry-test/prisma", "model": "open-clip:ViT-B-32/openai",
                        "model_class_name": "HookedViT",
                        "defaults": {"token_policy": "all", "input_kind": "block_output"},
                        "saes": [{"id": "blocks.1.hook_resid_post", "path": "weights.pt"}]})


def test_releases_survive_sae_lens_cache_clear(hub, test_release):
    _fixture_release(hub, test_release, "test-registry-cache")
    get_pretrained_saes_directory.cache_clear()  # SAELens rebuilds its dict from its own YAML on the next call...
    sae = SAE.from_pretrained("test-registry-cache", "blocks.1.hook_resid_post")  # ...which SAE.from_pretrained makes
    assert sae.cfg.metadata.hook_name == "blocks.1.hook_resid_post"
    directory = get_pretrained_saes_directory()
    assert "prisma-clip-vit-b-32-vanilla-x64" in directory and "test-registry-cache" in directory  # ours are back
    assert "gpt2-small-res-jb" in directory  # SAELens's own releases are untouched


def test_register_releases_is_idempotent_and_offline(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network used")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    before = dict(get_pretrained_saes_directory())
    loaders = dict(psl.NAMED_PRETRAINED_SAE_LOADERS)
    start = time.perf_counter()
    register_releases()
    register_releases()
    elapsed = time.perf_counter() - start
    after = get_pretrained_saes_directory()
    assert after.keys() == before.keys()
    assert all(after[k] is before[k] for k in before)  # nothing replaced or duplicated
    assert psl.NAMED_PRETRAINED_SAE_LOADERS.keys() == loaders.keys()
    assert elapsed < 1.0
    start = time.perf_counter()
    load_release_file()  # what the first registration parses
    assert time.perf_counter() - start < 1.0


def test_list_releases_filters():
    table = list_releases(model="sdxl-turbo")
    assert {r.hook_name for r in table} == {"down_blocks.2.attentions.1.hook_update", "mid_block.attentions.0.hook_update",
                                            "up_blocks.0.attentions.0.hook_update", "up_blocks.0.attentions.1.hook_update"}
    mlp = list_releases(hook="blocks.*.hook_mlp_out", release="topk64")
    assert len(mlp) == 12 and all(r.token_policy == "cls" for r in mlp)
    layer7 = list_releases(model="dinov3-vitb16", hook="blocks.7.")
    assert [r.sae_id for r in layer7] == ["blocks.7.hook_resid_post/<run_id>"]
    text = str(list_releases(model="flux"))
    assert "transformer_blocks.18.hook_update" in text and "release" in text.splitlines()[0]
    assert list_releases(model="no-such-model") == []


def test_cli_releases(capsys):
    assert main(["releases", "--model", "sdxl-turbo"]) == 0
    out = capsys.readouterr().out
    # one block per release: its name once, then one row per SAE
    assert out.count("sdxl-unbox-sdxl-turbo") == 1 and "(4 SAEs)" in out
    assert all(out.count(f"{hook}  ") == 1 for hook in ("down_blocks.2.attentions.1.hook_update",
                                                       "mid_block.attentions.0.hook_update",
                                                       "up_blocks.0.attentions.0.hook_update",
                                                       "up_blocks.0.attentions.1.hook_update"))
    assert max(len(line) for line in out.splitlines()) <= 120
    assert main(["releases", "--hook", "up_blocks.1.attentions.2", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["release"], r["hook_name"]) for r in rows] == [("saeuron-sd15-unlearncanvas", "up_blocks.1.attentions.2.hook_out")]
    assert main(["releases", "--runs", "no-such-release"]) == 2
    assert "Unknown multimodal release 'no-such-release'" in capsys.readouterr().err
    assert main([]) == 2


def test_console_script_is_declared():
    from importlib.metadata import entry_points

    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    assert scripts.get("sae-lens-mm") == "sae_lens_multimodal.cli:main"


def test_docs_table_lists_every_release():
    text = DOCS.read_text(encoding="utf-8")
    for name in registered_releases().keys() & SHIPPED.keys():
        assert f"`{name}`" in text, name


def test_config_getters_match_the_loaded_sae(hub, test_release):
    """SAELens's load_sae_config_from_huggingface uses our config getters; they agree with the full load."""
    from safetensors.torch import save
    from sae_lens.loading.pretrained_sae_loaders import load_sae_config_from_huggingface

    from tests.pretrained.test_saev import SCHEMAS, saev_file, saev_state
    from tests.pretrained.test_sdxl_unbox import unbox_files, unbox_spec
    from tests.pretrained.test_sparsify import saeuron_cfg, sparsify_state, spec

    _fixture_release(hub, test_release, "test-getter-prisma")
    hub.write_repo("getter-test/saev", {"sae.pt": saev_file(SCHEMAS["5-batchtopk-threshold"][0], saev_state(threshold=0.2))})
    test_release("test-getter-saev", {"format": "saev", "repo_id": "getter-test/saev", "model": "open-clip:ViT-B-16/openai",
                                      "model_class_name": "HookedViT",
                                      "defaults": {"token_policy": "patches", "input_kind": "block_output"},
                                      "saes": [{"id": "blocks.10.hook_resid_post", "path": "sae.pt"}]})
    files, _, _ = unbox_files(8, 32, 3)
    hub.write_repo("getter-test/unbox", files)
    test_release("test-getter-unbox", unbox_spec("getter-test/unbox", "mid_block.attentions.0.hook_update", ""))
    hub.write_repo("getter-test/sparsify", {"unet.mid_block.attentions.0/cfg.json": json.dumps(saeuron_cfg(8, 2, unit_norm=True)),
                                            "unet.mid_block.attentions.0/sae.safetensors": save(sparsify_state(8, 32))})
    test_release("test-getter-sparsify", spec("getter-test/sparsify", "mid_block.attentions.0.hook_out",
                                              "unet.mid_block.attentions.0"))
    for release, sae_id in [("test-getter-prisma", "blocks.1.hook_resid_post"), ("test-getter-saev", "blocks.10.hook_resid_post"),
                            ("test-getter-unbox", "mid_block.attentions.0.hook_update"),
                            ("test-getter-sparsify", "mid_block.attentions.0.hook_out")]:
        cfg = load_sae_config_from_huggingface(release, sae_id)
        sae = SAE.from_pretrained(release, sae_id)
        assert (cfg["architecture"], cfg["d_in"], cfg["d_sae"]) == (sae.cfg.architecture(), sae.cfg.d_in, sae.cfg.d_sae)
        assert cfg["metadata"]["hook_name"] == sae.cfg.metadata.hook_name == sae_id
        assert cfg["normalize_activations"] == sae.cfg.normalize_activations


def test_unverified_model_defers_to_the_files_model_name(hub, test_release):
    hub.write_repo("registry-test/dino", {
        "config.json": json.dumps(prisma_config(1, "hook_resid_post", 8, 2, model_name="facebook/dino-vitb8")),
        "weights.pt": torch_bytes(prisma_state(8, 16))})
    test_release("test-registry-dino", {
        "format": "prisma", "repo_id": "registry-test/dino", "model": "facebook/dino-vitb16", "model_class_name": "HookedViT",
        "defaults": {"token_policy": "all", "input_kind": "block_output", "unverified": ["model"]},
        "saes": [{"id": "blocks.1.hook_resid_post", "path": "weights.pt"}]})
    meta = SAE.from_pretrained("test-registry-dino", "blocks.1.hook_resid_post").cfg.metadata
    assert meta.model_name == "facebook/dino-vitb8" and meta.unverified == ["model"]


def test_shipped_yaml_is_what_the_generator_writes():
    import importlib.util

    import yaml

    script = Path(__file__).resolve().parents[2] / "sae_lens_multimodal" / "world" / "training" / "build_releases_yaml.py"
    module_spec = importlib.util.spec_from_file_location("build_releases_yaml", script)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    shipped = yaml.safe_load(module.RELEASES_YAML.read_text(encoding="utf-8"))
    assert module.RELEASES_YAML == Path(__file__).resolve().parents[2] / "sae_lens_multimodal" / "pretrained" / "releases.yaml"
    assert shipped == module.build()
