"""Early-filter inference-time scaling (ICEdit section 3.3): many seeds, judged early, one finished.

    M seeds (seed, seed+1, ...) run as ONE batch for the first m steps
      -> one preview image per candidate
      -> the judge's pairwise max-finding pass (infer.judge.tournament, M - 1 comparisons)
      -> the winner is finished to n steps

Two preview modes:
- "short" (the paper): each candidate runs a complete m-step schedule, so its preview is a real
  (rough) edit; the winner's seed is then rerun from noise for the n-step schedule.
  NFE = n + M*m.
- "x0": candidates run the first m steps of the n-step schedule; the preview is the decoded
  predicted clean latent x0 = x_t - t v; the winner resumes from its state.
  NFE = n + (M - 1)*m, and the final image equals an uninterrupted n-step run of the winning seed.
"""

import sys
from pathlib import Path

from flux_minimal.errors import FluxMinimalError
from flux_minimal.images import save_png
from flux_minimal.sampling import DenoiseState
from infer.judge import tournament
from infer.options import PREVIEWS




def early_filter(pipe, job, *, seed: int, steps: int, guidance: float, candidates: int, early_steps: int,
                 preview: str, judge, watch, save_candidates: "str | Path | None" = None,
                 progress: bool = True) -> tuple[DenoiseState, dict]:
    """Run the early filter for a prepared `job` on `pipe` (an ICEditPipeline). Returns the
    winner's final state and a report: NFE, the winner, the tournament log, the stage times."""
    if preview not in PREVIEWS:
        raise FluxMinimalError(f"preview must be one of {PREVIEWS}, not {preview!r}")
    if judge is None:
        raise FluxMinimalError("early-filter scaling (candidates > 1) needs a judge: e.g. "
                               "infer.judge.VLMJudge(url, model), or --judge-url on the command line")
    if early_steps < 1 or (preview == "x0" and early_steps >= steps):
        raise FluxMinimalError(f"early_steps must be >= 1 (and < steps = {steps} in x0 mode), not {early_steps}")
    seeds = [seed + i for i in range(candidates)]

    # 1. all candidates, one batch, m steps
    # (short: a complete m-step schedule; x0: the first m steps of the n-step schedule)
    state = pipe.initial_state(job, seeds, early_steps if preview == "short" else steps)
    with watch("early"):
        state = pipe.sample(job, state, guidance, stop=early_steps, desc=f"{candidates} candidates", progress=progress)
    early_nfe = state.nfe

    # 2. previews, and the judge's pass
    with watch("preview"):
        previews = pipe.decode(state.x if preview == "short" else state.x0, job)
    if save_candidates is not None:
        folder = Path(save_candidates)
        folder.mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(previews):
            try:  # a preview that cannot be written must not cost the edit: it goes to the temp folder
                save_png(img, folder / f"candidate_{i:02d}_seed{seeds[i]}.png",
                         {"seed": seeds[i], "preview": preview, "early_steps": early_steps}, keep=True)
            except FluxMinimalError as e:
                print(f"warning: {e}", file=sys.stderr)
    with watch("judge"):
        result = tournament(job.source, previews, job.instruction, judge)
    w = result.winner

    # 3. finish the winner
    if preview == "short":
        final = pipe.initial_state(job, [seeds[w]], steps)
        final.nfe = early_nfe
    else:
        final = state.select(w)
    with watch("denoise"):
        final = pipe.sample(job, final, guidance, desc=f"winner (seed {seeds[w]})", progress=progress)
    report = {"nfe": final.nfe, "candidates": candidates, "early_steps": early_steps, "preview": preview,
              "winner": w, "winner_seed": seeds[w], "comparisons": result.comparisons,
              "judge_failures": result.failures, "tournament": [c.__dict__ for c in result.log]}
    return final, report


def expected_nfe(preview: str, candidates: int, early_steps: int, steps: int) -> int:
    """The NFE formulas of the two modes (for reports and tests)."""
    if preview == "short":
        return steps + candidates * early_steps
    return steps + (candidates - 1) * early_steps
