"""shapes-vlm in `sae-lens-mm ground-truth` and in the demo report (sae_lens_multimodal.world.vlm_report).

Ground truth: the world's factors give every expected answer; the knockout verdict is checked against the
blocks docs/vlm.md measured (shape and position read in block 0, colour, size and texture in block 1), which
tests/world/test_shapes_vlm.py also finds stable across image seeds.
"""

import pytest

from sae_lens_multimodal.world.ground_truth import README_ROWS, run_readme_checks
from sae_lens_multimodal.world.vlm import ASKED_FACTORS
from sae_lens_multimodal.world.vlm_report import knockout_verdict

VLM_CHECKS = ("vlm-answers", "vlm-knockout", "vlm-steering")


@pytest.fixture(scope="module")
def figures():
    return run_readme_checks(VLM_CHECKS, quick=True, verbose=False)


def test_every_vlm_check_has_a_readme_row_and_prints_figures(figures):
    for check in VLM_CHECKS + ("vlm-typographic",):
        assert check in README_ROWS
    for check in VLM_CHECKS:
        assert any(ch.isdigit() for ch in figures.lines[check]), figures.lines[check]


@pytest.mark.shipped_weights
def test_answers_and_knockout_verdict(figures):
    # quick: 100 fresh images (20 per factor), measured 100% on every factor; 20 images per factor for knockout.
    clean, with_words = figures.results["vlm-answers"]
    assert set(clean.per_factor) == set(ASKED_FACTORS) and min(clean.per_factor.values()) >= 0.9
    assert with_words.overall >= 0.9  # measured 99%
    verdict = figures.results["vlm-knockout"]
    assert verdict.reading == {"color": "L1", "shape": "L0", "position": "L0", "size": "L1", "texture": "L1"}
    assert verdict.other_blocks_max_change <= 0.1  # measured 0.00 (quick) / 0.03 (100 per factor)
    for factor, acc in verdict.all_blocks_text.items():  # no image at all: at most chance + 0.25
        assert acc <= verdict.chance[factor] + 0.25, (factor, acc)
    assert "read in L0" in figures.lines["vlm-knockout"] and "read in L1" in figures.lines["vlm-knockout"]


@pytest.mark.shipped_weights
def test_steering_beats_both_baselines(figures):
    # quick (12 images per colour, 2 random features / directions): measured 62% vs 7.5% / 0.8%.
    o = figures.results["vlm-steering"].overall
    assert o["steered"] >= o["random_feature"] + 0.2 and o["steered"] >= o["random_direction"] + 0.3


def test_knockout_verdict_reads_the_worst_single_block():
    tables = {"answer": {"color": {"windows": [[0, 0], [0, 1], [1, 2]], "accuracy": [1.0, 0.9, 0.3], "chance": 0.2}},
              "text": {"color": {"accuracy": 0.1}}}
    v = knockout_verdict(tables)
    assert v.reading == {"color": "L1"} and v.accuracy_without == {"color": 0.3}
    assert v.other_blocks_max_change == pytest.approx(0.1) and v.all_blocks_text == {"color": 0.1}
    assert "colour read in L1" in v.line()
