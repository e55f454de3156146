"""Edit an image with an instruction (ICEdit on FLUX.1 Fill [dev]).

    # the miniature model shipped in this repository: seconds on a CPU, no download
    .venv/bin/python -m infer.edit --preset mini --image examples/mini/scene_01.png \
        --instruction "turn the red circle blue" --out edited.png

    # the real model (weights.md says how to get it), with the MoE LoRA, on a GPU
    .venv/bin/python -m infer.edit --weights FLUX.1-Fill-dev --lora ICEdit-MoE-LoRA \
        --image cat.png --instruction "make the cat wear a red hat" --out hat.png --device cuda

    # multi-turn: each instruction edits the previous result; every turn is saved
    ... --instruction "add a hat" --instruction "make it snow" --out out.png  (out_turn1.png, ...)

    # early-filter scaling with a VLM judge (an OpenAI-compatible server, e.g. vLLM + Qwen2.5-VL)
    ... --candidates 6 --early-steps 10 --preview short \
        --judge-url http://127.0.0.1:8000/v1 --judge-model Qwen2.5-VL-72B-Instruct

Errors a user can cause (bad image, missing weights, unwritable output, ...) are printed as one
line, without a traceback, and the exit status is 2. Outputs are written atomically.
"""

import argparse
from pathlib import Path

import torch

from flux_minimal.errors import FluxMinimalError, run_cli
from flux_minimal.files import check_folder, check_output
from flux_minimal.images import save_png
from flux_minimal.ops import ATTENTION_BACKENDS
from infer.options import DTYPES, EDIT, JUDGE_MODEL, OFFLOAD_MODES, PRESETS, PREVIEWS

def edit_args(ap: argparse.ArgumentParser, instruction_help: str, out_help: str, repeat: bool) -> None:
    """The options that say which model edits what, shared with `python -m infer.explain`."""
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--weights", type=Path, help="a FLUX.1-Fill-dev snapshot folder (see weights.md)")
    src.add_argument("--preset", choices=sorted(PRESETS), help="weights shipped with this repository")
    ap.add_argument("--image", type=Path, required=True)
    ap.add_argument("--instruction", action="append" if repeat else "store", required=True, help=instruction_help)
    ap.add_argument("--out", type=Path, required=True, help=out_help)
    ap.add_argument("--lora", type=Path, help="ICEdit LoRA or MoE-LoRA safetensors (file or folder)")
    ap.add_argument("--lora-scale", type=float, default=1.0)
    ap.add_argument("--steps", type=int, help=f"default: {EDIT.steps} (a preset's own)")
    ap.add_argument("--guidance", type=float, help=f"default: {EDIT.guidance:g} (a preset's own)")
    ap.add_argument("--seed", type=int, default=EDIT.seed)
    ap.add_argument("--width", type=int, help=f"the source is resized to this width, a multiple of 16 (default: {EDIT.width}; a preset's own)")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m infer.edit", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    edit_args(ap, "repeat for multi-turn editing", "output PNG", repeat=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--offload", choices=OFFLOAD_MODES, default=OFFLOAD_MODES[0],
                    help="model: one big model on the GPU at a time (text encoders, then the DiT); "
                         "blocks: also stream the DiT blocks that do not fit (weights.md: memory)")
    ap.add_argument("--no-merge-lora", action="store_true",
                    help="keep a plain LoRA apart from the weights (default: folded in at load, no cost per step)")
    ap.add_argument("--fp8", action="store_true",
                    help="DiT and T5 linear weights in FP8 (e4m3, per-channel scales), quantized while loading")
    ap.add_argument("--compile", action="store_true", help="regional torch.compile of the DiT blocks (infer/fast.py)")
    ap.add_argument("--cuda-graphs", action="store_true", help="replay each denoising step from a CUDA graph")
    ap.add_argument("--attention", choices=ATTENTION_BACKENDS, default="sdpa",
                    help="scaled-dot-product kernel: sdpa lets torch choose; the others force one")
    ap.add_argument("--candidates", type=int, default=EDIT.candidates, help="early-filter scaling: noise candidates (M)")
    ap.add_argument("--early-steps", type=int, default=EDIT.early_steps, help="early-filter scaling: preview steps (m)")
    ap.add_argument("--preview", choices=PREVIEWS, default=EDIT.preview)
    ap.add_argument("--judge-url", help="OpenAI-compatible chat-completions base URL, e.g. http://127.0.0.1:8000/v1")
    ap.add_argument("--judge-model", default=JUDGE_MODEL)
    ap.add_argument("--judge-both-orders", action="store_true", help="ask both orders to cancel position bias")
    ap.add_argument("--save-candidates", type=Path, help="folder for every candidate's preview")
    ap.add_argument("--no-progress", action="store_true")
    return ap.parse_args(argv)


