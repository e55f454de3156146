"""Every command the documentation gives exists: each `python -m MODULE` in README.md, weights.md
and docs/ answers `--help` (exit 0, its usage line naming the module)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", REPO / "weights.md", *sorted((REPO / "docs").glob("*.md"))]
NOT_OURS = {"pytest", "pip", "venv", "torch.distributed.run"}


def documented_modules() -> list[str]:
    found = set()
    for doc in DOCS:
        found |= set(re.findall(r"(?:python3?|torchrun [^\n]*?)\s+-m\s+([A-Za-z_][\w.]*)", doc.read_text()))
    return sorted(found - NOT_OURS)


def test_the_docs_name_our_commands():
    mods = documented_modules()
    assert {"infer.edit", "infer.app", "train.train", "flux_eval.evaluate", "mini_world.recipe",
            "mini_world.adapters", "flux_bench.edit"} <= set(mods), mods
    for m in mods:
        assert (REPO / (m.replace(".", "/") + ".py")).is_file(), f"documented but missing: python -m {m}"


@pytest.mark.parametrize("module", documented_modules())
def test_documented_command_answers_help(module):
    r = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"python -m {module}" in r.stdout.splitlines()[0] or module in r.stdout, r.stdout[:500]
