"""Our top-level names never shadow, nor are shadowed by, a package users or our oracles install.

Every command runs from the repository root, which is first on sys.path: a folder of ours called
like an installed package wins over it, and breaks whatever imports that package (our old
`kernels/` broke transformers 5.25, which imports Hugging Face's `kernels`, and so diffusers).
"""

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def our_top_level_names() -> list[str]:
    """Every importable top-level name the repository root provides: packages and modules."""
    names = [p.name for p in REPO.iterdir() if p.is_dir() and (p / "__init__.py").is_file()]
    names += [p.stem for p in REPO.glob("*.py")]
    return sorted(names)


def test_our_names_are_the_expected_ones():
    """A new top-level package must be added here on purpose (and checked by the tests below)."""
    assert our_top_level_names() == ["flux_bench", "flux_eval", "flux_kernels", "flux_minimal", "infer", "mini_world",
                                     "tests", "train"]


def test_no_installed_distribution_provides_our_names(tmp_path):
    """packages_distributions() maps each top-level module name to the distributions that install
    it. Read from a neutral folder, so that only installed distributions count (the repository's
    own build metadata, flux_minimal.egg-info, is not an installed package)."""
    code = "import importlib.metadata as m, json; print(json.dumps(m.packages_distributions()))"
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    installed = json.loads(r.stdout)
    clashes = {n: installed[n] for n in our_top_level_names() if n in installed}
    assert not clashes, f"installed distributions provide modules named like ours: {clashes}"
    assert "kernels" not in our_top_level_names()


def _from_repo_root(module_file: str) -> bool:
    """Whether a module's file is one of the root's own top-level packages (.venv may sit in REPO too)."""
    return Path(module_file).resolve().parent.parent == REPO


def _hf_kernels_installed() -> bool:
    try:
        importlib.metadata.distribution("kernels")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.mark.skipif(not _hf_kernels_installed() and not os.environ.get("CI"),
                    reason="Hugging Face's `kernels` is not installed (.ci/run installs it: pip install kernels)")
@pytest.mark.slow
def test_hugging_face_kernels_and_diffusers_import_from_the_repository_root():
    """From the root, `import kernels` is Hugging Face's (transformers >= 5.25 imports it), and
    diffusers' Fill pipeline imports beside our packages."""
    code = ("import kernels, flux_kernels.lora_moe, flux_minimal, infer.pipeline, train.train\n"
            "from diffusers import FluxFillPipeline\n"
            "import transformers\n"
            "print(kernels.__file__)\nprint(flux_kernels.__file__)\nprint(transformers.__version__)")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    theirs, ours, _ = r.stdout.split()
    assert not _from_repo_root(theirs), theirs
    assert _from_repo_root(ours), ours
