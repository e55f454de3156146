"""The architecture as the import graph shows it (an AST scan, imports inside functions included):
each package imports only those below it, nothing imports a benchmark (but the GPU check, which
runs the others' parts), the product never imports
the test oracles or tests/, and no module reaches itself through its imports.

    flux_bench   performance tools (top: nothing imports them)
    flux_eval    evaluation: benchmark runner, test-set readers, metrics
    mini_world   the miniature world: data, checker, recipe, experiments
    train        fine-tuning
    infer        the product: pipeline, CLI, app, scaling, options
    flux_minimal the model library
    flux_kernels Triton kernels beside their torch references (bottom)
"""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LAYERS = ["flux_kernels", "flux_minimal", "infer", "train", "mini_world", "flux_eval", "flux_bench"]
PRODUCT = {"flux_kernels", "flux_minimal", "infer", "train"}
ORCHESTRATOR = "flux_bench.gpu_check"  # the one prepared GPU check runs the other benchmarks' parts
ORACLES = {"diffusers", "transformers", "peft", "accelerate", "open_clip", "tests"}


def modules() -> dict[str, Path]:
    return {".".join(f.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): f
            for pkg in LAYERS for f in sorted((REPO / pkg).rglob("*.py"))}


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules `name` imports: `from a.b import c` is a.b.c when that is a module, else a.b."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            out |= {f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names}
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def test_layers_import_downwards_only():
    bad = []
    for mod, deps in graph().items():
        layer = LAYERS.index(mod.split(".")[0])
        for dep in deps:
            top = dep.split(".")[0]
            if top in LAYERS and LAYERS.index(top) > layer:
                bad.append(f"{mod} imports {dep} (a layer above it)")
            if top == "flux_bench" and dep != "flux_bench.common" and not mod.startswith("flux_bench"):
                bad.append(f"{mod} imports the benchmark {dep}")
            if (top == "flux_bench" and mod.startswith("flux_bench") and dep not in ("flux_bench.common", "flux_bench")
                    and mod != ORCHESTRATOR):
                bad.append(f"{mod} imports the benchmark {dep} (shared pieces go in flux_bench.common)")
            if mod.split(".")[0] in PRODUCT and top in ORACLES:
                bad.append(f"{mod} (product) imports {dep}")
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    g = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(g.get(m, ())):
            if d not in g:
                continue
            if state.get(d) == 1:
                cycles.append(" -> ".join(path[path.index(d):] + [d]))
            elif d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_scan_sees_real_imports():
    """The scanner itself: it finds known edges, relative and lazy ones included."""
    g = graph()
    assert "flux_kernels.lora_moe" in set().union(*(g[m] for m in g if m.startswith("flux_minimal")))
    assert "infer.pipeline" in g["infer.edit"]  # imported inside main()
    assert any(d.startswith("flux_minimal.") for d in g["flux_minimal"])  # `from .config import ...`
