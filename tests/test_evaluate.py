"""flux_eval.evaluate end to end with the tiny model: synthetic MagicBrush (parquet and the released
folder layout) and Emu Edit sets, in the Hub's schemas, give complete tables; only the split asked
for is scored, and a split that is not the test set gets no test row; Emu's filtering says what it
dropped; a killed run resumed gives the same table; --edits scores saved images the same way; both
ways of asking VIE-Score. The readers' own tests are in test_eval_data.py."""

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
from flux_minimal.errors import FluxMinimalError

REPO = Path(__file__).resolve().parents[1]
pa = pytest.importorskip("pyarrow")
import pyarrow.parquet as pq  # noqa: E402


def img(seed, size=80):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def png(image):
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": None}


def magicbrush_rows(sessions=((101, 2), (202, 1))) -> list[dict]:
    """The Hub's schema; by default a two-turn session and a one-turn one, out of order on purpose."""
    rows = []
    for s, turns in sessions:
        for k in range(1, turns + 1):
            rows.append({"img_id": str(s), "turn_index": k, "source_img": png(img(s + k)), "mask_img": png(img(0)),
                         "instruction": f"edit {k} of {s}", "target_img": png(img(s + k + 1))})
    return rows[::-1]


def magicbrush_parquet(path: Path, split: str = "test", sessions=((101, 2), (202, 1))) -> Path:
    """A folder laid out as the Hub's: path/data/<split>-00000-of-00001.parquet (the Hub has no test file;
    a test one stands for the zip converted to parquet)."""
    (path / "data").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(magicbrush_rows(sessions)), path / "data" / f"{split}-00000-of-00001.parquet")
    return path


def magicbrush_hub(path: Path) -> Path:
    """osunlp/MagicBrush as downloaded: train in two shards, dev in one, no test."""
    (path / "data").mkdir(parents=True)
    for name, sessions in (("train-00000-of-00002", ((11, 1),)), ("train-00001-of-00002", ((12, 2),)),
                           ("dev-00000-of-00001", ((301, 2), (302, 1)))):
        pq.write_table(pa.Table.from_pylist(magicbrush_rows(sessions)), path / "data" / f"{name}.parquet")
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


LONG_CAPTION = "a street at night with " + " ".join(["bright lights"] * 60)  # > 77 tokens: clip.tokenize raises


def emu_parquet(path: Path, validation: bool = True) -> Path:
    """The Hub's schema: five test rows (two dropped by emu_keep, one unreadable) and, after them in the
    same file, two validation rows whose idx and task repeat test rows' (their ids must not collide)."""
    rows = [{"instruction": "make it red", "image": png(img(1)), "task": "color", "split": "test", "idx": 0,
             "hash": "a", "input_caption": "a blue car", "output_caption": "a red car"},
            {"instruction": "add a hat", "image": png(img(2)), "task": "add", "split": "test", "idx": 1,
             "hash": "b", "input_caption": "a man", "output_caption": "a man"},
            {"instruction": "remove it", "image": png(img(3)), "task": "remove", "split": "test", "idx": 2,
             "hash": "c", "input_caption": "a dog on grass", "output_caption": ""},
            {"instruction": "make it night", "image": png(img(4)), "task": "background", "split": "test", "idx": 3,
             "hash": "d", "input_caption": "a street by day", "output_caption": LONG_CAPTION},
            {"instruction": "make it old", "image": {"bytes": b"\x89PNG\r\n\x1a\n broken", "path": None},
             "task": "style", "split": "test", "idx": 4, "hash": "e", "input_caption": "a car", "output_caption": "an old car"}]
    if validation:
        rows += [{"instruction": "make it green", "image": png(img(5)), "task": "color", "split": "validation",
                  "idx": 0, "hash": "f", "input_caption": "a blue car", "output_caption": "a green car"},
                 {"instruction": "add snow", "image": png(img(6)), "task": "background", "split": "validation",
                  "idx": 3, "hash": "g", "input_caption": "a street", "output_caption": "a snowy street"}]
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
    a, _ = read_magicbrush(magicbrush_parquet(tmp_path / "mb_parquet"))
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
    assert (out / "summary.md").read_text().startswith("MagicBrush, test split: 2 sessions, 3 turns;")
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
    # resumed at another precision, its rows would mix with the first sitting's: refused
    with pytest.raises(FluxMinimalError, match="setup.json says this run was .*resume it with the same options"):
        main(["--bench", "magicbrush", "--data", str(data), "--edits", str(out / "edits"), "--out", str(again),
              "--clip", str(metric_models / "clip"), "--no-progress", "--resume", "--clip-dtype", "bfloat16"])