def turn_paths(out: Path, n: int) -> list[Path]:
    return [out] if n == 1 else [out.with_name(f"{out.stem}_turn{k}{out.suffix}") for k in range(1, n + 1)]


def main(argv=None) -> int:
    args = parse_args(argv)
    from infer.pipeline import ICEditPipeline  # after argparse: --help stays instant

    preset = PRESETS.get(args.preset)
    weights = args.weights or preset.weights
    lora = args.lora or (preset.lora if preset else None)
    defaults = preset.edit if preset else EDIT
    width, steps = args.width or defaults.width, args.steps or defaults.steps
    guidance = args.guidance if args.guidance is not None else defaults.guidance

    # Fail before the minutes of loading, not after: the outputs, the image, the width, the judge.
    outs = turn_paths(args.out, len(args.instruction))
    for out in outs:
        check_output(out, "output PNG")
    if args.save_candidates is not None:
        check_folder(args.save_candidates, "--save-candidates folder")
    from flux_minimal.images import load_image
    load_image(args.image)
    if width % 16:
        print(f"note: width {width} is not a multiple of 16 (FLUX's patch): using {max(16, width // 16 * 16)}")
    judge = None
    if args.candidates > 1:
        if not args.judge_url:
            raise FluxMinimalError("--candidates > 1 needs a judge: pass --judge-url (and --judge-model)")
        from infer.judge import VLMJudge
        judge = VLMJudge(args.judge_url, args.judge_model, both_orders=args.judge_both_orders)

    pipe = ICEditPipeline.from_pretrained(weights, device=args.device, dtype=DTYPES.get(args.dtype), lora=lora,
                                          lora_scale=args.lora_scale, offload=args.offload,
                                          merge_lora=not args.no_merge_lora, compile=args.compile,
                                          cuda_graphs=args.cuda_graphs, attention=args.attention, fp8=args.fp8)
    kwargs = dict(width=width, steps=steps, guidance=guidance, seed=args.seed, candidates=args.candidates,
                  early_steps=args.early_steps, preview=args.preview, judge=judge,
                  save_candidates=args.save_candidates, progress=not args.no_progress)
    results = pipe.edit_turns(args.image, args.instruction, **kwargs)
    reports = pipe.last_report["turns"]
    for k, (img, report, out) in enumerate(zip(results, reports, outs), 1):
        meta = {key: report[key] for key in ("instruction", "seed", "steps", "guidance", "size", "files")}
        meta["software"] = "flux-minimal ICEdit"
        save_png(img, out, meta, keep=True)  # minutes of work: if this write fails, it goes to the temp folder
        secs = ", ".join(f"{s} {t:.2f}s" for s, t in report["seconds"].items())
        mem = ", ".join(f"{key.split('_')[0]} {v:.2f} GB" for key, v in report.items() if key.endswith("_peak_gb"))
        print(f"turn {k}: {report['instruction']!r} -> {out}")
        print(f"  {report['it_per_s']:.2f} it/s, NFE {report['nfe']}, {secs}; total {report['total_seconds']:.2f}s"
              + (f"; peak {mem}" if mem else ""))
        if "tournament" in report:
            print(f"  early filter: winner candidate {report['winner']} (seed {report['winner_seed']}) "
                  f"after {report['comparisons']} comparisons, {report['judge_failures']} judge failures")
    return 0


if __name__ == "__main__":
    run_cli(main)
