"""sae-lens-mm cache / train / evaluate end to end on tiny local models, flags and YAML configs."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from sae_lens import SAE

from sae_lens_multimodal.cli import build_parser, main


def _subparsers():
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


@pytest.mark.parametrize("command", ["cache", "train", "evaluate"])
def test_help_documents_every_option(command, capsys):
    sub = _subparsers()[command]
    for action in sub._actions:
        assert action.help and action.help.strip(), f"{command}: {action.option_strings} has no help"
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    for action in sub._actions:
        for opt in action.option_strings:
            assert opt in text


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory):
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    model = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                               image_size=32, patch_size=8), add_pooling_layer=False)
    path = tmp_path_factory.mktemp("vit")
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    from PIL import Image

    path = tmp_path_factory.mktemp("images")
    g = torch.Generator().manual_seed(3)
    for i in range(12):
        arr = (torch.rand(48, 48, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(path / f"{i:03d}.png")
    return path


def test_cache_train_evaluate_with_flags_and_yaml(vit_dir, image_dir, tmp_path, monkeypatch):
    hook = "blocks.1.hook_resid_post"
    assert main(["cache", "--model", str(vit_dir), "--hook", hook, "--hook", "blocks.0.hook_mlp_out", "--images",
                 str(image_dir), "--out", str(tmp_path / "cache"), "--batch-size", "5", "--items-per-shard", "4",
                 "--no-progress"]) == 0
    meta = json.loads((tmp_path / "cache" / hook / "metadata.json").read_text())
    assert meta["hook_name"] == hook and meta["source"]["n_items"] == 12 and meta["token_policy"] == "all"
    # running it again resumes (nothing left to do) instead of failing or duplicating
    assert main(["cache", "--model", str(vit_dir), "--hook", hook, "--images", str(image_dir), "--out",
                 str(tmp_path / "cache"), "--no-progress"]) == 0

    config = tmp_path / "train.yaml"
    config.write_text(
        f"cache: {tmp_path / 'cache' / hook}\nout: {tmp_path / 'sae'}\narchitecture: topk\nk: 4\n"
        "d-sae: 64\ntotal_training_samples: 8000\nbatch-size: 64\nlr: 0.003\n"
    )
    import sae_lens_multimodal.training.train as train_module

    seen = {}
    real_train = train_module.train_sae
    monkeypatch.setattr(train_module, "train_sae", lambda sae, data, **kw: (seen.update(kw), real_train(sae, data, **kw))[1])
    # --lr on the command line wins over the YAML file; the rest comes from the file
    assert main(["train", "--config", str(config), "--lr", "0.002", "--model", str(vit_dir), "--hook", hook]) == 0
    assert seen["lr"] == 0.002 and seen["total_training_samples"] == 8000 and seen["batch_size"] == 64
    sae = SAE.load_from_disk(tmp_path / "sae")
    assert sae.cfg.d_sae == 64 and sae.cfg.k == 4 and sae.cfg.metadata.hook_name == hook

    out = tmp_path / "eval.json"
    assert main(["evaluate", "--sae-path", str(tmp_path / "sae"), "--cache", str(tmp_path / "cache" / hook), "--model",
                 str(vit_dir), "--images", str(image_dir), "--batch-size", "6", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert 0 < res["reconstruction"]["overall"]["explained_variance"] <= 1
    assert res["embedding_cosine_error_term"]["cosine_mean"] == pytest.approx(1.0, abs=1e-5)
    assert res["embedding_cosine"]["n_images"] == 12


def test_cli_errors_are_clear(vit_dir, image_dir, tmp_path, capsys):
    hook = "blocks.1.hook_resid_post"
    assert main(["cache", "--model", str(vit_dir), "--hook", hook, "--images", str(image_dir), "--out",
                 str(tmp_path / "c"), "--no-progress", "--max-images", "3"]) == 0
    # a cache of another hook is refused
    assert main(["train", "--cache", str(tmp_path / "c" / hook), "--out", str(tmp_path / "s"), "--hook",
                 "blocks.0.hook_resid_post", "--total-training-samples", "100"]) == 2
    assert "hook_name" in capsys.readouterr().err
    # required options may come from YAML, but must come from somewhere
    assert main(["train", "--cache", str(tmp_path / "c" / hook), "--out", str(tmp_path / "s")]) == 2
    assert "--total-training-samples is required" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rate: 1\n")
    assert main(["train", "--config", str(bad)]) == 2
    assert "Unknown option 'learning_rate'" in capsys.readouterr().err


def test_old_option_spellings_still_work_end_to_end(vit_dir, image_dir, tmp_path, capsys):
    """``--model-kind vit`` and ``evaluate --sae DIR`` run as before, with a deprecation message on stderr."""
    hook = "blocks.1.hook_resid_post"
    assert main(["cache", "--model", str(vit_dir), "--model-kind", "vit", "--hook", hook, "--images", str(image_dir),
                 "--out", str(tmp_path / "c"), "--no-progress", "--max-images", "4"]) == 0
    assert "--model-kind vit is deprecated; use --model-kind vision" in capsys.readouterr().err
    assert main(["train", "--cache", str(tmp_path / "c" / hook), "--out", str(tmp_path / "sae"), "--k", "2",
                 "--d-sae", "16", "--total-training-samples", "200", "--batch-size", "32"]) == 0
    capsys.readouterr()
    out = tmp_path / "eval.json"
    assert main(["evaluate", "--sae", str(tmp_path / "sae"), "--cache", str(tmp_path / "c" / hook),
                 "--json", str(out)]) == 0
    assert "--sae is deprecated; use --sae-path" in capsys.readouterr().err
    assert json.loads(out.read_text())["reconstruction"]["overall"]["n_rows"] > 0


# ---------------------------------------------------------------------- diffusion through the CLI
@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    diffusers = pytest.importorskip("diffusers")
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    torch.manual_seed(0)
    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    root = tmp_path_factory.mktemp("sd")
    (root / "vocab.json").write_text(json.dumps(vocab))
    (root / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(vocab_file=str(root / "vocab.json"), merges_file=str(root / "merges.txt"), model_max_length=16)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=16,
                                        bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                                        pad_token_id=vocab["<|endoftext|>"])).eval()
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8)
    vae = diffusers.AutoencoderKL(block_out_channels=(8,), in_channels=3, out_channels=3, latent_channels=4,
                                  down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                                  norm_num_groups=8, sample_size=8)
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=tok, unet=unet,
        scheduler=diffusers.DDIMScheduler(num_train_timesteps=1000, clip_sample=False, steps_offset=1), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(root / "pipe")
    return root / "pipe"


def test_diffusion_cache_train_bucketed_and_evaluate(sd_dir, tmp_path):
    hook = "mid_block.attentions.0.hook_out"
    common = ["--model", str(sd_dir), "--model-kind", "diffusion", "--prompt", "a red cube", "--prompt", "a blue ball",
              "--num-inference-steps", "3", "--guidance-scale", "4", "--height", "8", "--width", "8",
              "--output-type", "latent"]
    assert main(["cache", *common, "--hook", hook, "--out", str(tmp_path / "c"), "--batch-size", "2",
                 "--no-progress"]) == 0
    cache = tmp_path / "c" / hook
    meta = json.loads((cache / "metadata.json").read_text())
    assert meta["kind"] == "diffusion" and meta["diffusion"]["num_train_timesteps"] == 1000
    assert main(["train", "--cache", str(cache), "--out", str(tmp_path / "sae"), "--architecture", "timestep_bucketed",
                 "--inner-architecture", "topk", "--k", "4", "--d-sae", "32", "--per-timestep", "--cfg-branch", "both",
                 "--input-kind", "block_output", "--total-training-samples", "2000", "--batch-size", "32"]) == 0
    sae = SAE.load_from_disk(tmp_path / "sae")
    assert sae.cfg.architecture() == "timestep_bucketed" and len(sae.cfg.timestep_ranges) == 3  # DDIM 3 steps
    assert sae.cfg.metadata.input_kind == "block_output" and sae.cfg.metadata.hook_name == hook
    out = tmp_path / "eval.json"
    assert main(["evaluate", "--sae-path", str(tmp_path / "sae"), "--cache", str(cache), *common[:4], "--prompt",
                 "a red cube", *common[8:], "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert len(res["reconstruction"]["buckets"]) == 3
    assert len(res["diffusion"]["timesteps"]) == 3
    assert res["diffusion"]["images"]["image_max_abs_diff_error_term"] < 1e-4
