"""flux_eval.evaluate end to end with the tiny model: synthetic MagicBrush (parquet and the released
folder layout) and Emu Edit sets give complete tables; Emu's filtering says what it dropped; a killed
run resumed gives the same table; --edits scores saved images the same way."""

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from flux_eval.datasets import emu_keep, read_magicbrush
from flux_eval.evaluate import main

REPO = Path(__file__).resolve().parents[1]
pa = pytest.importorskip("pyarrow")
import pyarrow.parquet as pq  # noqa: E402


def img(seed, size=80):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def png(image):
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": None}


def magicbrush_parquet(path: Path) -> Path:
    rows = []
    for s, turns in ((101, 2), (202, 1)):  # a two-turn session and a one-turn one
        for k in range(1, turns + 1):
            rows.append({"img_id": str(s), "turn_index": k, "source_img": png(img(s + k)), "mask_img": png(img(0)),
                         "instruction": f"edit {k} of {s}", "target_img": png(img(s + k + 1))})
    pq.write_table(pa.Table.from_pylist(rows[::-1]), path)  # out of order on purpose
    return path


def magicbrush_folder(path: Path) -> Path:
    sessions = {}
    for s, turns in ((101, 2), (202, 1)):
        (path / "images" / str(s)).mkdir(parents=True)
        img(s + 1).save(path / "images" / str(s) / f"{s}-input.png")
        sessions[str(s)] = []
        for k in range(1, turns + 1):
            img(s + k + 1).save(path / "images" / str(s) / f"{s}-output{k}.png")
            src = f"{s}-input.png" if k == 1 else f"{s}-output{k - 1}.png"
            sessions[str(s)].append({"input": src, "mask": "m.png", "output": f"{s}-output{k}.png",
                                     "instruction": f"edit {k} of {s}"})
    (path / "edit_sessions.json").write_text(json.dumps(sessions))
    (path / "global_descriptions.json").write_text(json.dumps(
        {"101": {"101-output1.png": "a cat", "101-output2.png": "a dog"}, "202": {"202-output1.png": "a car"}}))
    return path


def emu_parquet(path: Path) -> Path:
    rows = [{"instruction": "make it red", "image": png(img(1)), "task": "color", "split": "test", "idx": 0,
             "hash": "a", "input_caption": "a blue car", "output_caption": "a red car"},
            {"instruction": "add a hat", "image": png(img(2)), "task": "add", "split": "test", "idx": 1,
             "hash": "b", "input_caption": "a man", "output_caption": "a man"},
            {"instruction": "remove it", "image": png(img(3)), "task": "remove", "split": "test", "idx": 2,
             "hash": "c", "input_caption": "a dog on grass", "output_caption": ""},
            {"instruction": "make it night", "image": png(img(4)), "task": "background", "split": "test", "idx": 3,
             "hash": "d", "input_caption": "a street by day", "output_caption": "a street at night"},
            {"instruction": "make it old", "image": {"bytes": b"\x89PNG\r\n\x1a\n broken", "path": None},
             "task": "style", "split": "test", "idx": 4, "hash": "e", "input_caption": "a car", "output_caption": "an old car"}]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.fixture(scope="module")
def metric_models(tmp_path_factory):
    from tests.test_metrics import DINO_S16, random_clip
    from tests.text_fixtures import train_clip_merges, write_clip_tokenizer
    root = tmp_path_factory.mktemp("metric_models")
    write_clip_tokenizer(root / "clip", train_clip_merges())
    vocab = len(json.loads((root / "clip" / "vocab.json").read_text()))
    small = dict(text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
                 vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                    image_size=224, patch_size=32), projection_dim=16)
    random_clip(root / "clip", small, vocab_size=vocab)
    torch.manual_seed(0)
    transformers.ViTModel(transformers.ViTConfig(**dict(DINO_S16, num_hidden_layers=1))).save_pretrained(root / "dino")
    return root


def evaluate(snapshot, models, *args):
    return main(["--weights", str(snapshot), "--clip", str(models / "clip"), "--dino", str(models / "dino"),
                 "--width", "64", "--steps", "2", "--device", "cpu", "--no-progress", *map(str, args)])


