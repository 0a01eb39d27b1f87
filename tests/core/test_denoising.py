"""The one denoising-state module: current_timestep / current_branch precedence, the CFG row split, the branch
vocabulary, and state restored when a block raises."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import sae_lens_multimodal as slm
from sae_lens_multimodal.core import denoising
from sae_lens_multimodal.core.denoising import (
    BRANCH_CODES,
    CFG_BATCH_ORDER,
    CFG_BRANCHES,
    DenoisingState,
    branch_codes,
    branch_override,
    branch_rows,
    cfg_row_labels,
    cfg_row_split,
    check_cfg_branch,
    current_branch,
    current_branch_codes,
    current_denoising_state,
    current_timestep,
    denoising_state,
    timestep_context,
)

SD_KW = {"num_inference_steps": 2, "height": 32, "width": 32, "output_type": "pt", "guidance_scale": 7.5}


def test_top_level_current_timestep_sees_timestep_context():
    assert slm.current_timestep() is None and slm.current_branch() is None
    with slm.timestep_context(500):
        assert slm.current_timestep() == 500
        assert slm.current_branch() is None
    with slm.timestep_context(250, branch="uncond"):
        assert (slm.current_timestep(), slm.current_branch()) == (250, "uncond")
    assert slm.current_timestep() is None


def test_one_definition_behind_every_old_name():
    from sae_lens_multimodal import diffusion, saes

    assert slm.current_timestep is current_timestep and slm.current_branch is current_branch
    assert slm.timestep_context is timestep_context and saes.timestep_context is timestep_context
    assert diffusion.current_timestep is current_timestep and diffusion.current_branch is current_branch
    assert diffusion.current_denoising_state is current_denoising_state and diffusion.DenoisingState is DenoisingState


def test_denoising_names_are_defined_only_in_core_denoising():
    names = {"CFG_BRANCHES", "BRANCH_CODES", "DenoisingState", "current_timestep", "current_timesteps",
             "current_branch", "current_denoising_state", "timestep_context", "denoising_state", "branch_override"}
    package = Path(slm.__file__).parent
    where: dict[str, list[str]] = {}
    for path in package.rglob("*.py"):
        for node in ast.parse(path.read_text()).body:  # module level only
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                defined = [node.name]
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                defined = [t.id for t in targets if isinstance(t, ast.Name)]
            else:
                continue
            for name in set(defined) & names:
                where.setdefault(name, []).append(str(path.relative_to(package)))
    assert where == {name: ["core/denoising.py"] for name in names - {"current_timesteps"}}


def test_explicit_context_takes_precedence_over_the_running_call():
    call = DenoisingState(timestep=981, branch="both", step_index=0, batch_branches=("uncond", "cond"))
    with denoising_state(call):
        assert (current_timestep(), current_branch()) == (981, "both")
        with timestep_context(500):  # explicit timestep; branch left to the running call
            assert (current_timestep(), current_branch()) == (500, "both")
            assert current_denoising_state() is call  # the call's own state is untouched
        with timestep_context(500, branch="cond"):
            assert (current_timestep(), current_branch()) == (500, "cond")
            assert current_branch_codes(torch.Size([2])).tolist() == [1, 1]
        assert current_branch_codes(torch.Size([2])).tolist() == [0, 1]
    # ...also when the denoiser call starts inside the explicit block
    with timestep_context(500), denoising_state(call):
        assert current_timestep() == 500


def test_explicit_context_wins_over_a_running_pipeline():
    from sae_lens_multimodal.diffusion import HookedDiffusionPipeline
    from tests.diffusion import _tiny

    torch.manual_seed(0)
    hooked = HookedDiffusionPipeline(_tiny.sd_pipeline())
    seen: list[tuple] = []

    def record(act, hook):
        seen.append((current_timestep(), current_branch(), hooked.current_timestep))

    hooked.run_with_hooks(prompt="a cat", fwd_hooks=[("mid.0.hook_out", record)],
                          generator=_tiny.generator(), **SD_KW)
    schedule = [int(t) for t in hooked.pipe.scheduler.timesteps]
    assert [(int(t), b, int(p)) for t, b, p in seen] == [(t, "both", t) for t in schedule]
    seen.clear()
    with timestep_context(500, branch="uncond"):
        hooked.run_with_hooks(prompt="a cat", fwd_hooks=[("mid.0.hook_out", record)],
                              generator=_tiny.generator(), **SD_KW)
    assert seen == [(500, "uncond", 500)] * len(schedule)


def test_row_split_matches_the_batched_cfg_layout():
    assert cfg_row_split(6) == (slice(0, 3), slice(3, 6))
    assert cfg_row_labels(4) == ("uncond", "uncond", "cond", "cond")
    assert CFG_BATCH_ORDER == ("uncond", "cond")
    assert (branch_rows("uncond", 4), branch_rows("cond", 4), branch_rows("both", 4)) == (
        slice(0, 2), slice(2, 4), slice(0, 4))
    assert branch_codes("both", torch.Size([4, 3]), torch.device("cpu"))[:, 0].tolist() == [0, 0, 1, 1]
    for bad in (3, -2):
        with pytest.raises(ValueError, match="even batch"):
            cfg_row_split(bad)


def test_row_split_puts_the_unconditional_half_first_in_a_real_pipeline():
    """Unconditional rows do not depend on the prompt, conditional rows do: checks the split against diffusers."""
    from sae_lens_multimodal.diffusion import HookedDiffusionPipeline
    from tests.diffusion import _tiny

    torch.manual_seed(0)
    hooked = HookedDiffusionPipeline(_tiny.sd_pipeline())
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for prompt in ("a cat", "a red square"):
        first: list[torch.Tensor] = []
        hooked.run_with_hooks(prompt=prompt, fwd_hooks=[("mid.0.hook_out", lambda a, hook: first.append(a.clone()))],
                              generator=_tiny.generator(), **SD_KW)
        act = first[0]
        assert act.shape[0] == 2
        halves[prompt] = {b: act[rows] for b, rows in zip(CFG_BATCH_ORDER, cfg_row_split(act.shape[0]))}
    assert torch.equal(halves["a cat"]["uncond"], halves["a red square"]["uncond"])
    assert not torch.allclose(halves["a cat"]["cond"], halves["a red square"]["cond"])


def test_branch_vocabulary():
    assert CFG_BRANCHES == ("cond", "uncond", "both")
    assert BRANCH_CODES == {"uncond": 0, "cond": 1}
    assert check_cfg_branch("both") == "both" and check_cfg_branch(None) is None
    with pytest.raises(ValueError, match=r"cfg_branch must be one of 'cond', 'uncond', 'both' or None; got 'conditional'"):
        check_cfg_branch("conditional")
    with pytest.raises(ValueError, match=r"must be one of 'cond', 'uncond' or None; got 'both'"):
        check_cfg_branch("both", allow_both=False)
    with pytest.raises(ValueError, match="got None"):
        check_cfg_branch(None, allow_none=False)
    with pytest.raises(ValueError, match="Unknown CFG branch 'positive'"):
        branch_codes("positive", torch.Size([2]), torch.device("cpu"))
    assert branch_codes(["cond", "other"], torch.Size([2]), torch.device("cpu")).tolist() == [1, -1]


def test_state_restored_when_the_block_raises():
    state = DenoisingState(timestep=10, branch="both")
    with pytest.raises(RuntimeError, match="inside"):
        with denoising_state(state):
            with branch_override("cond"):
                assert current_branch() == "cond" and current_timestep() == 10
                raise RuntimeError("inside")
    assert current_denoising_state() is None and current_branch() is None
    with pytest.raises(RuntimeError, match="inside"):
        with timestep_context(700, branch="cond"):
            raise RuntimeError("inside")
    assert current_timestep() is None and current_branch() is None
    with pytest.raises(TypeError, match="DenoisingState"):
        with denoising_state({"timestep": 3}):  # type: ignore[arg-type]
            pass


def test_hooked_denoiser_restores_state_when_a_hook_raises():
    from sae_lens_multimodal.diffusion import HookedUNet
    from tests.diffusion import _tiny

    torch.manual_seed(0)
    hooked = HookedUNet.from_pretrained(_tiny.sd_unet())
    g = torch.Generator().manual_seed(1)
    args = (torch.randn(2, 4, 16, 16, generator=g), torch.tensor([300, 300]), torch.randn(2, 7, _tiny.TEXT_DIM, generator=g))

    def boom(act, hook):
        assert current_timestep() == 300
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        hooked.run_with_hooks(*args, fwd_hooks=[("mid.0.hook_out", boom)])
    assert current_denoising_state() is None and current_timestep() is None


def test_imports_no_diffusers_nor_diffusion_or_saes():
    tree = ast.parse(Path(denoising.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert imported <= {"__future__", "collections.abc", "contextlib", "contextvars", "dataclasses", "typing", "torch"}
