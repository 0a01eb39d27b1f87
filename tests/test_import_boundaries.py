"""The shapes world is a plug-in: the core never imports it (the model registry imports it on the first lookup
of a ``shapes-`` name; it registers its models, pipeline class and factor world through the public registries),
only the command-line front ends do, inside the function that handles a shapes-world option, and nothing
imports its training scripts (world/training)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "sae_lens_multimodal"
CORE_MODULES = [
    "sae_lens_multimodal",
    "sae_lens_multimodal.models",
    "sae_lens_multimodal.models.loading",
    "sae_lens_multimodal.diffusion",
    "sae_lens_multimodal.analysis",
    "sae_lens_multimodal.steering",
    "sae_lens_multimodal.training",
    "sae_lens_multimodal.saes",
    "sae_lens_multimodal.reports",
    "sae_lens_multimodal.cli",
]


def _imported_after(statements: str) -> list[str]:
    code = statements + "\nimport json, sys\nprint(json.dumps(sorted(m for m in sys.modules if m.startswith('sae_lens_multimodal.world'))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_importing_the_core_imports_no_world():
    assert _imported_after("\n".join(f"import {m}" for m in CORE_MODULES)) == []


def test_a_shapes_name_imports_the_world_but_not_its_training_scripts():
    loaded = _imported_after("from sae_lens_multimodal.models.registry import resolve_model_name\n"
                             "assert resolve_model_name('shapes-clip').startswith('open-clip:local-dir:')")
    assert "sae_lens_multimodal.world" in loaded
    assert not [m for m in loaded if m.startswith("sae_lens_multimodal.world.training")]


def _imports(tree: ast.Module, top_level_only: bool) -> list[str]:
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    names = []
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module:
            names += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names += [a.name for a in node.names]
    return names


def test_no_module_outside_the_world_imports_it_at_module_level_and_none_imports_its_training():
    module_level, training = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        tree = ast.parse(path.read_text(encoding="utf-8"))
        if not rel.startswith("world/"):
            module_level += [f"{rel}: {n}" for n in _imports(tree, True) if n.startswith("sae_lens_multimodal.world")]
        if not rel.startswith("world/training/"):
            training += [f"{rel}: {n}" for n in _imports(tree, False)
                         if n.startswith("sae_lens_multimodal.world.training")]
    assert module_level == []
    assert training == []


#: command-line front ends: they offer shapes-world inputs and commands, imported when a user asks for them
CLI_FRONT_ENDS = {"cli.py", "reports/cli.py", "steering/cli.py", "analysis/circuit_cli.py"}


def test_no_module_outside_the_world_imports_it_except_the_command_line_front_ends():
    anywhere = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel.startswith("world/") or rel in CLI_FRONT_ENDS:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        anywhere += [f"{rel}: {n}" for n in _imports(tree, False) if n.startswith("sae_lens_multimodal.world")]
    assert anywhere == []
