"""A web page for editing: upload, instruct, watch it denoise, compare, keep editing (Gradio).

    pip install ".[app]"                                   # gradio: the CLI and the library do not need it
    .venv/bin/python -m infer.app                          # the mini model, http://127.0.0.1:7860
    .venv/bin/python -m infer.app --weights FLUX.1-Fill-dev --lora ICEdit-MoE-LoRA --device cuda --port 7860

On the page: the source (upload, drop, paste, or one of the mini scenes), the instruction, an
advanced section (seed, steps, guidance, width), early-filter scaling (candidates, early steps,
the judge's URL and model; the candidates' previews are shown, the judge's pick first), a progress
bar that follows the denoising steps, the result beside the source, "keep editing" (the result
becomes the source; the turns collect in a history strip), the PNG with its metadata to
download, and an "explain" toggle that draws under the result how the edit happened (the figure of
`python -m infer.explain`: trajectory, attention, experts). Every error a user can cause is a
message on the page; the server keeps serving. One edit runs at a time on the device; other requests wait in the queue and see their place.
API: the endpoint "edit" takes (image, instruction, seed) and returns the edited image:
    from gradio_client import Client, handle_file
    Client("http://127.0.0.1:7860/").predict(handle_file("scene.png"), "turn the red circle blue", 42, api_name="/edit")
Served on 127.0.0.1 unless --host says otherwise; never shared publicly unless --share.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from PIL import Image

from flux_minimal.errors import FluxMinimalError, run_cli
from flux_minimal.images import load_image, save_png
from infer.options import EDIT, JUDGE_MODEL, OFFLOAD_MODES, PRESETS, REPO, EditOptions

EXAMPLES = REPO / "examples" / "mini"


def mini_examples() -> list[list]:
    """[[scene path, instruction], ...] from examples/mini/instructions.txt."""
    listing = EXAMPLES / "instructions.txt"
    if not listing.is_file():
        return []
    rows = []
    for line in listing.read_text().splitlines():
        name, _, instruction = line.partition(": ")
        if (EXAMPLES / name).is_file() and instruction:
            rows.append([str(EXAMPLES / name), instruction])
    return rows


def checked(image, instruction: str) -> Image.Image:
    """The source image, after the checks every edit makes (a message for the page if one fails)."""
    if image is None:
        raise FluxMinimalError("no source image: upload one, drop one, or pick a mini scene")
    if not (instruction or "").strip():
        raise FluxMinimalError("the instruction is empty: say what to change, e.g. \"turn the red circle blue\"")
    return load_image(image)  # the same checks as the CLI (size, readability)


class Editor:
    """The model behind the page, loaded once; `edit` is what the button and the API call."""

    def __init__(self, weights: Path, lora: Path | None, device: str = "cpu", offload: str = OFFLOAD_MODES[0],
                 defaults: EditOptions = EDIT, fp8: bool = False):
        from infer.pipeline import ICEditPipeline
        self.pipe = ICEditPipeline.from_pretrained(weights, device=device, lora=lora, offload=offload, fp8=fp8)
        self.defaults = defaults
        self.outputs = Path(tempfile.mkdtemp(prefix="icedit_app_"))  # downloads; gone with the machine's temp
        self.count = 0

    def edit(self, image, instruction: str, seed: int = EDIT.seed, steps: int | None = None,
             guidance: float | None = None, width: int | None = None, candidates: int = EDIT.candidates,
             early_steps: int = EDIT.early_steps, judge_url: str = "",
             judge_model: str = "", progress=None) -> tuple[Image.Image, list, Path, str]:
        """(result, [(candidate preview, caption)], the PNG to download, a status line). Raises
        FluxMinimalError with a message for the page on anything the user can fix."""
        source = checked(image, instruction)
        d = self.defaults
        kw = dict(width=int(width or d.width), steps=int(steps or d.steps),
                  guidance=float(d.guidance if guidance is None else guidance), seed=int(seed), progress=True)
        gallery: list = []
        if int(candidates) > 1:
            if not judge_url:
                raise FluxMinimalError("early-filter scaling needs a judge: give its URL and model, or set candidates to 1")
            from infer.judge import VLMJudge
            folder = Path(tempfile.mkdtemp(prefix="candidates_", dir=self.outputs))
            kw.update(candidates=int(candidates), early_steps=int(early_steps),
                      judge=VLMJudge(judge_url, judge_model or JUDGE_MODEL, retries=1),
                      save_candidates=folder)
        out = self.pipe.edit(source, instruction.strip(), **kw)
        report = self.pipe.last_report
        if int(candidates) > 1:
            files = sorted(Path(kw["save_candidates"]).glob("candidate_*.png"))
            w = report["winner"]
            gallery = [(str(f), ("judge's pick: " if i == w else "") + f"seed {report['winner_seed'] - w + i}")
                       for i, f in enumerate(files)]
            gallery.sort(key=lambda g: not g[1].startswith("judge's pick"))
        self.count += 1
        path = save_png(out, self.outputs / f"edit_{self.count:04d}.png",
                        {"instruction": instruction.strip(), "seed": str(seed), "steps": str(kw["steps"]),
                         "guidance": str(kw["guidance"]), "software": "flux-minimal ICEdit"}, keep=True)
        status = (f"{report['size']} in {report['total_seconds']:.1f} s, {report['nfe']} NFE"
                  + (f", candidate {report['winner']} of {candidates} chosen" if int(candidates) > 1 else ""))
        return out, gallery, path, status

    def explain(self, image, instruction: str, seed: int = EDIT.seed, steps: int | None = None,
                guidance: float | None = None, width: int | None = None) -> tuple[Image.Image, Image.Image, Path, str]:
        """The same edit as `edit` with one candidate, read with hooks (infer/explain.py):
        (result, the explain figure, the PNG to download, a status line)."""
        source = checked(image, instruction)
        from infer.explain import explain_edit
        d = self.defaults
        ex = explain_edit(self.pipe, source, instruction.strip(), width=int(width or d.width),
                          steps=int(steps or d.steps), guidance=float(d.guidance if guidance is None else guidance),
                          seed=int(seed), progress=True)
        self.count += 1
        data = ex.data
        path = save_png(ex.result, self.outputs / f"edit_{self.count:04d}.png",
                        {"instruction": data["instruction"], "seed": str(seed), "steps": str(data["steps"]),
                         "guidance": str(data["guidance"]), "software": "flux-minimal ICEdit"}, keep=True)
        status = (f"{data['size']} in {data['seconds']:.1f} s, {data['steps']} NFE, explained: "
                  f"{len(data['attention']['rows'])} attention maps, {len(data['routing'])} routing maps")
        return ex.result, ex.figure, path, status


def shown(img: Image.Image, side: int = 256) -> Image.Image:
    """What the page displays: small results (the mini model's 64 px) blown up with nearest
    neighbours so their pixels can be seen; the download and the API keep the real image."""
    k = side // max(img.size)
    return img.resize((img.width * k, img.height * k), Image.Resampling.NEAREST) if k > 1 else img


def build(editor: Editor):
    import gradio as gr

    def run(image, instruction, seed, steps, guidance, width, candidates, early_steps, judge_url, judge_model,
            history, explain, progress=gr.Progress(track_tqdm=True)):
        """The Edit button: (result shown, candidates, PNG, status, turns, the result itself, the
        explain figure)."""
        figure = None
        try:
            if explain:
                if int(candidates) > 1:
                    raise FluxMinimalError("explain reads one edit: set candidates to 1 (or turn explain off)")
                out, figure, path, status = editor.explain(image, instruction, seed, steps, guidance, width)
                gallery = []
            else:
                out, gallery, path, status = editor.edit(image, instruction, seed, steps, guidance, width, candidates,
                                                         early_steps, judge_url, judge_model)
        except FluxMinimalError as e:
            raise gr.Error(str(e), print_exception=False) from None
        except Exception as e:  # e.g. out of memory: a message, and the server goes on
            raise gr.Error(f"the edit failed: {type(e).__name__}: {e}", print_exception=False) from None
        history = (history or []) + [(shown(out), instruction)]
        return (shown(out), gallery, str(path), status, history, out,
                gr.update(value=figure, visible=figure is not None))

    def api_edit(image, instruction, seed):
        """The `edit` endpoint: (image, instruction, seed) -> the edited image."""
        try:
            return editor.edit(image, instruction, seed)[0]
        except FluxMinimalError as e:
            raise gr.Error(str(e), print_exception=False) from None

    with gr.Blocks(title="ICEdit (flux-minimal)") as page:
        gr.Markdown("# In-context editing with FLUX.1 Fill\nThe source goes on the left of a diptych; the model "
                    "paints the right half as the instruction says.")
        with gr.Row():
            source = gr.Image(label="source", type="pil", sources=["upload", "clipboard"], height=320, elem_id="source")
            result = gr.Image(label="result", type="pil", format="png", interactive=False, height=320, elem_id="result")
        instruction = gr.Textbox(label="instruction", placeholder="turn the red circle blue", elem_id="instruction")
        with gr.Row():
            go = gr.Button("Edit", variant="primary", elem_id="edit")
            again = gr.Button("Keep editing (result -> source)", elem_id="keep")
        explain = gr.Checkbox(label="explain: show how the edit happened (trajectory, attention, experts)",
                              value=False, elem_id="explain")
        status = gr.Markdown(elem_id="status")
        figure = gr.Image(label="how the edit happened (python -m infer.explain)", type="pil", format="png",
                          interactive=False, visible=False, elem_id="figure")
        download = gr.File(label="PNG with its metadata", elem_id="download")
        with gr.Accordion("Advanced", open=False):
            seed = gr.Number(label="seed", value=editor.defaults.seed, precision=0)
            steps = gr.Slider(1, 100, value=editor.defaults.steps, step=1, label="steps")
            guidance = gr.Slider(0, 100, value=editor.defaults.guidance, step=0.5, label="guidance")
            width = gr.Slider(64, 2048, value=editor.defaults.width, step=16, label="width")
        with gr.Accordion("Early-filter scaling (a VLM judge picks among candidates)", open=False):
            candidates = gr.Slider(1, 12, value=editor.defaults.candidates, step=1, label="candidates (M)")
            early_steps = gr.Slider(1, 50, value=editor.defaults.early_steps, step=1, label="early steps (m)")
            judge_url = gr.Textbox(label="judge URL", placeholder="http://127.0.0.1:8000/v1")
            judge_model = gr.Textbox(label="judge model", placeholder=JUDGE_MODEL)
            previews = gr.Gallery(label="candidates (the judge's pick first)", columns=6, height=200,
                                  allow_preview=False, object_fit="contain")
        history = gr.Gallery(label="turns", columns=8, height=200, allow_preview=False, object_fit="contain", interactive=False,
                             elem_id="history")
        if (rows := mini_examples()):
            gr.Examples(rows, inputs=[source, instruction], label="mini scenes")

        last = gr.State()  # the last result at its real size, for "keep editing"
        go.click(run, [source, instruction, seed, steps, guidance, width, candidates, early_steps, judge_url,
                       judge_model, history, explain], [result, previews, download, status, history, last, figure],
                 api_name=False)
        again.click(lambda r: r, [last], [source], api_name=False)
        hidden = gr.Button(visible=False)
        hidden.click(api_edit, [source, instruction, seed], [result], api_name="edit")
    return page.queue(default_concurrency_limit=1)  # one edit at a time on the device; others wait


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m infer.app", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", type=Path, help="a FLUX.1-Fill-dev snapshot (default: the mini model)")
    ap.add_argument("--lora", type=Path, help="default: the mini LoRA-MoE with the mini model, else none")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--offload", choices=OFFLOAD_MODES, default=OFFLOAD_MODES[0])
    ap.add_argument("--fp8", action="store_true", help="DiT and T5 linear weights in FP8 (as in the CLI)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=7860)
    ap.add_argument("--share", action="store_true", help="a public gradio.live link (off unless asked)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise FluxMinimalError('the web app needs gradio: pip install ".[app]" (or bash setup.sh)') from None
    mini = PRESETS["mini"]
    if args.weights is None:
        editor = Editor(mini.weights, args.lora or mini.lora, args.device, args.offload, mini.edit, fp8=args.fp8)
    else:
        editor = Editor(args.weights, args.lora, args.device, args.offload, fp8=args.fp8)
    page = build(editor)
    print(f"serving on http://{args.host}:{args.port}/", flush=True)
    page.launch(server_name=args.host, server_port=args.port, share=args.share, show_error=True)
    return 0


if __name__ == "__main__":
    run_cli(main)