def table(out: Path) -> list[str]:
    return [l for l in (out / "summary.md").read_text().splitlines() if l.startswith("|")]


def test_magicbrush_parquet_and_folder_give_the_same_sessions(tmp_path):
    a, _ = read_magicbrush(magicbrush_parquet(tmp_path / "mb.parquet"))
    b, _ = read_magicbrush(magicbrush_folder(tmp_path / "mb"))
    assert [s.id for s in a] == [s.id for s in b] == ["101", "202"]
    for sa, sb in zip(a, b):
        assert [t.instruction for t in sa.turns] == [t.instruction for t in sb.turns]
        for ta, tb in zip(sa.turns, sb.turns):
            assert np.array_equal(np.asarray(ta.source), np.asarray(tb.source))
            assert np.array_equal(np.asarray(ta.target), np.asarray(tb.target))
    assert [t.caption for t in b[0].turns] == ["a cat", "a dog"] and a[0].turns[0].caption is None


def test_emu_filtering():
    assert emu_keep({"input_caption": "a man", "output_caption": "a man "}) == "identical input and output captions"
    assert emu_keep({"input_caption": "a dog", "output_caption": ""}) == "placeholder caption"
    assert emu_keep({"input_caption": "a street by day", "output_caption": "a street at night"}) is None


def test_magicbrush_end_to_end_and_scoring_saved_edits(snapshot, metric_models, tmp_path, capsys):
    data = magicbrush_folder(tmp_path / "mb")
    out = tmp_path / "run"
    assert evaluate(snapshot, metric_models, "--bench", "magicbrush", "--data", data, "--out", out) == 0
    edits = sorted(p.relative_to(out / "edits").as_posix() for p in (out / "edits").rglob("*.png"))
    assert edits == ["101/inde_2.png", "101/iter_1.png", "101/iter_2.png", "202/iter_1.png"]
    rows = [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines()]
    assert [len(r["all"]) for r in rows] == [2, 1] and all(r["final"]["clip_t"] is not None for r in rows)
    lines = table(out)
    assert lines[0].split("|")[2:6] == [" l1 ", " clip_i ", " dino ", " clip_t "]
    assert lines[2].startswith("| ours, final turn |") and "-" not in lines[2].split("|")[2:6]
    assert lines[4] == "| ICEdit paper | 0.060 | 0.928 | 0.853 | - |"
    # the final turn's L1 is that of the saved last iterative edit against the last target
    last = Image.open(out / "edits" / "101" / "iter_2.png").convert("RGB").resize((80, 80), Image.Resampling.BICUBIC)
    want = np.abs(np.asarray(last, np.float64) - np.asarray(img(101 + 2 + 1), np.float64)).mean() / 255
    assert rows[0]["final"]["l1"] == pytest.approx(want, abs=1e-6)
    # the same images scored through --edits: the same table, no DiT loaded
    again = tmp_path / "again"
    assert main(["--bench", "magicbrush", "--data", str(data), "--edits", str(out / "edits"), "--out", str(again),
                 "--clip", str(metric_models / "clip"), "--dino", str(metric_models / "dino"), "--no-progress",
                 "--weights", str(tmp_path / "no-such-snapshot")]) == 0
    assert table(again)[2:] == table(out)[2:]


def test_emu_end_to_end_drops_and_counts(snapshot, metric_models, tmp_path, capsys):
    out = tmp_path / "emu"
    assert evaluate(snapshot, metric_models, "--bench", "emu", "--data", emu_parquet(tmp_path / "emu.parquet"),
                    "--out", out) == 0
    printed = capsys.readouterr().out
    assert "3 sessions; dropped 2: 1 identical input and output captions, 1 placeholder caption" in printed
    assert "warning: session style_4 not scored" in printed  # the corrupt image: noted, the run goes on
    assert (out / "summary.md").read_text().startswith("1 session(s) could not be scored")
    lines = table(out)
    ours = lines[2].split("|")[2:-1]
    assert len(ours) == 8 and all(v.strip() != "-" for v in ours[:4])  # l1, clip_i, clip_out, dino
    assert lines[3].startswith("| ICEdit paper | - | 0.907 | 0.305 | 0.866 |")


