"""Evaluate an editor on the paper's benchmarks and print the tables beside the paper's rows.

    .venv/bin/python -m flux_eval.evaluate --bench magicbrush --data MagicBrush/test --weights FLUX.1-Fill-dev \
        --lora ICEdit-MoE/pytorch_lora_weights.safetensors --clip clip-vit-base-patch32 --dino dino-vits16 \
        --out runs/eval_magicbrush                 # ICEdit's Table 2 (the test zip's folder; the Hub has no test split)
    .venv/bin/python -m flux_eval.evaluate --bench emu --data emu_edit_test_set --weights ... --clip ... --dino ... \
        --judge http://127.0.0.1:8000/v1 Qwen/Qwen2.5-VL-72B-Instruct --out runs/eval_emu    # Table 1
    .venv/bin/python -m flux_eval.evaluate --bench mini --weights assets/mini --lora assets/mini/lora_moe.safetensors \
        --out runs/eval_mini                                         # the shapes world, its checker

OUT/edits/ holds the edited images (MagicBrush: OUT/edits/<session>/iter_<k>.png, the multi-turn
chain where each turn edits the previous turn's result, and inde_<k>.png, each turn edited from its
ground-truth input; the first turn is iter_1 for both), OUT/results.jsonl one line per session
(written as each finishes), OUT/summary.md the table. `--resume` skips the sessions already in
results.jsonl, so a killed run continues; `--edits DIR` scores another system's images laid out
as OUT/edits/ (nothing is generated, no DiT is loaded).
Data (flux_eval/datasets.py): one split, by name (--split, default test). MagicBrush's test set is
the released zip (the Hub's parquet holds train and dev only, and a split that is not there is
refused rather than replaced); Emu Edit's rows are filtered on their `split` column. The summary
says which split was read and how many rows each split had.
Metrics (flux_eval/metrics.py), as the papers compute them:
  MagicBrush  final turn: the last iterative edit against the last target; all turns: every
              independent edit against its target (MagicBrush's image_eval.py). L1, CLIP-I, DINO,
              and CLIP-T against the output captions when global_descriptions.json is there
  Emu Edit    against the input image (there is no target): L1, CLIP-I, DINO; CLIP-Out = CLIP-T of
              the edit and the output caption; with --judge, VIE-Score SC, PQ, Overall on 0-10
              (flux_eval/viescore.py). ICEdit measured Emu with CLIP ViT-L/14 (pass that folder as --clip)
  mini        the world's checker: success, done, preservation error (mini_world/check.py)
CLIP runs at clip.load's precision by default (--clip-dtype auto: float16 on CUDA, float32 on a CPU).
--viescore-compat asks VIE-Score as VIEScore's code does (GPT-4o, no temperature, JPEG, a random
score for a reply unparseable twice) instead of ours (any judge, temperature 0, PNG, left empty).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from flux_minimal.errors import FluxMinimalError, run_cli
from flux_minimal.files import check_folder, write_text
from flux_minimal.images import save_png
from infer.options import EDIT, PRESETS
from flux_eval.datasets import ReadReport, Session, read_emu, read_magicbrush, read_mini

# The paper's own rows (ICEdit, tables 1 and 2); "-" where it reports none.
PAPER = {"magicbrush": {"l1": 0.060, "clip_i": 0.928, "dino": 0.853},
         "emu": {"clip_i": 0.907, "clip_out": 0.305, "dino": 0.866, "gpt": 0.68}}
COLUMNS = {"magicbrush": ["l1", "clip_i", "dino", "clip_t"],
           "emu": ["l1", "clip_i", "clip_out", "dino", "sc", "pq", "overall", "gpt"]}  # gpt: unpublished, left empty
PAPER_SPLIT = "test"  # the paper's rows are the test sets'; another split is shown without them
BENCH_NAMES = {"magicbrush": "MagicBrush", "emu": "Emu Edit", "mini": "the shapes world"}
CLIP_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class Editor:
    """Makes (or, with --edits, reads) the edits of a session; counts seconds and NFE per edit."""

    def __init__(self, args, out: Path):
        self.args, self.edits_dir = args, out / "edits"
        self.from_dir = Path(args.edits) if args.edits else None
        self.pipe, self.judge, self.seconds, self.nfe, self.n = None, None, 0.0, 0, 0
        if args.candidates > 1 and self.from_dir is None:  # checked before the minutes of loading
            if not args.judge:
                raise FluxMinimalError("--candidates > 1 needs a judge: --judge URL MODEL")
            from infer.judge import VLMJudge
            self.judge = VLMJudge(*args.judge)
        if self.from_dir is None:
            from infer.pipeline import ICEditPipeline
            self.pipe = ICEditPipeline.from_pretrained(args.weights, device=args.device, lora=args.lora)

    def edit(self, image: Image.Image, instruction: str, seed: int, name: str) -> Image.Image:
        if self.from_dir is not None:
            path = self.from_dir / f"{name}.png"
            if not path.is_file():
                raise FluxMinimalError(f"{path}: missing (--edits must hold every edit, named as OUT/edits/)")
            return Image.open(path).convert("RGB")
        a = self.args
        t0 = time.perf_counter()
        kw = dict(candidates=a.candidates, early_steps=a.early_steps, judge=self.judge) if self.judge else {}
        out = self.pipe.edit(image, instruction, width=a.width, steps=a.steps, guidance=a.guidance, seed=seed,
                             progress=False, min_side=1, **kw)
        self.seconds += time.perf_counter() - t0
        self.nfe += self.pipe.last_report["nfe"]
        self.n += 1
        path = self.edits_dir / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_png(out, path, {"instruction": instruction, "seed": str(seed)}, keep=True)
        return out



def score_session(bench: str, s: Session, editor: Editor, metrics, vie, seed: int) -> dict:
    row: dict = {"id": s.id, **s.meta}
    if bench == "magicbrush":
        current, finals = s.turns[0].source_for_edit, []
        for k, t in enumerate(s.turns, 1):  # the iterative chain
            current = editor.edit(current, t.instruction, seed, f"{s.id}/iter_{k}")
            finals.append(current)
        inde = [finals[0]] + [editor.edit(t.source_for_edit, t.instruction, seed, f"{s.id}/inde_{k}")
                              for k, t in enumerate(s.turns[1:], 2)]
        last = s.turns[-1]
        row["final"] = pair_metrics(metrics, finals[-1], last.target, last.caption)
        row["all"] = [pair_metrics(metrics, e, t.target, t.caption) for e, t in zip(inde, s.turns)]
        row["turns"] = len(s.turns)
    else:
        t = s.turns[0]
        out = editor.edit(t.source_for_edit, t.instruction, seed, s.id)
        if bench == "emu":
            row.update(pair_metrics(metrics, out, t.source, None))  # against the input: there is no target
            row["clip_out"] = metrics.clip_t(out, t.caption) if metrics.clip_model else None
            if metrics.clip_model is not None and metrics.caption_cut(t.caption):
                row["caption_cut"] = True
            if vie is not None:
                row.update(vie.score_or_none(t.source, out, t.instruction))
        else:
            from mini_world.check import check_edit
            sc = check_edit(t.record, t.source, out)
            row.update(success=bool(sc.success), done=bool(sc.done), preserve_mae=float(sc.preserve_mae),
                       l1=metrics.l1(out, t.target))
    return row


def pair_metrics(metrics, edit: Image.Image, ref: Image.Image, caption: str | None) -> dict:
    r = {"l1": metrics.l1(edit, ref)}
    if metrics.clip_model is not None:
        r["clip_i"] = metrics.clip_i(edit, ref)
        r["clip_t"] = metrics.clip_t(edit, caption) if caption else None
        if caption and metrics.caption_cut(caption):
            r["caption_cut"] = True
    if metrics.dino_model is not None:
        r["dino"] = metrics.dino(edit, ref)
    return r


def mean(values) -> float | None:
    v = [x for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return float(np.mean(v)) if v else None


def fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def summarize(bench: str, rows: list[dict], per_edit: dict, report: ReadReport, setup: tuple[str, ...] = ()) -> str:
    """summary.md: a head line (bench, split, size, cost), notes on what was read and how it was
    scored, then the table. The paper's row is shown only beside the test split it was measured on."""
    cost = f"{per_edit['nfe']:.0f} NFE, {per_edit['seconds']:.2f} s per edit" if per_edit["n"] else "edits read from --edits"
    if bench == "mini":
        from mini_world import world
        from mini_world.ablation import table
        types = [r["type"] for r in rows]
        main = [r for r in rows if r["type"] != "move"]
        row = {"row": "ours", "success": mean(r["success"] for r in main) or 0.0,
               "move": mean(r["success"] for r in rows if r["type"] == "move") or 0.0,
               "done": mean(r["done"] for r in main) or 0.0, "preserve_mae": mean(r["preserve_mae"] for r in rows),
               "nfe": per_edit["nfe"],
               "per_type": {t: mean(r["success"] for r, u in zip(rows, types) if u == t) or 0.0 for t in world.EDIT_TYPES}}
        return f"{len(rows)} held-out edits; {cost}\n\n" + table([row])
    split, cols, lines = report.split, COLUMNS[bench], []
    ours = "ours" if split == PAPER_SPLIT else f"ours ({split})"
    table_head = "| | " + " | ".join(cols) + " |\n|" + " --- |" * (len(cols) + 1)
    if bench == "magicbrush":
        final = {c: mean(r["final"].get(c) for r in rows) for c in cols}
        every = {c: mean(t.get(c) for r in rows for t in r["all"]) for c in cols}
        lines += [f"| {ours}, final turn | " + " | ".join(fmt(final[c]) for c in cols) + " |",
                  f"| {ours}, all turns | " + " | ".join(fmt(every[c]) for c in cols) + " |"]
        n = f"{len(rows)} sessions, {sum(r['turns'] for r in rows)} turns"
    else:
        means = {c: mean(r.get(c) for r in rows) for c in cols}
        lines.append(f"| {ours} | " + " | ".join(fmt(means[c]) for c in cols) + " |")
        n = f"{len(rows)} samples"
    if split == PAPER_SPLIT:
        lines.append("| ICEdit paper | " + " | ".join(fmt(PAPER[bench].get(c)) for c in cols) + " |")
    notes = [report.describe()] if report.describe() else []
    if split != PAPER_SPLIT:
        notes.append(f"not the {PAPER_SPLIT} set: the paper's {PAPER_SPLIT}-set row is not shown beside it")
    notes += score_notes(bench, rows) + list(setup)
    head_line = f"{BENCH_NAMES[bench]}, {split} split: {n}; {cost}"
    return "\n".join([head_line, *(f"- {note}" for note in notes)]) + "\n\n" + table_head + "\n" + "\n".join(lines)


