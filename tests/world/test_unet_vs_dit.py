"""world.unet_vs_dit's CommitTimes without running a model: the layout-early rule and the printed table
(a never-decodable factor states its best probe accuracy, which docs/causal-analysis.md quotes)."""

import torch

from sae_lens_multimodal.analysis.temporal import ProbeResult
from sae_lens_multimodal.world.unet_vs_dit import CommitTimes


def _probe(hook: str) -> ProbeResult:
    # rows: timesteps 999, 500, 100; columns: position, color, shape
    acc = torch.tensor([[0.2, 0.1, 0.3], [0.95, 0.5, 0.64], [0.97, 0.92, 0.41]])
    return ProbeResult(timesteps=[999, 500, 100], factors=("position", "color", "shape"), accuracy=acc,
                       train_accuracy=acc, chance=torch.tensor([0.11, 0.17, 0.33]), hook_name=hook, cfg_branch="uncond",
                       pooling="auto", n_train=9, n_test=9, train_seed=0, test_seed=1, num_inference_steps=3)


def test_commit_times_table_and_layout_rule():
    hook = "transformer_blocks.5.hook_out"
    probe = _probe(hook)
    decodable = {hook: {f: (None if t is None else int(t)) for f, t in probe.decodable_from(0.9).items()}}
    assert decodable[hook] == {"position": 500, "color": 100, "shape": None}
    c = CommitTimes("m", {"position": [0.1, 0.95], "color": [0.0, 0.3], "shape": [0.0, 0.93]}, [999, 500],
                    {"position": 999, "color": None, "shape": 500}, decodable, probes={hook: probe})
    table = c.to_table()
    assert "| position | 0.1 | 0.95 | t≈999 |" in table and "| color | 0 | 0.3 | never |" in table
    assert f"probes (uncond) at {hook}: position t≈500, color t≈100, shape never (max 0.64)" in table
    assert c.layout_early and "layout early, detail late: yes" in table
    # shape committed as early as position: not "layout early"; without the probe object no max is stated
    late = CommitTimes("m", c.p_source, [999, 500], {"position": 500, "color": None, "shape": 500}, decodable)
    assert not late.layout_early and "shape never\n" in late.to_table() + "\n"
