"""The VLM judge client against a local stub server, answer parsing, and the tournament under failure.

The stub (conftest.py's `stub` fixture, a ThreadingHTTPServer on 127.0.0.1) identifies images by
their solid colour, so it knows which candidate it was shown where and can prefer a chosen one,
answer in odd formats, fail, or stall.
Retry backoff is 1 ms and timeouts are 0.2 s, so the whole file runs in a few seconds.
"""

import base64
import io
import logging
import socket
import time

import pytest
from PIL import Image

from infer.judge import (JUDGE_PROMPT, JudgeError, ScoreJudge, VLMJudge, parse_verdict, png_data_url,
                         tournament)
from tests.helpers import chat

SOURCE_RGB = (128, 128, 128)
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255)]
M = len(COLOURS)
SOURCE = Image.new("RGB", (16, 16), SOURCE_RGB)
CANDIDATES = [Image.new("RGB", (16, 16), c) for c in COLOURS]
INSTRUCTION = "make the {sky} purple"  # braces: the prompt must not treat it as a format string
KEY = "sk-test-secret-123"


def images_of(body: dict) -> list[int]:
    """The candidate index of each image in a request (-1 for the source), in order."""
    out = []
    for part in body["messages"][0]["content"]:
        if part["type"] == "image_url":
            data = base64.b64decode(part["image_url"]["url"].split(",", 1)[1])
            rgb = Image.open(io.BytesIO(data)).convert("RGB").getpixel((0, 0))
            out.append(-1 if rgb == SOURCE_RGB else COLOURS.index(rgb))
    return out


def prefers(best: int, fmt: str = "Image {n}. It follows the instruction more closely."):
    """A reply that prefers candidate `best`, else the lower index, phrased with `fmt`."""
    def reply(body, n):
        _, c1, c2 = images_of(body)
        pick = 2 if c2 == best or (c1 != best and c2 < c1) else 1
        return 200, chat(fmt.format(n=pick)), 0.0
    return reply


def judge(stub, **kw) -> VLMJudge:
    kw = {"timeout": 2.0, "retries": 2, "backoff": 0.001, **kw}
    return VLMJudge(stub.url, "qwen2.5-vl-test", **kw)


@pytest.mark.parametrize("answer, side", [
    ("1", 0), ("2", 1), ("Image 2", 1), ("edit_image_1", 0), ("edit_image_2", 1), ("**2**", 1),
    ("The second image is better.", 1), ("The first edit follows the instruction better.", 0),
    ("2. It keeps the background untouched.", 1), ("Edited image 1, because it removes the cat.", 0),
    ("2\n\nThe second image removes the cat cleanly, while the first leaves artifacts.", 1),
    ("Answer: 1", 0), ("The answer is **1**.", 0), ("The better one is image 2.", 1), ("The latter.", 1),
    ("Image 1 changes the sky too much. Image 2 is better: the rest is untouched.", 1),
    ("After comparing them, **Image 2** has fewer artifacts.", 1),
    # several verdicts: the first explicit one counts
    ("I choose 2. Image 1 is better at colour but adds artifacts.", 1),
    ("Image 2. Although image 1 is better at preserving colour, it adds artifacts.", 1),
    ("Image 2 is not better than image 1; image 1 is better.", 0),
    ("1. Instruction following: image 1 ignores it.\n2. Quality: image 2 follows the instruction better.", 1),
    ("image2 is better at 1024x1024", 1),
])
def test_parse_verdict(answer, side):
    assert parse_verdict(answer) == side


@pytest.mark.parametrize("answer", [
    "", "I cannot decide.", "Both are equally good.", "Neither image 1 nor image 2 is better.",
    "Image 1: blurry. Image 2: sharp.", "1 or 2? Hard to say.", "12", "1.5",
])
def test_parse_verdict_without_a_winner_raises(answer):
    with pytest.raises(JudgeError, match="names no winner"):
        parse_verdict(answer)