def score_notes(bench: str, rows: list[dict]) -> list[str]:
    """What in the scores differs from the reference's run: captions cut, VIE-Scores guessed or missing."""
    pairs = [t for r in rows for t in r["all"]] if bench == "magicbrush" else rows
    notes = []
    if cut := sum(bool(t.get("caption_cut")) for t in pairs):
        notes.append(f"CLIP-T: {cut} caption(s) over CLIP's 77 tokens cut to 77 (MagicBrush's clip.tokenize raises "
                     f"on them)")
    if guessed := sum(r.get("vie_guessed", 0) for r in rows):
        notes.append(f"VIE-Score: {guessed} score(s) drawn at random for replies unparseable twice (--viescore-compat)")
    if empty := sum("vie_error" in r for r in rows):
        notes.append(f"VIE-Score: {empty} sample(s) left empty (the judge failed or its reply could not be parsed)")
    return notes


def session_seed(args, i: int) -> int:
    """The sampler seed of session i; the mini bench uses the ablation's (mini_world/ablation.py),
    so its table reproduces the ablation's LoRA-MoE row."""
    if args.bench == "mini":
        from mini_world.ablation import SEED_OFFSET
        return args.seed + SEED_OFFSET + 97 * i
    return args.seed + i


def read_done(path: Path) -> dict[str, dict]:
    """results.jsonl -> {id: row}; a last line cut by a kill is ignored (that session is redone)."""
    done = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
                done[row["id"]] = row
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    return done