def test_magicbrush_hub_download_gives_no_test_row(snapshot, metric_models, tmp_path):
    """The Hub's osunlp/MagicBrush (train + dev): refused as the test set; --split dev scores dev
    alone, labelled dev, with no paper row beside it."""
    data = magicbrush_hub(tmp_path / "MagicBrush")
    with pytest.raises(FluxMinimalError, match=r"no MagicBrush test parquet files; splits found: dev \(3 rows\), "
                                               r"train \(3 rows\).*not on the Hub"):
        evaluate(snapshot, metric_models, "--bench", "magicbrush", "--data", data, "--out", tmp_path / "test")
    assert not (tmp_path / "test" / "summary.md").exists()
    out = tmp_path / "dev"
    assert evaluate(snapshot, metric_models, "--bench", "magicbrush", "--data", data, "--split", "dev",
                    "--out", out) == 0
    assert sorted(p.name for p in (out / "edits").iterdir()) == ["301", "302"]  # no train session edited
    summary = (out / "summary.md").read_text()
    assert summary.startswith("MagicBrush, dev split: 2 sessions, 3 turns;")
    assert "rows found per split: dev 3, train 3 (not read)" in summary and "not the test set" in summary
    assert [l.split("|")[1] for l in table(out)[2:]] == [" ours (dev), final turn ", " ours (dev), all turns "]


