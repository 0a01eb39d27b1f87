"""`sae-lens-mm cache | train | evaluate` with bad input (issue 15): every refusal is exit status 2 and one
`error:` line on stderr naming the problem, with nothing written; plus the command example of
docs/activation-cache.md run as written."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import torch

from sae_lens_multimodal.cli import main
from sae_lens_multimodal.training.cache import ActivationCacheWriter, ActivationChunk

D_IN = 16
HOOK = "blocks.0.hook_resid_post"
DOCS = Path(__file__).resolve().parents[2] / "docs" / "activation-cache.md"


def write_cache(directory: Path, *, n_items: int = 40, per_shard: int = 10, kind: str = "image") -> Path:
    """A small complete cache written through the writer (no model): 10 rows per item."""
    meta = {"kind": kind, "model": {"name": "m", "class": "X", "fingerprint": "sha256:0"}, "hook_name": HOOK,
            "d_in": D_IN, "dtype": "float32", "token_policy": "all", "source": {"kind": "tensor", "n_items": n_items},
            "diffusion": {"num_train_timesteps": 1000} if kind == "diffusion" else None}
    writer = ActivationCacheWriter(directory, meta, per_shard)
    g = torch.Generator().manual_seed(0)
    for k in range(-(-n_items // per_shard)):
        lo, hi = k * per_shard, min(n_items, (k + 1) * per_shard)
        rows = (hi - lo) * 10
        labels = ((torch.arange(rows) % 4).double() * 250, torch.ones(rows, dtype=torch.int8)) \
            if kind == "diffusion" else (None, None)
        writer.write_shard(k, ActivationChunk(torch.randn(rows, D_IN, generator=g),
                                              torch.arange(lo, hi).repeat_interleave(10), *labels), (lo, hi))
    return directory


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return write_cache(tmp_path_factory.mktemp("acts") / HOOK)


@pytest.fixture(scope="module")
def labelled_cache(tmp_path_factory) -> Path:
    return write_cache(tmp_path_factory.mktemp("dacts") / HOOK, kind="diffusion")


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory) -> Path:
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    model = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                               image_size=32, patch_size=8), add_pooling_layer=False)
    path = tmp_path_factory.mktemp("vit")
    model.save_pretrained(path)
    return path


def image_folder(path: Path, n: int = 3) -> Path:
    from PIL import Image

    path.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(1)
    for i in range(n):
        Image.fromarray((torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()).save(path / f"{i:02d}.png")
    return path


def run(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    return code, capsys.readouterr().err


def assert_refused(argv: list[str], capsys, *needles: str) -> str:
    code, err = run(argv, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (code, err)
    assert "Traceback" not in err, err
    assert len(lines) == 1 and "error:" in lines[0], err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# ---------------------------------------------------------------------- numbers on the command line
BAD_NUMBERS = [
    (["cache", "--batch-size", "0"], ["--batch-size", "'0'", "positive integer"]),
    (["cache", "--batch-size", "-3"], ["--batch-size", "'-3'"]),
    (["cache", "--items-per-shard", "0"], ["--items-per-shard"]),
    (["cache", "--shard-size-mb", "-1"], ["--shard-size-mb", "positive number"]),
    (["cache", "--max-images", "0"], ["--max-images"]),
    (["cache", "--num-inference-steps", "0"], ["--num-inference-steps"]),
    (["cache", "--guidance-scale", "nan"], ["--guidance-scale", "'nan'"]),
    (["cache", "--guidance-scale", "-2"], ["--guidance-scale"]),
    (["cache", "--tokens-per-sample", "0"], ["--tokens-per-sample"]),
    (["cache", "--height", "-8"], ["--height"]),
    (["train", "--d-sae", "-5"], ["--d-sae", "'-5'", "positive integer"]),
    (["train", "--d-sae", "2.5"], ["--d-sae", "'2.5'"]),
    (["train", "--k", "0"], ["--k", "'0'"]),
    (["train", "--total-training-samples", "-5"], ["--total-training-samples", "'-5'"]),
    (["train", "--total-training-samples", "many"], ["--total-training-samples", "'many'"]),
    (["train", "--batch-size", "0"], ["--batch-size"]),
    (["train", "--lr", "0"], ["--lr", "positive number"]),
    (["train", "--lr", "-1e-3"], ["--lr"]),
    (["train", "--lr", "inf"], ["--lr", "'inf'"]),
    (["train", "--lr-end", "-1"], ["--lr-end"]),
    (["train", "--expansion-factor", "0"], ["--expansion-factor"]),
    (["train", "--n-buckets", "0"], ["--n-buckets"]),
    (["train", "--lr-warm-up-steps", "-1"], ["--lr-warm-up-steps", "non-negative integer"]),
    (["train", "--dead-feature-window", "0"], ["--dead-feature-window"]),
    (["train", "--l1-coefficient", "-1"], ["--l1-coefficient"]),
    (["train", "--n-checkpoints", "-1"], ["--n-checkpoints"]),
    (["train", "--checkpoint-every", "-2"], ["--checkpoint-every"]),
    (["train", "--stop-after-steps", "0"], ["--stop-after-steps"]),
    (["evaluate", "--n-rows", "0"], ["--n-rows"]),
    (["evaluate", "--batch-size", "-1"], ["--batch-size"]),
    (["evaluate", "--dense-threshold", "1.5"], ["--dense-threshold", "fraction"]),
    (["evaluate", "--dense-threshold", "-0.1"], ["--dense-threshold"]),
]


@pytest.mark.parametrize("argv,needles", BAD_NUMBERS, ids=[" ".join(a) for a, _ in BAD_NUMBERS])
def test_bad_numbers_are_refused_by_the_parser(argv, needles, capsys):
    assert_refused(argv, capsys, *needles)


# ---------------------------------------------------------------------- the same values from --config
BAD_YAML = [
    ("total-training-samples: -5\n", ["total-training-samples", "-5", "positive integer"]),
    ("lr: 0\n", ["lr", "positive number"]),
    ("k: 0\n", ["k in"]),
    ("batch_size: 0\n", ["batch-size"]),
    ("d-sae: many\n", ["d-sae", "'many'"]),
    ("no-progress: maybe\n", ["no-progress", "true or false"]),
    ("lr: [1, 2\n", ["not valid YAML"]),
]


@pytest.mark.parametrize("text,needles", BAD_YAML, ids=[t.strip() for t, _ in BAD_YAML])
def test_bad_values_in_a_config_file_are_refused(text, needles, cache, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(f"cache: {cache}\nout: {tmp_path / 'sae'}\ntotal-training-samples: 100\n" + text)
    line = assert_refused(["train", "--config", str(config)], capsys, *needles)
    assert str(config) in line or "YAML" in line
    assert not (tmp_path / "sae").exists()


# ---------------------------------------------------------------------- outputs
def test_train_out_inside_or_onto_the_cache_is_refused(cache, tmp_path, capsys):
    base = ["train", "--cache", str(cache), "--total-training-samples", "100", "--batch-size", "50"]
    assert_refused(base + ["--out", str(cache / "sae")], capsys, str(cache), "inside")
    assert_refused(base + ["--out", str(cache)], capsys, f"{cache} is {cache}", "which this command reads")
    assert_refused(base + ["--out", str(cache.parent)], capsys, "activation cache")  # the folder of caches
    assert_refused(base + ["--out", str(tmp_path / "s"), "--checkpoint-path", str(cache / "ckpt")], capsys, "inside")
    assert not (cache / "sae").exists() and not (cache / "ckpt").exists()
    assert not (cache / "cfg.json").exists() and not (cache.parent / "cfg.json").exists()
    a_file = tmp_path / "taken.txt"
    a_file.write_text("keep me")
    assert_refused(base + ["--out", str(a_file)], capsys, str(a_file), "existing file")
    assert a_file.read_text() == "keep me"


def test_cache_out_that_is_a_file_or_holds_an_sae_is_refused(tmp_path, capsys):
    a_file = tmp_path / "acts.npy"
    a_file.write_bytes(b"data")
    base = ["cache", "--model", "no-such-model", "--hook", HOOK, "--images", str(tmp_path / "imgs")]
    assert_refused(base + ["--out", str(a_file)], capsys, str(a_file), "existing file")
    sae_dir = tmp_path / "sae"
    sae_dir.mkdir()
    (sae_dir / "cfg.json").write_text("{}")
    assert_refused(base + ["--out", str(sae_dir)], capsys, str(sae_dir), "saved SAE")
    images = image_folder(tmp_path / "imgs")
    assert_refused(base + ["--out", str(images / "acts")], capsys, "inside", str(images))
    assert sorted(p.name for p in sae_dir.iterdir()) == ["cfg.json"] and not (images / "acts").exists()


def test_evaluate_json_onto_a_folder_or_into_the_cache_is_refused(cache, tmp_path, capsys):
    base = ["evaluate", "--sae-path", str(tmp_path / "no-sae"), "--cache", str(cache)]
    assert_refused(base + ["--json", str(tmp_path)], capsys, "--json", "folder")
    assert_refused(base + ["--json", str(cache / "eval.json")], capsys, "--json", "inside the cache")


# ---------------------------------------------------------------------- SAE settings
def test_sae_settings_that_cannot_work_are_refused(cache, labelled_cache, tmp_path, capsys):
    base = ["train", "--cache", str(cache), "--out", str(tmp_path / "sae"), "--total-training-samples", "100"]
    assert_refused(base + ["--d-sae", "32", "--k", "100"], capsys, "--k 100", "32 latents")
    assert_refused(base + ["--expansion-factor", "0.01"], capsys, "--expansion-factor", "no latents")
    assert_refused(base + ["--inner-config", "{bad"], capsys, "--inner-config", "not valid JSON")
    assert_refused(base + ["--inner-config", "[1, 2]"], capsys, "--inner-config", "JSON object")
    bucketed = ["train", "--cache", str(labelled_cache), "--out", str(tmp_path / "sae"), "--total-training-samples",
                "100", "--architecture", "timestep_bucketed"]
    assert_refused(bucketed + ["--timestep-ranges", "0:abc"], capsys, "--timestep-ranges", "'0:abc'")
    assert_refused(bucketed + ["--timestep-ranges", "0:500,700:600"], capsys, "'700:600'", "START < END")
    assert not (tmp_path / "sae").exists()


def test_train_and_evaluate_refuse_a_cache_with_a_hole(tmp_path, capsys):
    holed = write_cache(tmp_path / "acts" / HOOK)
    (holed / "shard_00002.json").unlink()
    line = assert_refused(["train", "--cache", str(holed), "--out", str(tmp_path / "sae"), "--total-training-samples",
                           "100"], capsys, "incomplete", "[20, 30)", "of 40", "same `sae-lens-mm cache` command")
    assert "1 shard(s) missing" in line
    assert_refused(["evaluate", "--sae-path", str(tmp_path / "none"), "--cache", str(holed)], capsys, "[20, 30)")
    assert not (tmp_path / "sae").exists()


# ---------------------------------------------------------------------- image folders
def test_non_image_and_unreadable_files_in_images_are_refused_before_writing(vit_dir, tmp_path, capsys):
    base = ["cache", "--model", str(vit_dir), "--hook", HOOK, "--no-progress"]
    notes = image_folder(tmp_path / "notes")
    (notes / "labels.txt").write_text("0 1 2\n")
    (notes / ".DS_Store").write_bytes(b"\0")  # hidden files are ignored
    assert_refused(base + ["--images", str(notes), "--out", str(tmp_path / "a")], capsys, "labels.txt", "not images",
                   "Move them out")
    garbage = image_folder(tmp_path / "garbage")
    (garbage / "99.png").write_bytes(b"this is no png")
    assert_refused(base + ["--images", str(garbage), "--out", str(tmp_path / "b")], capsys, "99.png",
                   "do not open as images")
    truncated = image_folder(tmp_path / "truncated")
    whole = (truncated / "01.png").read_bytes()
    (truncated / "01.png").write_bytes(whole[: len(whole) // 2])
    assert_refused(base + ["--images", str(truncated), "--out", str(tmp_path / "c")], capsys, "01.png")
    for out in "abc":
        assert not list((tmp_path / out).rglob("metadata.json")), "nothing may be written"
    # hidden files alone are no problem, and --max-images limits a folder
    (notes / "labels.txt").unlink()
    assert run(base + ["--images", str(notes), "--out", str(tmp_path / "ok"), "--max-images", "2"], capsys)[0] == 0
    meta = json.loads((tmp_path / "ok" / HOOK / "metadata.json").read_text())
    assert meta["source"]["n_items"] == 2


# ---------------------------------------------------------------------- train's ending
def test_train_prints_its_final_metrics(cache, tmp_path, capsys):
    assert main(["train", "--cache", str(cache), "--out", str(tmp_path / "sae"), "--d-sae", "32", "--k", "4",
                 "--total-training-samples", "2000", "--batch-size", "100"]) == 0
    out, err = capsys.readouterr()
    line = next(line for line in out.splitlines() if line.startswith("Final metrics"))
    mse, l0, ev = (float(re.search(pattern, line).group(1))
                   for pattern in (r"MSE ([\d.e+-]+)", r"L0 ([\d.]+)", r"explained variance ([\d.e+-]+)"))
    assert mse > 0 and l0 == pytest.approx(4.0) and -1 < ev < 1  # topk with k=4: exactly 4 latents per row
    bar = [s for s in err.replace("\r", "\n").splitlines() if "it/s" in s or "s/it" in s]
    assert bar and "100%" in bar[-1] and "2000/2000" in bar[-1], bar[-1:]


def test_train_of_several_caches_prints_the_final_metrics_of_each(cache, tmp_path, capsys):
    other = write_cache(tmp_path / "second" / "b")  # several caches: the data-parallel path, one SAE each
    assert main(["train", "--cache", str(cache), str(other), "--out", str(tmp_path / "saes"), "--d-sae", "32", "--k",
                 "4", "--total-training-samples", "400", "--batch-size", "100", "--no-progress"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Final metrics")]
    assert len(lines) == 2 and all("L0 4.00" in line for line in lines)
    assert sorted(p.name for p in (tmp_path / "saes").iterdir()) == sorted([cache.name, "b"])


# ---------------------------------------------------------------------- the docs' example
def _blocks(text: str, language: str, after: str) -> list[str]:
    section = text[text.index(after):]
    return re.findall(rf"```{language}\n(.*?)```", section, flags=re.S)


def test_the_cache_train_evaluate_example_of_the_docs_runs(tmp_path, monkeypatch, capsys):
    text = DOCS.read_text()
    heading = "## From images to a trained, evaluated SAE"
    python = _blocks(text, "python", heading)[0]
    commands = [line for line in _blocks(text, "bash", heading)[0].splitlines() if line.strip()]
    assert [c.split()[1] for c in commands] == ["cache", "train", "evaluate"]
    monkeypatch.chdir(tmp_path)
    exec(compile(python, str(DOCS), "exec"), {})
    for command in commands:
        argv = shlex.split(command)
        assert argv[0] == "sae-lens-mm"
        assert main(argv[1:]) == 0, capsys.readouterr().err
    result = json.loads((tmp_path / "evaluation.json").read_text())["reconstruction"]["overall"]
    assert result["n_rows"] == 64 * 65
    assert 0.3 < result["explained_variance"] <= 1 and 0 < result["l0"] <= 8