def test_request_body_order_and_auth_from_env(stub, monkeypatch, caplog):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-fallback")
    monkeypatch.setenv("FLUX_JUDGE_API_KEY", KEY)
    stub.reply = lambda body, n: (200, chat("2, because it keeps the rest identical."), 0.0)
    j = judge(stub)
    with caplog.at_level(logging.DEBUG):
        assert j.compare(SOURCE, CANDIDATES[3], CANDIDATES[1], INSTRUCTION) == 1
    (req,) = stub.requests
    assert req["path"] == "/v1/chat/completions"
    assert req["headers"]["Authorization"] == f"Bearer {KEY}"
    body = req["body"]
    assert body["model"] == "qwen2.5-vl-test" and body["temperature"] == 0
    assert images_of(body) == [-1, 3, 1]  # source, edited image 1, edited image 2
    parts = body["messages"][0]["content"]
    texts = [p["text"] for p in parts if p["type"] == "text"]
    assert texts[:3] == ["Original image:", "Edited image 1:", "Edited image 2:"]
    assert [p["type"] for p in parts] == ["text", "image_url"] * 3 + ["text"]
    assert texts[-1] == JUDGE_PROMPT.format(instruction=INSTRUCTION)
    assert INSTRUCTION in texts[-1] and "Answer with 1 or 2 and briefly explain why." in texts[-1]
    assert parts[1]["image_url"]["url"].startswith("data:image/png;base64,")
    assert KEY not in repr(j) and KEY not in caplog.text
    assert j.requests == 1


def test_api_key_sources(stub, monkeypatch):
    stub.reply = lambda body, n: (200, chat("1"), 0.0)
    judge(stub).compare(SOURCE, CANDIDATES[0], CANDIDATES[1], INSTRUCTION)  # no key anywhere
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai")
    judge(stub).compare(SOURCE, CANDIDATES[0], CANDIDATES[1], INSTRUCTION)
    judge(stub, api_key="sk-explicit").compare(SOURCE, CANDIDATES[0], CANDIDATES[1], INSTRUCTION)
    auth = [r["headers"].get("Authorization") for r in stub.requests]
    assert auth == [None, "Bearer sk-openai", "Bearer sk-explicit"]


def test_url_forms():
    assert VLMJudge("http://h:1/v1/", "m").endpoint == "http://h:1/v1/chat/completions"
    assert VLMJudge("http://h:1/v1/chat/completions", "m").endpoint == "http://h:1/v1/chat/completions"
    with pytest.raises(JudgeError, match="http://"):
        VLMJudge("file:///etc/passwd", "m")


def test_content_parts_answer(stub):
    stub.reply = lambda body, n: (200, {"choices": [{"message": {"content": [{"type": "text", "text": "**2**"}]}}]}, 0)
    assert judge(stub).compare(SOURCE, CANDIDATES[0], CANDIDATES[1], INSTRUCTION) == 1


@pytest.mark.parametrize("status", [500, 503, 429])
def test_retry_then_success(stub, status):
    stub.reply = lambda body, n: (status, {"error": "busy"}, 0.0) if n < 2 else (200, chat("Image 2"), 0.0)
    j = judge(stub, retries=2)
    assert j.compare(SOURCE, CANDIDATES[0], CANDIDATES[1], INSTRUCTION) == 1
    assert j.requests == len(stub.requests) == 3


def test_always_500_gives_up_after_retries(stub):
    stub.reply = lambda body, n: (500, {"error": "boom"}, 0.0)
    j = judge(stub, retries=3)
    with pytest.raises(JudgeError, match="after 4 attempts.*HTTP 500"):
        j.compare(SOURCE, CANDIDATES[0], CANDIDATES[1], INSTRUCTION)
    assert len(stub.requests) == 4


@pytest.mark.parametrize("status, match", [(401, "check the API key"), (400, "HTTP 400"), (404, "HTTP 404")])
def test_client_errors_are_not_retried(stub, monkeypatch, status, match):
    monkeypatch.setenv("FLUX_JUDGE_API_KEY", KEY)
    stub.reply = lambda body, n: (status, {"error": "no"}, 0.0)
    with pytest.raises(JudgeError, match=match) as err:
        judge(stub, retries=3).compare(SOURCE, CANDIDATES[0], CANDIDATES[1], INSTRUCTION)
    assert len(stub.requests) == 1 and KEY not in str(err.value)


