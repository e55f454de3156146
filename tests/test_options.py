"""One home for the edit's defaults and choices (infer/options.py): the CLI, the web app, the
pipeline, evaluation and training read them from there, and none types one again."""

import ast
import dataclasses
from pathlib import Path

from infer.options import EDIT, JUDGE_MODEL, OFFLOAD_MODES, PRESETS, PREVIEWS, EditOptions

REPO = Path(__file__).resolve().parent.parent
SCANNED = ["infer", "flux_eval", "train"]  # the product, evaluation and fine-tuning
# A parameter or command-line flag by these names is an edit option: its default must be read
# from infer/options.py, never written as a literal. (`seed` is left out: evaluation and training
# have seeds of their own, for their data.)
NAMES = {f.name for f in dataclasses.fields(EditOptions)} - {"seed"} | {"offload", "judge_model", "preview_steps"}
FLAGS = {"--" + n.replace("_", "-") for n in NAMES}
# The literals themselves, wherever they might be retyped (the model name, the choice tuples).
LITERALS = {JUDGE_MODEL, JUDGE_MODEL.split("/")[-1], tuple(OFFLOAD_MODES), tuple(PREVIEWS)}


def literal(node: ast.AST) -> bool:
    """A number or a string typed in place (None, booleans and "" mean "not given")."""
    return isinstance(node, ast.Constant) and not isinstance(node.value, bool) and node.value not in (None, "")


def typed_defaults(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        where = f"{path.relative_to(REPO) if path.is_relative_to(REPO) else path.name}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = node.args
            pos = list(zip(a.args[len(a.args) - len(a.defaults):], a.defaults))
            for arg, default in pos + list(zip(a.kwonlyargs, a.kw_defaults)):
                if arg.arg in NAMES and default is not None and literal(default):
                    found.append(f"{where}: {node.name}({arg.arg}={ast.unparse(default)})")
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
            flags = {a.value for a in node.args if isinstance(a, ast.Constant)}
            for kw in node.keywords:
                if flags & FLAGS and kw.arg in ("default", "choices") and (literal(kw.value) or isinstance(kw.value, ast.List)):
                    found.append(f"{where}: {sorted(flags)} {kw.arg}={ast.unparse(kw.value)}")
        if isinstance(node, ast.Constant) and node.value in LITERALS:
            found.append(f"{where}: {node.value!r}")
        if isinstance(node, (ast.Tuple, ast.List)) and all(isinstance(e, ast.Constant) for e in node.elts):
            if tuple(e.value for e in node.elts) in LITERALS:
                found.append(f"{where}: {ast.unparse(node)}")
    return sorted(set(found))


def test_no_edit_default_is_typed_twice():
    files = [f for pkg in SCANNED for f in sorted((REPO / pkg).rglob("*.py")) if f != REPO / "infer" / "options.py"]
    found = [hit for f in files for hit in typed_defaults(f)]
    assert not found, "defaults typed outside infer/options.py:\n" + "\n".join(found)


def test_the_scan_catches_a_retyped_default(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def edit(image, *, steps=28, width=EDIT.width): ...\n"
                   "ap.add_argument('--early-steps', type=int, default=4)\n"
                   "ap.add_argument('--offload', choices=['none', 'model', 'blocks'])\n"
                   "VLM = 'Qwen2.5-VL-72B-Instruct'\n")
    hits = {h.split(":")[1] for h in typed_defaults(bad)}  # the lines
    assert hits == {"1", "2", "3", "4"}, hits  # steps=28, --early-steps 4, the offload list, the model name


def test_every_front_end_shows_the_same_defaults():
    """The CLI's and evaluation's parsed defaults, and the mini preset, agree with EDIT."""
    from flux_eval.evaluate import parse_args as eval_args
    from infer.edit import parse_args as edit_args
    cli = edit_args(["--preset", "mini", "--image", "x.png", "--instruction", "x", "--out", "y.png"])
    assert (cli.seed, cli.candidates, cli.early_steps, cli.preview, cli.judge_model) == \
        (EDIT.seed, EDIT.candidates, EDIT.early_steps, EDIT.preview, JUDGE_MODEL)
    ev = eval_args(["--bench", "mini", "--out", "o"])
    assert (ev.steps, ev.guidance, ev.early_steps, ev.width) == (EDIT.steps, EDIT.guidance, EDIT.early_steps,
                                                                 PRESETS["mini"].edit.width)
    assert dataclasses.replace(PRESETS["mini"].edit, width=EDIT.width) == EDIT  # the mini preset differs in width only