def test_emu_end_to_end_one_split_drops_and_counts(snapshot, metric_models, tmp_path, capsys):
    data = emu_parquet(tmp_path / "emu.parquet")  # test and validation rows in one file, idx repeating
    out = tmp_path / "emu"
    with pytest.warns(UserWarning, match=r"CLIP tokenizer: text 0 \(\d+ tokens\) cut to max_length=77"):
        assert evaluate(snapshot, metric_models, "--bench", "emu", "--data", data, "--out", out) == 0
    printed = capsys.readouterr().out
    assert ("3 sessions; rows found per split: test 5, validation 2 (not read); dropped 2: 1 identical input and "
            "output captions, 1 placeholder caption") in printed
    assert "warning: session test_style_4 not scored" in printed  # the corrupt image: noted, the run goes on
    summary = (out / "summary.md").read_text()
    assert summary.startswith("1 session(s) could not be scored (results.jsonl says why)\n"
                              "Emu Edit, test split: 2 samples;")
    assert "CLIP-T: 1 caption(s) over CLIP's 77 tokens cut to 77" in summary  # LONG_CAPTION
    assert "CLIP in float32 (clip.load's precision on this device)" in summary
    lines = table(out)
    ours = lines[2].split("|")[2:-1]
    assert lines[2].startswith("| ours |") and len(ours) == 8 and all(v.strip() != "-" for v in ours[:4])
    assert lines[3].startswith("| ICEdit paper | - | 0.907 | 0.305 | 0.866 |")
    assert sorted(p.name for p in (out / "edits").iterdir()) == ["test_background_3.png", "test_color_0.png"]
    # the validation split of the same file: its own sessions, ids distinct from test's, no paper row
    val = tmp_path / "val"
    assert evaluate(snapshot, metric_models, "--bench", "emu", "--data", data, "--split", "validation",
                    "--out", val) == 0
    assert sorted(p.name for p in (val / "edits").iterdir()) == ["validation_background_3.png",
                                                                 "validation_color_0.png"]
    rows = [json.loads(l) for l in (val / "results.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["validation_color_0", "validation_background_3"]
    assert (val / "summary.md").read_text().startswith("Emu Edit, validation split: 2 samples;")
    assert [l.split("|")[1] for l in table(val)[2:]] == [" ours (validation) "]


@pytest.mark.slow
def test_killed_and_resumed_gives_the_same_table(snapshot, metric_models, tmp_path):
    data = magicbrush_parquet(tmp_path / "mb")
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
    assert all(r["body"]["temperature"] == 0 for r in stub.requests)  # ours: deterministic, lossless
    assert all(p["image_url"]["url"].startswith("data:image/png;base64,") for p in sc[1:] + pq[1:])


def test_vie_score_compat_asks_as_viescore_does(stub):
    """VIEScore's requests (no temperature, max_tokens 1400, JPEG as PIL encodes it by default) and its
    loop: an unparseable SC reply makes it ask SC and PQ again; unparseable again, SC is a random
    integer in 0..10 (here seeded: the draw of random.Random(seed))."""
    import base64
    import random
    from tests.helpers import chat
    from flux_eval.viescore import VIEScore
    replies = ["no idea", '{"score": [9, 9]}', "still nothing", '{"score": [7, 3], "reasoning": ""}']
    stub.reply = lambda body, n: (200, chat(replies[n]), 0.0)
    source, edit = img(1, 16), img(2, 16)
    got = VIEScore(stub.url, "gpt-test", compat=True, seed=5, timeout=2.0, retries=0).score(source, edit, "add a hat")
    guess = float(random.Random(5).randint(0, 10))
    assert got == {"sc": guess, "pq": 3.0, "overall": pytest.approx(np.sqrt(guess * 3.0)), "vie_guessed": 1}
    bodies = [r["body"] for r in stub.requests]
    assert len(bodies) == 4 and all("temperature" not in b and b["max_tokens"] == 1400 for b in bodies)
    assert bodies[0] == bodies[2] and bodies[1] == bodies[3]  # the same two questions, asked again
    buf = io.BytesIO()
    edit.save(buf, format="JPEG")  # VIEScore's encode_pil_image
    assert bodies[1]["messages"][0]["content"][1]["image_url"]["url"] == \
        "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def test_viescore_compat_defaults_to_the_references_gpt4o():
    from flux_eval.evaluate import make_vie, parse_args
    vie, notes = make_vie(parse_args(["--bench", "emu", "--data", "d", "--out", "o", "--viescore-compat"]))
    assert (vie.judge.endpoint, vie.judge.model) == ("https://api.openai.com/v1/chat/completions", "gpt-4o-2024-05-13")
    assert vie.compat and "no temperature, JPEG" in notes[0]
    assert make_vie(parse_args(["--bench", "emu", "--data", "d", "--out", "o"])) == (None, [])  # no judge, no VIE
    with pytest.raises(SystemExit):
        parse_args(["--bench", "magicbrush", "--data", "d", "--out", "o", "--viescore-compat"])


@pytest.mark.filterwarnings("ignore:CLIP tokenizer")  # LONG_CAPTION, tested above
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
    summary = (out / "summary.md").read_text()
    assert "VIE-Score: 1 sample(s) left empty" in summary and "VIE-Score by judge-model, ours" in summary


@pytest.mark.filterwarnings("ignore:CLIP tokenizer")  # LONG_CAPTION, tested above
def test_emu_with_viescore_compat_guesses_and_says_so(snapshot, metric_models, tmp_path, stub):
    from tests.helpers import chat
    import random
    # the first sample's SC reply is unreadable twice (requests 0 and 2): drawn at random; the rest 8 / 5
    stub.reply = lambda body, n: (200, chat("no idea" if n in (0, 2) else '{"score": [8, 5], "reasoning": ""}'), 0.0)
    out = tmp_path / "emu"
    assert evaluate(snapshot, metric_models, "--bench", "emu", "--data", emu_parquet(tmp_path / "emu.parquet"),
                    "--out", out, "--judge", stub.url, "judge-model", "--viescore-compat") == 0
    rows = [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines()]
    assert (rows[0]["sc"], rows[0]["pq"], rows[0]["vie_guessed"]) == (random.Random(0).randint(0, 10), 5.0, 1)
    assert (rows[1]["sc"], rows[1]["pq"], rows[1]["vie_guessed"]) == (5.0, 5.0, 0)
    assert len(stub.requests) == 6 and all("temperature" not in r["body"] for r in stub.requests)
    summary = (out / "summary.md").read_text()
    assert "VIE-Score: 1 score(s) drawn at random" in summary and "VIEScore's requests" in summary
