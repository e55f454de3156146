"""Early-filter scaling through the pipeline: the judge's choice is what gets finished, NFE follows
the formulas, x0 mode equals an uninterrupted run of the winner, and judge failures lose nothing."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from infer.edit import main
from infer.judge import JudgeError, ScoreJudge
from infer.pipeline import ICEditPipeline
from infer.scaling import expected_nfe
from tests.test_pipeline import source_image


@pytest.fixture(scope="module")
def pipe(snapshot):
    return ICEditPipeline.from_pretrained(snapshot)


def brightness(img: Image.Image) -> float:
    return float(np.asarray(img, dtype=np.float64).mean())


BRIGHTEST = ScoreJudge(lambda source, edit, instruction: brightness(edit))


class DeadJudge:
    calls = 0

    def compare(self, source, a, b, instruction):
        DeadJudge.calls += 1
        raise JudgeError("unreachable")


@pytest.mark.parametrize("preview", ["short", "x0"])
@pytest.mark.parametrize("M,m,n", [(3, 2, 4), (2, 1, 3), (4, 3, 5)])
def test_nfe_and_winner(pipe, tmp_path, preview, M, m, n):
    src = source_image()
    out = pipe.edit(src, "brighten it", width=64, steps=n, seed=10, candidates=M, early_steps=m, preview=preview,
                    judge=BRIGHTEST, save_candidates=tmp_path, progress=False)
    r = pipe.last_report
    assert r["nfe"] == expected_nfe(preview, M, m, n) == (n + M * m if preview == "short" else n + (M - 1) * m)
    assert r["comparisons"] == M - 1 and r["judge_failures"] == 0
    previews = sorted(tmp_path.glob("candidate_*.png"))
    assert len(previews) == M
    assert r["winner"] == int(np.argmax([brightness(Image.open(p)) for p in previews]))
    assert r["winner_seed"] == 10 + r["winner"]
    if preview == "short":  # the winner's seed rerun for n steps: exactly a plain edit with that seed
        plain = pipe.edit(src, "brighten it", width=64, steps=n, seed=r["winner_seed"], progress=False)
        assert np.array_equal(np.asarray(out), np.asarray(plain))
    assert {"early", "preview", "judge", "denoise", "decode"} <= set(r["seconds"])


def test_x0_mode_equals_uninterrupted_run_of_the_winner(pipe):
    """The winner resumes from step m of its batch; an uninterrupted single run of its seed must give
    the same image. (The first m steps ran in a batch of M: CPU GEMMs can differ in the last bits
    between batch sizes, so one 8-bit level of difference is allowed.)"""
    src = source_image()
    out = pipe.edit(src, "x", width=64, steps=6, seed=3, candidates=4, early_steps=2, preview="x0",
                    judge=BRIGHTEST, progress=False)
    r = pipe.last_report
    w = r["winner_seed"]
    # it/s counts the 4 steps the winner ran after resuming, not all 6, over the denoise stage's time
    assert r["it_per_s"] == pytest.approx(4 / r["seconds"]["denoise"])
    plain = pipe.edit(src, "x", width=64, steps=6, seed=w, progress=False)
    diff = np.abs(np.asarray(out, dtype=np.int16) - np.asarray(plain, dtype=np.int16))
    assert diff.max() <= 1


def test_dead_judge_falls_back_to_the_base_seed(pipe):
    src = source_image()
    DeadJudge.calls = 0
    out = pipe.edit(src, "x", width=64, steps=3, seed=5, candidates=3, early_steps=1, judge=DeadJudge(), progress=False)
    r = pipe.last_report
    assert r["winner"] == 0 and r["judge_failures"] == 2 and DeadJudge.calls == 2
    assert np.array_equal(np.asarray(out), np.asarray(pipe.edit(src, "x", width=64, steps=3, seed=5, progress=False)))


@pytest.fixture
def stub_judge():
    """An OpenAI-compatible endpoint on 127.0.0.1 that always prefers the second image."""
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            body = json.dumps({"choices": [{"message": {"content": "Image 2 is better: it follows the edit."}}]})
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *a):
            pass
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_cli_with_judge_server(snapshot, tmp_path, stub_judge, capsys):
    png = tmp_path / "in.png"
    source_image().save(png)
    assert main(["--weights", str(snapshot), "--image", str(png), "--instruction", "x", "--out", str(tmp_path / "o.png"),
                 "--steps", "2", "--width", "64", "--candidates", "3", "--early-steps", "1", "--judge-url", stub_judge,
                 "--judge-model", "stub", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "winner candidate 2 (seed 44) after 2 comparisons, 0 judge failures" in printed  # always "2": the last
    assert "NFE 5" in printed  # n + M*m = 2 + 3*1