def test_timeout_is_retried_then_fails(stub):
    stub.reply = lambda body, n: (200, chat("1"), 5.0)
    t0 = time.perf_counter()
    with pytest.raises(JudgeError, match="after 2 attempts"):
        judge(stub, timeout=0.2, retries=1).compare(SOURCE, CANDIDATES[0], CANDIDATES[1], INSTRUCTION)
    assert len(stub.requests) == 2 and time.perf_counter() - t0 < 3


def test_slow_then_fast(stub):
    stub.reply = lambda body, n: (200, chat("2"), 5.0 if n == 0 else 0.0)
    assert judge(stub, timeout=0.2, retries=1).compare(SOURCE, CANDIDATES[0], CANDIDATES[1], INSTRUCTION) == 1


def test_unreachable():
    with socket.socket() as s:  # a port that was free a moment ago: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    j = VLMJudge(f"http://127.0.0.1:{port}/v1", "m", timeout=0.5, retries=2, backoff=0.001)
    with pytest.raises(JudgeError, match="after 3 attempts"):
        j.compare(SOURCE, CANDIDATES[0], CANDIDATES[1], INSTRUCTION)
    assert j.requests == 3


@pytest.mark.parametrize("payload, match", [
    (b"<html>proxy error</html>", "no chat completion"),
    ({"object": "error"}, "no chat completion"),
    (chat(""), "empty answer"),
    (chat("Both edits look fine to me."), "names no winner"),
])
def test_malformed_answers_are_not_retried(stub, payload, match):
    stub.reply = lambda body, n: (200, payload, 0.0)
    with pytest.raises(JudgeError, match=match):
        judge(stub, retries=3).compare(SOURCE, CANDIDATES[0], CANDIDATES[1], INSTRUCTION)
    assert len(stub.requests) == 1


def test_both_orders(stub):
    stub.reply = prefers(4)
    j = judge(stub, both_orders=True)
    v = j.verdict(SOURCE, CANDIDATES[2], CANDIDATES[4], INSTRUCTION)
    assert v.winner == 1 and "agree" in v.reason
    assert [images_of(r["body"]) for r in stub.requests] == [[-1, 2, 4], [-1, 4, 2]]
    assert j.compare(SOURCE, CANDIDATES[4], CANDIDATES[2], INSTRUCTION) == 0
    assert j.requests == 4


@pytest.mark.parametrize("answer", ["1", "2"])
def test_both_orders_cancels_position_bias(stub, answer):
    stub.reply = lambda body, n: (200, chat(answer), 0.0)  # always the same position
    v = judge(stub, both_orders=True).verdict(SOURCE, CANDIDATES[0], CANDIDATES[1], INSTRUCTION)
    assert v.winner == 0 and "tie keeps edit_a" in v.reason


@pytest.mark.parametrize("both_orders", [False, True])
@pytest.mark.parametrize("best", [0, 3, 5])
@pytest.mark.parametrize("fmt", ["{n}", "**{n}**", "edit_image_{n}", "Answer: {n}. The other has artifacts."])
def test_tournament_picks_the_preferred(stub, best, both_orders, fmt):
    stub.reply = prefers(best, fmt)
    j = judge(stub, both_orders=both_orders)
    r = tournament(SOURCE, CANDIDATES, INSTRUCTION, j)
    assert r.winner == best and r.comparisons == M - 1 and r.failures == 0
    assert len(stub.requests) == (2 if both_orders else 1) * (M - 1)
    assert [c.challenger for c in r.log] == list(range(1, M))
    assert [c.incumbent for c in r.log] == [0] + [c.winner for c in r.log[:-1]]
    assert all(c.error is None and c.reason for c in r.log)


def test_position_biased_judge(stub):
    """A judge that always says "2" hands the win to the last candidate; both orders see the bias
    as a tie every time and keep candidate 0."""
    stub.reply = lambda body, n: (200, chat("2"), 0.0)
    assert tournament(SOURCE, CANDIDATES, INSTRUCTION, judge(stub)).winner == M - 1
    assert tournament(SOURCE, CANDIDATES, INSTRUCTION, judge(stub, both_orders=True)).winner == 0


