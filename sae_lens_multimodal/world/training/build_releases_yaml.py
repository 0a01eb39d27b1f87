"""Developer tool: regenerate ``releases.yaml`` from the published facts below.

    python -m sae_lens_multimodal.world.training.build_releases_yaml
    python sae_lens_multimodal/world/training/build_releases_yaml.py     (the same; it imports nothing of the package)

Sources of the facts: ../shared/reference/release-formats.md (formats, repo patterns, models, hooks) and the
published statistics tables of ViT-Prisma (README "Suite of Pretrained Vision SAE Weights" and
docs/sae_table.md: repo ids, average L0, % explained variance). Not imported at run time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from sae_lens_multimodal.core.atomic import atomic_write_text

PRISMA_CLIP_MODEL = "open-clip:laion/CLIP-ViT-B-32-DataComp.XL-s13B-b90K"
PRISMA_FILE_VANILLA = "n_images_2600058.pt"

# ViT-Prisma README, "CLIP Vanilla SAEs (All Patches)": layer -> {sublayer: (l1 coeff, % expl. var., avg L0)}
PRISMA_CLIP_RECOMMENDED = {
    0: {"mlp_out": ("1e-05", 98.7, 604.44), "resid_post": ("1e-05", 98.6, 1110.9)},
    1: {"mlp_out": ("1e-05", 98.4, 1476.8), "resid_post": ("1e-05", 98.3, 1508.4)},
    2: {"mlp_out": ("1e-05", 98.0, 1799.7), "resid_post": ("5e-05", 90.6, 717.84)},
    3: {"mlp_out": ("1e-05", 98.1, 1893.4), "resid_post": ("1e-05", 98.1, 2053.9)},
    4: {"mlp_out": ("1e-05", 98.1, 1901.2), "resid_post": ("1e-05", 98.0, 2068.3)},
    5: {"mlp_out": ("1e-05", 98.2, 1761.5), "resid_post": ("1e-05", 98.1, 1953.8)},
    6: {"mlp_out": ("1e-05", 98.3, 1598.0), "resid_post": ("1e-05", 98.2, 1717.5)},
    7: {"mlp_out": ("1e-05", 98.2, 1535.3), "resid_post": ("1e-05", 98.2, 1688.4)},
    8: {"mlp_out": ("1e-05", 97.8, 1074.5), "resid_post": ("1e-05", 98.2, 1570.8)},
    9: {"mlp_out": ("1e-05", 97.6, 856.68), "resid_post": ("1e-05", 98.2, 1533.5)},
    10: {"mlp_out": ("1e-05", 98.1, 788.49), "resid_post": ("1e-05", 98.4, 1292.6)},
    11: {"mlp_out": ("5e-05", 89.7, 748.14), "resid_post": ("1e-05", 98.4, 1405.0)},
}
PRISMA_L1_COEFFS = ("1e-05", "5e-05", "8e-05", "0.0001")

# docs/sae_table.md, "Top K SAEs (CLS only, k = 64)": layer -> % explained variance (resid_post)
PRISMA_TOPK_CLS_EV = {0: 90, 1: 96, 2: 96, 3: 95, 4: 94, 5: 93, 6: 92, 7: 90, 8: 87, 9: 85, 10: 86, 11: 84}

# docs/sae_table.md, "Vanilla SAEs (CLS only)": layer -> (repo suffix, % expl. var., avg CLS L0)
PRISMA_CLS_SWEEP = {
    0: ("936.799987792969-82", 82, 934.83), 1: ("314.175018310547-85", 85, 314.13),
    2: ("711.121887207031-96", 96, 711.84), 3: ("686.334411621094-95", 95, 687.41),
    4: ("682.543762207031-95", 95, 681.08), 5: ("510.356262207031-94", 94, 506.77),
    6: ("430.556243896484-92", 92, 423.70), 7: ("492.959381103516-88", 88, 492.68),
    8: ("635.018737792969-76", 76, 623.01), 9: ("518.621887207031-74", 74, 521.90),
    10: ("552.512512207031-74", 74, 533.94), 11: ("383.75-65", 65, 386.09),
}
# docs/sae_table.md, "Vanilla Spatial Patches" (no layer 10 listed): layer -> (repo suffix, % EV, avg L0)
PRISMA_SPATIAL_SWEEP = {
    0: ("989.203430175781-99", 99, 989.19), 1: ("757.82958984375-99", 99, 757.83),
    2: ("1007.89801025391-99", 99, 1007.89), 3: ("935.601989746094-99", 99, 935.06),
    4: ("965.410095214844-99", 99, 965.15), 5: ("964.674072265625-99", 99, 966.38),
    6: ("1006.57165527344-99", 99, 1006.62), 7: ("984.1376953125-99", 99, 984.19),
    8: ("965.125-99", 99, 965.12), 9: ("854.891540527344-99", 99, 854.92),
    11: ("829.0498046875-99", 99, 829.09),
}
# ViT-Prisma README, "DINO (Vanilla, all patches)": layer -> (repo suffix, avg L0, % EV)
PRISMA_DINO = {
    0: ("507-98", 507, 98), 1: ("549-95", 549, 95), 2: ("661-95", 812, 95), 3: ("989-95", 989, 95),
    4: ("876-99", 876, 99), 5: ("1001-98", 1001, 98), 6: ("962-99", 962, 99), 7: ("1086-98", 1086, 98),
    8: ("530-90", 530, 90), 9: ("1105-99", 1105, 99), 10: ("835-99", 835, 99), 11: ("1085-99", 1085, 99),
}

INPUT_KIND = {"resid_post": "block_output", "mlp_out": "mlp_output"}


def _vanilla_repo(layer: int, sub: str, coeff: str) -> str:
    return f"sparse-autoencoder-clip-b-32-sae-vanilla-x64-layer-{layer}-hook_{sub}-l1-{coeff}"


def _prisma_clip_base(description: str, **defaults: Any) -> dict[str, Any]:
    return {
        "format": "prisma",
        "repo_id": "Prisma-Multimodal",
        "model": PRISMA_CLIP_MODEL,
        "model_class_name": "HookedViT",
        "description": description,
        "defaults": {"d_in": 768, "d_sae": 49152, "source_model": PRISMA_CLIP_MODEL, **defaults},
        "saes": [],
    }


def build() -> dict[str, Any]:
    releases: dict[str, Any] = {}

    rec = _prisma_clip_base(
        "ViT-Prisma's recommended CLIP ViT-B/32 SAEs (vanilla, x64, ReLU, all 50 tokens): L1 coefficient 1e-05 for "
        "every layer and hook except layer-2 resid_post and layer-11 mlp_out (5e-05). Published L0 / explained variance.",
        token_policy="all", architecture="standard", context_size=50,
    )
    for layer, subs in PRISMA_CLIP_RECOMMENDED.items():
        for sub in ("resid_post", "mlp_out"):
            coeff, ev, l0 = subs[sub]
            rec["saes"].append({
                "id": f"blocks.{layer}.hook_{sub}", "path": f"{_vanilla_repo(layer, sub, coeff)}/{PRISMA_FILE_VANILLA}",
                "input_kind": INPUT_KIND[sub], "l0": l0, "variance_explained": round(ev / 100, 4),
            })
    releases["prisma-clip-vit-b-32-vanilla-x64"] = rec

    for coeff in PRISMA_L1_COEFFS:
        rel = _prisma_clip_base(
            f"ViT-Prisma CLIP ViT-B/32 SAEs (vanilla, x64, ReLU, all 50 tokens) with L1 coefficient {coeff}, every "
            "layer and hook (repo pattern from release-formats.md; config.json is authoritative).",
            token_policy="all", architecture="standard", context_size=50,
        )
        for layer in range(12):
            for sub in ("resid_post", "mlp_out"):
                entry: dict[str, Any] = {
                    "id": f"blocks.{layer}.hook_{sub}",
                    "path": f"{_vanilla_repo(layer, sub, coeff)}/{PRISMA_FILE_VANILLA}",
                    "input_kind": INPUT_KIND[sub],
                }
                rec_coeff, ev, l0 = PRISMA_CLIP_RECOMMENDED[layer][sub]
                if rec_coeff == coeff:
                    entry.update(l0=l0, variance_explained=round(ev / 100, 4))
                rel["saes"].append(entry)
        releases[f"prisma-clip-vit-b-32-vanilla-x64-l1-{coeff}"] = rel

    topk = _prisma_clip_base(
        "ViT-Prisma CLIP ViT-B/32 TopK (k=64) SAEs trained on the CLS token only (context_size 1). Explained "
        "variance published for resid_post.",
        token_policy="cls", architecture="topk", k=64, context_size=1,
    )
    for layer in range(12):
        for sub in ("resid_post", "mlp_out"):
            entry = {"id": f"blocks.{layer}.hook_{sub}",
                     "path": f"sae-top_k-64-cls_only-layer_{layer}-hook_{sub}/weights.pt", "input_kind": INPUT_KIND[sub]}
            if sub == "resid_post":
                entry.update(l0=64, variance_explained=PRISMA_TOPK_CLS_EV[layer] / 100)
            topk["saes"].append(entry)
    releases["prisma-clip-vit-b-32-topk64-cls-only"] = topk

    cls_sweep = _prisma_clip_base(
        "ViT-Prisma ImageNet-sweep CLIP ViT-B/32 SAEs (vanilla, x64, ReLU) trained on the CLS token only; weights.pt "
        "is a {cfg, state_dict} pickle. L0 = published average CLS L0.",
        token_policy="cls", architecture="standard", input_kind="block_output",
    )
    for layer, (suffix, ev, l0) in PRISMA_CLS_SWEEP.items():
        cls_sweep["saes"].append({
            "id": f"blocks.{layer}.hook_resid_post",
            "path": f"imagenet-sweep-vanilla-x64-CLS_{layer}-hook_resid_post-{suffix}/weights.pt",
            "l0": l0, "variance_explained": ev / 100,
        })
    releases["prisma-clip-vit-b-32-vanilla-x64-cls-only"] = cls_sweep

    spatial = _prisma_clip_base(
        "ViT-Prisma ImageNet-sweep CLIP ViT-B/32 SAEs (vanilla, x64, ReLU) trained on the 49 spatial patch tokens "
        "(CLS excluded); weights.pt is a {cfg, state_dict} pickle. No layer 10 is published.",
        token_policy="patches", architecture="standard", input_kind="block_output",
    )
    for layer, (suffix, ev, l0) in PRISMA_SPATIAL_SWEEP.items():
        spatial["saes"].append({
            "id": f"blocks.{layer}.hook_resid_post",
            "path": f"imagenet-sweep-vanilla-x64-Spatial_max_{layer}-hook_resid_post-{suffix}/weights.pt",
            "l0": l0, "variance_explained": ev / 100,
        })
    releases["prisma-clip-vit-b-32-vanilla-x64-patches-only"] = spatial

    sweep = _prisma_clip_base(
        "The ViT-Prisma ImageNet-sweep SAE documented in release-formats.md: despite 'vanilla' in its name a TopK "
        "(k=64) SAE on all tokens with layer_norm input normalisation.",
        token_policy="all", input_kind="block_output", architecture="topk", k=64,
        normalization={"kind": "layer_norm", "status": "applied by the SAE (normalize_activations='layer_norm')"},
    )
    sweep["saes"].append({
        "id": "blocks.2.hook_resid_post",
        "path": "imagenet-sweep-vanilla-x64-all_patches_2-hook_resid_post-64.0-68/weights.pt",
        "l0": 64.0, "variance_explained": 0.68,
    })
    releases["prisma-clip-vit-b-32-imagenet-sweep-all-patches"] = sweep

    dino = {
        "format": "prisma",
        "repo_id": "Prisma-Multimodal",
        "model": "facebook/dino-vitb16",
        "model_class_name": "HookedViT",
        "description": "ViT-Prisma DINO ViT-B SAEs (vanilla, x64, ReLU, all tokens), resid_post of every layer. The "
                       "base checkpoint and weights file name are unverified (docs say 'DINO-B-32'); the SAE's "
                       "config.json model_name is used when it differs.",
        "defaults": {"d_in": 768, "d_sae": 49152, "token_policy": "all", "input_kind": "block_output",
                     "architecture": "standard", "unverified": ["model", "path"]},
        "saes": [
            {"id": f"blocks.{layer}.hook_resid_post",
             "path": f"DINO-vanilla-x64-all_patches_{layer}-resid_post-{suffix}/weights.pt",
             "l0": l0, "variance_explained": ev / 100}
            for layer, (suffix, l0, ev) in PRISMA_DINO.items()
        ],
    }
    releases["prisma-dino-vit-b-vanilla-x64"] = dino

    saev_norm = {
        "kind": "saev_mean_scale", "status": "unknown",
        "formula": "x' = (clamp(x, -1e5, 1e5) - mean) / scale, scale = E||x - mean||_2 / sqrt(d_in)",
        "note": "mean and scale were computed from 2^19 training patches and are not published; compute them and "
                "call sae_lens_multimodal.pretrained.fold_saev_normalization(sae, mean, scale)",
    }
    saev_common = {"d_in": 768, "d_sae": 24576, "token_policy": "patches", "input_kind": "block_output",
                   "architecture": "standard", "normalization": saev_norm}
    releases["saev-clip-vit-b-16-in1k"] = {
        "format": "saev", "repo_id": "osunlp/SAE_CLIP_24K_ViT-B-16_IN1K", "model": "open-clip:ViT-B-16/openai",
        "model_class_name": "HookedViT",
        "description": "saev SAE-V release: OpenAI CLIP ViT-B/16, output of block 10 (layer -2), 196 patch tokens "
                       "(CLS excluded), ImageNet-1k, 768 -> 24576 ReLU (W&B run usvhngx4).",
        "defaults": {**saev_common, "source_model": "open_clip ViT-B-16 / openai: visual.transformer.resblocks[10]"},
        "saes": [{"id": "blocks.10.hook_resid_post", "path": "sae.pt"}],
    }
    releases["saev-dinov2-vit-b-14-reg-in1k"] = {
        "format": "saev", "repo_id": "osunlp/SAE_DINOv2_24K_ViT-B-14_IN1K", "model": "facebook/dinov2-with-registers-base",
        "model_class_name": "HookedViT",
        "description": "saev SAE-V release: DINOv2 ViT-B/14 with 4 registers, output of block 10, 256 patch tokens "
                       "(CLS and registers excluded), ImageNet-1k, 768 -> 24576 ReLU (W&B run oebd6e6i).",
        "defaults": {**saev_common, "source_model": "torch.hub facebookresearch/dinov2 dinov2_vitb14_reg: blocks[10]",
                     "unverified": ["model"],
                     "notes": "trained on torch.hub dinov2_vitb14_reg; facebook/dinov2-with-registers-base is its "
                              "transformers port"},
        "saes": [{"id": "blocks.10.hook_resid_post", "path": "sae.pt"}],
    }
    releases["saev-bioclip-vit-b-16-inat21"] = {
        "format": "saev", "repo_id": "osunlp/SAE_BioCLIP_24K_ViT-B-16_iNat21", "model": "open-clip:hf-hub:imageomics/bioclip",
        "model_class_name": "HookedViT",
        "description": "saev SAE-V release: BioCLIP ViT-B/16 on iNat21, 768 -> 24576 ReLU. Layer (-2 = block 10) and "
                       "token set (patches) are assumed, not verified.",
        "defaults": {**saev_common, "source_model": "BioCLIP ViT-B/16", "unverified": ["hook", "tokens"]},
        "saes": [{"id": "blocks.10.hook_resid_post", "path": "sae.pt"}],
    }
    dinov3 = (
        ("saev-dinov3-vit-s-16-in1k", "osunlp/SAE_DINOv3_ViT-S-16_IN1K", "facebook/dinov3-vits16-pretrain-lvd1689m",
         384, list(range(6, 12)), "standard", "ReLU (Matryoshka)"),
        ("saev-dinov3-vit-b-16-in1k", "osunlp/SAE_DINOv3_ViT-B-16_IN1K", "facebook/dinov3-vitb16-pretrain-lvd1689m",
         768, list(range(6, 12)), "standard", "ReLU (Matryoshka)"),
        ("saev-dinov3-vit-l-16-in1k", "osunlp/SAE_DINOv3_ViT-L-16_IN1K", "facebook/dinov3-vitl16-pretrain-lvd1689m",
         1024, list(range(13, 24, 2)), "standard", "ReLU (Matryoshka)"),
        ("saev-dinov3-topk-vit-l-16-in1k", "osunlp/SAE_DINOv3_TopK_ViT-L-16_IN1K",
         "facebook/dinov3-vitl16-pretrain-lvd1689m", 1024, list(range(13, 24, 2)), "topk", "TopK, k in {16, 64, 256}"),
    )
    for name, repo, model, d_in, layers, arch, act in dinov3:
        releases[name] = {
            "format": "saev", "repo_id": repo, "model": model, "model_class_name": "HookedViT",
            "description": f"saev DINOv3 release: block outputs of layers {layers[0]}-{layers[-1]}, patch tokens "
                           f"(CLS and 4 storage tokens excluded), ImageNet-1k, {d_in} -> 16384 {act}; up to 6 runs per "
                           "layer listed in manifest.jsonl (SAE id = hook/run id).",
            "manifest": "manifest.jsonl",
            "layers": layers,
            "sae_id_template": "blocks.{layer}.hook_resid_post/{run_id}",
            "hook_name_template": "blocks.{layer}.hook_resid_post",
            "path_template": "layer_{layer}/{run_id}/sae.pt",
            "defaults": {"d_in": d_in, "d_sae": 16384, "token_policy": "patches", "input_kind": "block_output",
                         "architecture": arch, "normalization": {"kind": "none"}},
        }

    unbox_blocks = ("down_blocks.2.attentions.1", "mid_block.attentions.0", "up_blocks.0.attentions.0",
                    "up_blocks.0.attentions.1")
    releases["sdxl-unbox-sdxl-turbo"] = {
        "format": "sdxl_unbox", "repo_id": "surokpro2/sdxl-saes", "model": "stabilityai/sdxl-turbo",
        "model_class_name": "HookedUNet",
        "description": "sdxl-unbox (SDLens) TopK SAEs on the residual update (output - input) of four SDXL-Turbo "
                       "UNet transformer blocks, 1 step, guidance 0, 512 px (256 tokens per image), 1280 -> 5120, k=10. "
                       "Hub folder layout assumed to match the GitHub checkpoints/ naming.",
        "defaults": {"d_in": 1280, "d_sae": 5120, "k": 10, "architecture": "topk", "token_policy": "all",
                     "input_kind": "residual_update", "cfg_branch": "cond", "guidance_scale": 0.0,
                     "timesteps": "single step (SDXL-Turbo, 1 inference step)", "unverified": ["path"]},
        "saes": [
            {"id": f"{block}.hook_update", "path": f"unet.{block}_k10_hidden5120_auxk256_bs4096_lr0.0001/final"}
            for block in unbox_blocks
        ],
    }
    releases["sdxl-unbox-flux-schnell"] = {
        "format": "sdxl_unbox", "repo_id": "antoniomari/SAE_flux_18", "model": "black-forest-labs/FLUX.1-schnell",
        "model_class_name": "HookedDiT",
        "description": "SDLens-format TopK SAE on the image-stream residual update of FLUX.1-schnell double-stream "
                       "block 18 (image tokens only), 3072 -> 12288.",
        "defaults": {"d_in": 3072, "d_sae": 12288, "architecture": "topk", "token_policy": "all",
                     "input_kind": "residual_update", "cfg_branch": "cond", "unverified": ["k", "timesteps"],
                     "notes": "image stream only: text tokens are not part of this hook"},
        "saes": [{"id": "transformer_blocks.18.hook_update", "path": ""}],
    }
    saeuron_defaults = {
        "d_in": 1280, "d_sae": 20480, "k": 32, "architecture": "topk", "token_policy": "all",
        "input_kind": "block_output", "cfg_branch": "cond", "guidance_scale": 9.0,
        "timesteps": "every step of 50 DDIM steps", "unverified": ["model"],
    }
    releases["saeuron-sd15-unlearncanvas"] = {
        "format": "sparsify", "repo_id": "bcywinski/SAeUron", "model": "stable-diffusion-v1-5/stable-diffusion-v1-5",
        "model_class_name": "HookedUNet",
        "description": "SAeUron TopK SAEs (sparsify format) on the full output of SD v1.5 UNet transformer blocks, "
                       "conditional half of CFG (guidance 9.0), all 50 DDIM steps, 1280 -> 20480, k=32. Trained on the "
                       "UnlearnCanvas fine-tune of SD v1.5 (load that fine-tune for faithful activations).",
        "defaults": {**saeuron_defaults, "notes": "trained on UnlearnCanvas fine-tuned SD v1.5 activations"},
        "saes": [
            {"id": "up_blocks.1.attentions.1.hook_out", "path": "unet.up_blocks.1.attentions.1",
             "notes": "objects; trained on UnlearnCanvas fine-tuned SD v1.5 activations"},
            {"id": "up_blocks.1.attentions.2.hook_out", "path": "unet.up_blocks.1.attentions.2",
             "notes": "styles; trained on UnlearnCanvas fine-tuned SD v1.5 activations"},
        ],
    }
    releases["saeuron-sd15-coco"] = {
        "format": "sparsify", "repo_id": "bcywinski/SAeUron", "model": "stable-diffusion-v1-5/stable-diffusion-v1-5",
        "model_class_name": "HookedUNet",
        "description": "SAeUron COCO SAE (sparsify format) on the full output of UNet block up_blocks.1.attentions.1; "
                       "base model unverified.",
        "defaults": {**saeuron_defaults, "notes": "COCO variant; base model unverified"},
        "saes": [{"id": "up_blocks.1.attentions.1.hook_out", "path": "coco/unet.up_blocks.1.attentions.1"}],
    }
    releases.update(bundled_releases())
    return releases


# Bundled releases (format ``bundled``, loader ``mm_bundled``): SAEs shipped inside this package in SAELens's
# own layout under ``world/weights/saes/<release>/<sae_id>/``. Facts (EV, L0, dead fraction, training data)
# live in each SAE's cfg.json metadata, written by the training script named in ``regenerate``.
# To add one: (1) write the folder (cfg.json + sae_weights.safetensors, e.g. with TrainingSAE.save_inference_model),
# (2) add an entry below, (3) rerun this script.
BUNDLED_ROOT = "bundled:sae_lens_multimodal/world/weights/saes"
TRAIN_SAES = "python -m sae_lens_multimodal.world.training.train_saes"


def bundled_releases() -> dict[str, Any]:
    return {
        "shapes-clip-saes": {
            "format": "bundled", "repo_id": f"{BUNDLED_ROOT}/shapes-clip-saes", "model": "shapes-clip",
            "model_class_name": "HookedViT",
            "description": "Bundled TopK SAE (64 -> 512, k=8) on the residual stream after block 2 of the shapes-world "
                           "CLIP's vision tower, all 65 tokens, trained on shapes-world images in which every factor "
                           "varies. Ships with the package: loads offline. Figures in cfg.metadata.evaluation.",
            "regenerate": f"{TRAIN_SAES} --which clip",
            "defaults": {"token_policy": "all", "input_kind": "block_output", "architecture": "topk", "d_in": 64,
                         "d_sae": 512, "k": 8, "context_size": 65, "source_model": "shapes-clip (vision tower)"},
            # l0 / variance_explained: cfg.json metadata.evaluation of the shipped weights (1000 fresh images)
            "saes": [{"id": "blocks.2.hook_resid_post", "path": "blocks.2.hook_resid_post", "l0": 8.0,
                      "variance_explained": 0.9695}],
        },
        "shapes-clip-layer-saes": {
            "format": "bundled", "repo_id": f"{BUNDLED_ROOT}/shapes-clip-layer-saes", "model": "shapes-clip",
            "model_class_name": "HookedViT",
            "description": "Bundled TopK SAEs (64 -> 512, k=8) on the residual stream after every block (0-3) of the "
                           "shapes-world CLIP's vision tower, all 65 tokens, the recipe of shapes-clip-saes: one SAE "
                           "per layer, for sparse feature circuits with edges between layers (docs/circuits.md). Ships "
                           "with the package: loads offline. Figures in cfg.metadata.evaluation.",
            "regenerate": f"{TRAIN_SAES} --which clip-layers",
            "defaults": {"token_policy": "all", "input_kind": "block_output", "architecture": "topk", "d_in": 64,
                         "d_sae": 512, "k": 8, "context_size": 65, "source_model": "shapes-clip (vision tower)"},
            # l0 / variance_explained: cfg.json metadata.evaluation of the shipped weights (1000 fresh images)
            "saes": [{"id": f"blocks.{layer}.hook_resid_post", "path": f"blocks.{layer}.hook_resid_post", "l0": 8.0,
                      "variance_explained": ev} for layer, ev in ((0, 0.9869), (1, 0.9793), (2, 0.9691), (3, 0.9629))],
        },
        "shapes-diffusion-saes": {
            "format": "bundled", "repo_id": f"{BUNDLED_ROOT}/shapes-diffusion-saes", "model": "shapes-diffusion",
            "model_class_name": "HookedUNet",
            "description": "Bundled timestep-bucketed SAE (4 buckets of 5 DPM-Solver steps, TopK 64 -> 256 each, k=8) on "
                           "the output of the shapes-diffusion UNet's up_blocks.0.attentions.1 (8x8 channel-last "
                           "tokens), conditional branch of guidance-2 generations; and, under the id "
                           "'up_blocks.0.attentions.1.hook_out.conditioned', a timestep-conditioned SAE (one TopK "
                           "dictionary 64 -> 512, k=8, for every timestep; encoder scale and bias per bucket) on the same "
                           "hook and data; under '...hook_out.conditioned.uncond' the same recipe on the unconditional "
                           "branch of the same generations. Ship with the package: load offline. Figures in "
                           "cfg.metadata.evaluation.",
            "regenerate": f"{TRAIN_SAES} --which diffusion (the .conditioned SAE: python -m "
                          "sae_lens_multimodal.world.training.train_conditioned_sae [--cfg-branch uncond])",
            "defaults": {"token_policy": "all", "input_kind": "block_output", "architecture": "timestep_bucketed",
                         "d_in": 64, "d_sae": 256, "k": 8, "cfg_branch": "cond", "guidance_scale": 2.0,
                         "timesteps": "every step of 20 DPM-Solver++ steps; buckets [0,275) [275,525) [525,775) "
                                      "[775,1000)",
                         "source_model": "shapes-diffusion (UNet2DConditionModel)"},
            # l0 / variance_explained: cfg.json metadata.evaluation of the shipped weights (48 fresh generations)
            "saes": [{"id": "up_blocks.0.attentions.1.hook_out", "path": "up_blocks.0.attentions.1.hook_out",
                      "l0": 8.0, "variance_explained": 0.9896},
                     # one dictionary for every timestep (encoder scale/bias per bucket), same hook and data;
                     # evaluated on the same 48 fresh generations (docs/diffusion-time.md)
                     {"id": "up_blocks.0.attentions.1.hook_out.conditioned",
                      "path": "up_blocks.0.attentions.1.hook_out.conditioned",
                      "hook_name": "up_blocks.0.attentions.1.hook_out", "architecture": "timestep_conditioned",
                      "d_sae": 512, "l0": 8.0, "variance_explained": 0.9863,
                      "notes": "timestep-conditioned: one dictionary for all timesteps; regenerate with python -m "
                               "sae_lens_multimodal.world.training.train_conditioned_sae"},
                     # the same on the unconditional branch (what the noisy sample shows without the prompt);
                     # evaluated on 48 fresh generations' unconditional rows (docs/diffusion-time.md)
                     {"id": "up_blocks.0.attentions.1.hook_out.conditioned.uncond",
                      "path": "up_blocks.0.attentions.1.hook_out.conditioned.uncond",
                      "hook_name": "up_blocks.0.attentions.1.hook_out", "architecture": "timestep_conditioned",
                      "cfg_branch": "uncond", "d_sae": 512, "l0": 8.0, "variance_explained": 0.9964,
                      "notes": "timestep-conditioned, unconditional CFG branch; regenerate with python -m "
                               "sae_lens_multimodal.world.training.train_conditioned_sae --cfg-branch uncond"}],
        },
        "shapes-clip-transcoders": {
            "format": "bundled", "repo_id": f"{BUNDLED_ROOT}/shapes-clip-transcoders", "model": "shapes-clip",
            "model_class_name": "HookedViT",
            "description": "Bundled MLP transcoders (SAELens Transcoder, ReLU, 64 -> 512 -> 64) for the 4 MLPs of the "
                           "shapes-world CLIP's vision tower: each reads blocks.L.ln2.hook_normalized (the MLP's input) "
                           "and predicts blocks.L.hook_mlp_out (cfg.metadata.hook_name_out), all 65 tokens, trained with "
                           "an L1 penalty on shapes-world images. Splice with model.add_sae(tc, use_error_term=True) or "
                           "pass to find_circuit. Ships with the package: loads offline. Figures in "
                           "cfg.metadata.evaluation.",
            "regenerate": "python -m sae_lens_multimodal.world.training.train_transcoders",
            # input_kind: the MLP reads the block-middle residual stream, LayerNorm-normalised (ln2.hook_normalized)
            "defaults": {"token_policy": "all", "input_kind": "block_middle", "architecture": "transcoder",
                         "d_in": 64, "d_sae": 512, "context_size": 65, "source_model": "shapes-clip (vision tower)"},
            # l0 / variance_explained (of the MLP output): cfg.json metadata.evaluation (1000 fresh images)
            "saes": [{"id": f"blocks.{layer}.mlp", "path": f"blocks.{layer}.mlp",
                      "hook_name": f"blocks.{layer}.ln2.hook_normalized", "l0": l0, "variance_explained": ev}
                     for layer, l0, ev in ((0, 7.1, 0.9524), (1, 13.6, 0.9597), (2, 24.9, 0.9517), (3, 33.4, 0.9605))],
        },
        "shapes-clip-typographic-saes": {
            "format": "bundled", "repo_id": f"{BUNDLED_ROOT}/shapes-clip-typographic-saes",
            "model": "shapes-clip-typographic", "model_class_name": "HookedViT",
            "description": "Bundled TopK SAEs (64 -> 512, k=8) on the residual stream after blocks 0, 1 and 2 of the "
                           "typographic shapes-world CLIP's vision tower (a CLIP that reads written colour words), all "
                           "65 tokens, trained on shapes-world images half of which carry a written colour name; they "
                           "have features for rendered text (docs/typographic.md suppresses them to undo typographic "
                           "attacks). Ship with the package: load offline. Figures in cfg.metadata.evaluation.",
            "regenerate": "python -m sae_lens_multimodal.world.training.train_typographic_sae",
            "defaults": {"token_policy": "all", "input_kind": "block_output", "architecture": "topk", "d_in": 64,
                         "d_sae": 512, "k": 8, "context_size": 65,
                         "source_model": "shapes-clip-typographic (vision tower)"},
            "saes": [{"id": f"blocks.{layer}.hook_resid_post", "path": f"blocks.{layer}.hook_resid_post", "l0": 8.0,
                      "variance_explained": ev} for layer, ev in ((0, 0.9759), (1, 0.9692), (2, 0.9571))],
        },
    }


HEADER = """\
# Public vision and diffusion SAE releases, injected into SAELens's pretrained directory by
# sae_lens_multimodal.pretrained.register_releases(). GENERATED by
# `python -m sae_lens_multimodal.world.training.build_releases_yaml`; edit that script, not this file.
# Schema: see sae_lens_multimodal/pretrained/releases.py, core/sae_metadata.py and docs/releases.md.
"""


#: the file this script writes: the package's release list
RELEASES_YAML = Path(__file__).resolve().parents[2] / "pretrained" / "releases.yaml"


def main() -> None:
    out = RELEASES_YAML
    text = HEADER + yaml.safe_dump(build(), sort_keys=False, width=120, allow_unicode=True)
    atomic_write_text(out, text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