def append_line(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m flux_eval.evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench", choices=["magicbrush", "emu", "mini"], required=True)
    ap.add_argument("--data", type=Path, help="the test set (magicbrush: the test zip's folder; emu: its parquet)")
    ap.add_argument("--split", help="the split to score, by name (default: test; MagicBrush's Hub parquet has "
                                    "train and dev, Emu Edit's has validation and test)")
    ap.add_argument("--weights", type=Path, default=Path("assets/mini"))
    ap.add_argument("--lora", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--edits", type=Path, help="score these images instead of editing (laid out as OUT/edits/)")
    ap.add_argument("--clip", type=Path, help="CLIP folder for CLIP-I / CLIP-T (openai/clip-vit-base-patch32)")
    ap.add_argument("--dino", type=Path, help="DINO folder (facebook/dino-vits16)")
    ap.add_argument("--clip-dtype", choices=["auto", *CLIP_DTYPES], default="auto",
                    help="CLIP's precision (auto: clip.load's, float16 on CUDA and float32 on a CPU)")
    ap.add_argument("--judge", nargs=2, metavar=("URL", "MODEL"), help="VLM for VIE-Score (emu) and --candidates")
    ap.add_argument("--viescore-compat", action="store_true",
                    help="emu: ask VIE-Score as VIEScore's code does (GPT-4o at api.openai.com unless --judge, no "
                         "temperature, JPEG, a random score for a reply unparseable twice)")
    ap.add_argument("--candidates", type=int, default=EDIT.candidates, help="early-filter scaling: M noise candidates")
    ap.add_argument("--early-steps", type=int, default=EDIT.early_steps)
    ap.add_argument("--limit", type=int, help="only the first N sessions")
    ap.add_argument("--per-type", type=int, default=20, help="mini: held-out edits per edit type")
    ap.add_argument("--width", type=int, help=f"edit width (default: {EDIT.width}, mini {PRESETS['mini'].edit.width})")
    ap.add_argument("--steps", type=int, default=EDIT.steps)
    ap.add_argument("--guidance", type=float, default=EDIT.guidance)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--resume", action="store_true", help="skip the sessions already in OUT/results.jsonl")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.bench != "mini" and args.data is None:
        ap.error(f"--bench {args.bench} needs --data")
    if args.bench == "mini" and args.split:
        ap.error("--split is for magicbrush and emu (the shapes world has its held-out split only)")
    if args.viescore_compat and args.bench != "emu":
        ap.error("--viescore-compat is for --bench emu (VIE-Score scores Emu Edit)")
    args.split = args.split or ("heldout" if args.bench == "mini" else "test")
    args.width = args.width or (PRESETS["mini"].edit.width if args.bench == "mini" else EDIT.width)
    return args


def read_sessions(args) -> tuple[list[Session], ReadReport]:
    if args.bench == "magicbrush":
        sessions, report = read_magicbrush(args.data, args.split)
    elif args.bench == "emu":
        sessions, report = read_emu(args.data, args.split)
    else:
        sessions, report = read_mini(args.per_type, args.seed)
    sessions = sessions[:args.limit] if args.limit else sessions
    repeated = [i for i, n in Counter(s.id for s in sessions).items() if n > 1]
    if repeated:  # a reader's bug, not the user's: refused before any edit is overwritten
        raise FluxMinimalError(f"session ids repeat ({', '.join(repeated[:5])}): their edits and results would "
                               f"overwrite each other; each session needs its own id")
    return sessions, report


def make_metrics(args) -> tuple[object, list[str]]:
    from flux_eval.metrics import EditMetrics, reference_clip_dtype
    metrics = EditMetrics(clip=args.clip, dino=args.dino, device=args.device,
                          clip_dtype=None if args.clip_dtype == "auto" else CLIP_DTYPES[args.clip_dtype])
    if metrics.clip_model is None:
        return metrics, []
    ours, reference = (str(t).removeprefix("torch.") for t in (metrics.clip_dtype, reference_clip_dtype(args.device)))
    why = ("clip.load's precision on this device" if ours == reference
           else f"--clip-dtype; clip.load's here: {reference}")
    return metrics, [f"CLIP in {ours} ({why})"]


def make_vie(args) -> tuple[object, list[str]]:
    """VIE-Score for Emu Edit: our way with --judge, the reference's with --viescore-compat (its
    GPT-4o unless --judge names another judge)."""
    if args.bench != "emu" or not (args.judge or args.viescore_compat):
        return None, []
    from flux_eval.viescore import REFERENCE_MODEL, REFERENCE_URL, VIEScore
    url, model = args.judge or (REFERENCE_URL, REFERENCE_MODEL)
    vie = VIEScore(url, model, compat=args.viescore_compat, seed=args.seed)
    how = ("VIEScore's requests: no temperature, JPEG, a random score for a reply unparseable twice"
           if args.viescore_compat else "ours: temperature 0, PNG, an unparseable reply left empty")
    return vie, [f"VIE-Score by {model}, {how}"]


def check_setup(out: Path, setup: dict, resume: bool) -> None:
    """OUT/setup.json records what decides the scores (bench, data, split, CLIP precision, VIE-Score
    mode); a --resume under another setup is refused, as its rows would mix with the first sitting's."""
    path = out / "setup.json"
    if resume and path.is_file():
        try:
            before = json.loads(path.read_text())
        except json.JSONDecodeError:
            before = None
        if before != setup:
            raise FluxMinimalError(f"{path} says this run was {before}, not {setup}: resume it with the same options, "
                                   f"or start another --out")
    out.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(setup, indent=1) + "\n")


def main(argv=None) -> int:
    args = parse_args(argv)
    out = args.out
    check_folder(out, "--out folder")
    results = out / "results.jsonl"
    if results.exists() and not args.resume:
        raise FluxMinimalError(f"{results} exists: pass --resume to continue that run, or another --out")
    sessions, report = read_sessions(args)
    read = report.describe()
    print(f"{args.bench} ({report.split}): {len(sessions)} sessions" + (f"; {read}" if read else ""))
    metrics, metric_notes = make_metrics(args)
    vie, vie_notes = make_vie(args)
    check_setup(out, {"bench": args.bench, "data": str(args.data), "split": report.split,
                      "clip_dtype": str(metrics.clip_dtype).removeprefix("torch."), "vie": vie_notes}, args.resume)
    editor = Editor(args, out)
    done = read_done(results) if args.resume else {}
    todo = [(i, s) for i, s in enumerate(sessions) if s.id not in done]
    bar = None
    if not args.no_progress:
        from tqdm import tqdm
        bar = tqdm(total=len(sessions), initial=len(sessions) - len(todo), unit="session")
    for i, s in todo:
        n0, nfe0, sec0 = editor.n, editor.nfe, editor.seconds
        try:
            row = score_session(args.bench, s, editor, metrics, vie, session_seed(args, i))
        except (OSError, FluxMinimalError) as e:  # an unreadable image (or one the editor refuses): noted, run goes on
            if isinstance(e, FluxMinimalError) and "--edits must hold" in str(e):
                raise
            row = {"id": s.id, "error": f"{type(e).__name__}: {e}"[:300]}
            print(f"warning: session {s.id} not scored: {row['error']}")
        row.update(edits=editor.n - n0, nfe=editor.nfe - nfe0, seconds=round(editor.seconds - sec0, 3))
        append_line(results, row)
        done[s.id] = row
        if bar:
            bar.update(1)
    if bar:
        bar.close()
    failed = [done[s.id] for s in sessions if s.id in done and "error" in done[s.id]]
    rows = [done[s.id] for s in sessions if s.id in done and "error" not in done[s.id]]
    n = sum(r.get("edits", 0) for r in rows)  # made in every sitting of this run
    per_edit = {"n": n, "nfe": sum(r.get("nfe", 0) for r in rows) / max(n, 1),
                "seconds": sum(r.get("seconds", 0) for r in rows) / max(n, 1)}
    md = summarize(args.bench, rows, per_edit, report, (*metric_notes, *vie_notes))
    if failed:
        md = f"{len(failed)} session(s) could not be scored (results.jsonl says why)\n" + md
    write_text(out / "summary.md", md + "\n")
    print("\n" + md)
    return 0


if __name__ == "__main__":
    run_cli(main)