@pytest.mark.parametrize("failure", ["500", "garbage", "timeout", "401"])
def test_tournament_survives_a_dead_judge(stub, failure, caplog):
    stub.reply = {"500": lambda b, n: (500, {}, 0.0), "garbage": lambda b, n: (200, chat("hmm"), 0.0),
                  "timeout": lambda b, n: (200, chat("2"), 5.0), "401": lambda b, n: (401, {}, 0.0)}[failure]
    with caplog.at_level(logging.WARNING, logger="infer.judge"):
        r = tournament(SOURCE, CANDIDATES, INSTRUCTION, judge(stub, timeout=0.2, retries=1))
    assert r.winner == 0 and r.comparisons == M - 1 and r.failures == M - 1
    assert all(c.winner == c.incumbent == 0 and c.error for c in r.log)
    assert caplog.text.count("judge failed on candidate") == M - 1
    assert "same as no scaling" in caplog.text


def test_tournament_partial_failure(stub):
    """The judge prefers 4 but fails every comparison that shows candidate 2: the incumbent at that
    point (1) survives it, and 4 still wins later."""
    def reply(body, n):
        if 2 in images_of(body):
            return 500, {}, 0.0
        return prefers(4)(body, n)
    stub.reply = reply
    r = tournament(SOURCE, CANDIDATES, INSTRUCTION, judge(stub, retries=1))
    assert r.winner == 4 and r.comparisons == M - 1 and r.failures == 1
    assert [(c.incumbent, c.challenger, c.winner, c.error is not None) for c in r.log] == [
        (0, 1, 0, False), (0, 2, 0, True), (0, 3, 0, False), (0, 4, 4, False), (4, 5, 4, False)]


def test_tournament_max_failures(stub):
    stub.reply = lambda body, n: (500, {}, 0.0)
    r = tournament(SOURCE, CANDIDATES, INSTRUCTION, judge(stub, retries=0), max_failures=2)
    assert r.winner == 0 and r.comparisons == 2 and r.failures == M - 1 and len(stub.requests) == 2
    assert r.log[-1].error.startswith("skipped")


def brightness(source, edit, instruction):
    return float(sum(edit.getpixel((0, 0))))


def test_score_judge():
    cands = [Image.new("RGB", (4, 4), (v, v, v)) for v in (10, 200, 50, 200, 30)]
    r = tournament(SOURCE, cands, INSTRUCTION, ScoreJudge(brightness))
    assert r.winner == 1 and r.comparisons == 4  # ties keep the earlier candidate (1, not 3)
    assert "scores" in r.log[0].reason
    assert ScoreJudge(lambda s, e, i: 0.0).compare(SOURCE, cands[0], cands[1], "") == 0
    assert ScoreJudge(lambda s, e, i: float("nan")).compare(SOURCE, cands[0], cands[1], "") == 0


class PlainJudge:
    """A judge with only `compare` (no reasons), counting its calls."""

    def __init__(self, answers):
        self.answers, self.calls = list(answers), 0

    def compare(self, source, edit_a, edit_b, instruction):
        self.calls += 1
        a = self.answers.pop(0)
        if isinstance(a, Exception):
            raise a
        return a


def test_tournament_plain_judge_and_edges():
    j = PlainJudge([1, 0, JudgeError("down"), 1, 0])
    r = tournament(SOURCE, CANDIDATES, INSTRUCTION, j)
    assert j.calls == M - 1 and r.winner == 4 and r.failures == 1
    assert tournament(SOURCE, CANDIDATES[:1], INSTRUCTION, PlainJudge([])).comparisons == 0
    with pytest.raises(Exception, match="at least one candidate"):
        tournament(SOURCE, [], INSTRUCTION, PlainJudge([]))
    with pytest.raises(ValueError, match="returns 0 or 1"):
        tournament(SOURCE, CANDIDATES, INSTRUCTION, PlainJudge([2]))
    with pytest.raises(ZeroDivisionError):  # a bug in a judge is not a judge failure
        tournament(SOURCE, CANDIDATES, INSTRUCTION, PlainJudge([ZeroDivisionError()]))


def test_png_data_url_roundtrip():
    url = png_data_url(CANDIDATES[2])
    img = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert img.format == "PNG" and img.getpixel((3, 3)) == COLOURS[2]