@pytest.mark.slow
def test_killed_and_resumed_gives_the_same_table(snapshot, metric_models, tmp_path):
    data = magicbrush_parquet(tmp_path / "mb.parquet")
    cmd = [sys.executable, "-m", "flux_eval.evaluate", "--bench", "magicbrush", "--data", str(data), "--weights",
           str(snapshot), "--clip", str(metric_models / "clip"), "--dino", str(metric_models / "dino"), "--width",
           "64", "--steps", "40", "--device", "cpu", "--no-progress"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([*cmd, "--out", str(killed)], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    results = killed / "results.jsonl"
    while not (results.is_file() and results.read_text().endswith("\n")) and time.time() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)  # one session done, the other mid-way
    proc.wait()
    assert len((killed / "results.jsonl").read_text().splitlines()) == 1
    subprocess.run([*cmd, "--out", str(killed), "--resume"], cwd=REPO, check=True, capture_output=True)
    subprocess.run([*cmd, "--out", str(tmp_path / "clean")], cwd=REPO, check=True, capture_output=True)
    assert table(killed) == table(tmp_path / "clean")


# ---- VIE-Score through the judge client ----

def test_vie_score_answers_are_parsed_as_viescore_does():
    from infer.judge import JudgeError
    from flux_eval.viescore import parse_scores
    assert parse_scores('Sure.\n{\n"score" : [7, 4],\n"reasoning" : "the hat is there"\n}\nDone') == [7.0, 4.0]
    assert parse_scores('{"score": 8, "reasoning": "x"}') == [8.0]
    assert parse_scores("score = [3, 9]") == [3.0, 9.0]
    for bad in ("I cannot rate this.", '{"score": [11, 2]}', '{"reasoning": "no score"}'):
        with pytest.raises(JudgeError):
            parse_scores(bad)


def test_vie_score_asks_sc_with_both_images_and_pq_with_the_edit(stub):
    from tests.helpers import chat
    from flux_eval.viescore import VIEScore
    stub.reply = lambda body, n: (200, chat('{"score": [%d, 9], "reasoning": "ok"}' % (6 if n == 0 else 4)), 0.0)
    got = VIEScore(stub.url, "qwen-test", timeout=2.0, retries=0).score(img(1, 16), img(2, 16), "add a {hat}")
    assert got == {"sc": 6.0, "pq": 4.0, "overall": pytest.approx(np.sqrt(24.0))}
    sc, pq = (r["body"]["messages"][0]["content"] for r in stub.requests)
    assert [p["type"] for p in sc] == ["text", "image_url", "image_url"] and [p["type"] for p in pq] == ["text", "image_url"]
    assert "Editing instruction: add a {hat}" in sc[0]["text"] and "<instruction>" not in sc[0]["text"]
    assert "naturalness" in pq[0]["text"] and "Editing instruction" not in pq[0]["text"]


def test_emu_with_a_judge_that_fails_once(snapshot, metric_models, tmp_path, stub, capsys):
    from tests.helpers import chat
    # the first sample's SC request gets an unreadable answer; the rest score 8 / 5
    stub.reply = lambda body, n: (200, chat("no idea" if n == 0 else '{"score": [8, 5], "reasoning": ""}'), 0.0)
    out = tmp_path / "emu"
    assert evaluate(snapshot, metric_models, "--bench", "emu", "--data", emu_parquet(tmp_path / "emu.parquet"),
                    "--out", out, "--judge", stub.url, "judge-model") == 0
    rows = [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines()]
    assert rows[0]["sc"] is None and "vie_error" in rows[0]
    assert (rows[1]["sc"], rows[1]["pq"]) == (5.0, 5.0)
    ours = table(out)[2].split("|")[2:-1]
    assert [v.strip() for v in ours[4:]] == ["5.000", "5.000", "5.000", "-"]  # the failed sample left out
