"""Judges for early-filter inference-time scaling, and the pairwise tournament that uses them.

ICEdit (section 3.3) runs M = 6 noise candidates for a few steps, asks a VLM which of two edits is
better, keeps the better of each pair in one bubble-sort-like pass (M - 1 comparisons), and finishes
only the winning seed. This file holds the judge side:

- `Judge`: the interface, `compare(source, edit_a, edit_b, instruction) -> 0 | 1` (0: a is better).
- `VLMJudge`: an OpenAI-compatible chat-completions client (e.g. vLLM serving Qwen2.5-VL), standard
  library only, with the paper's prompt, answer parsing, retries and optional judging in both orders.
- `ScoreJudge`: a judge from a scoring function (an oracle such as a programmatic checker).
- `tournament`: the max-finding pass, which never fails: a comparison the judge cannot decide keeps
  the incumbent.

The lead wires this into the pipeline (candidates, NFE accounting) in `infer/scaling.py`.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import logging
import os
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Callable, Protocol, runtime_checkable

from PIL import Image

from flux_minimal.errors import FluxMinimalError

logger = logging.getLogger(__name__)

# Paper figure 13, paraphrased. The images come before this text, each after its label
# ("Original image:", "Edited image 1:", "Edited image 2:"), so "1" and "2" are unambiguous.
JUDGE_PROMPT = (
    "You are given an original image, two edited versions of it (edited image 1 and edited image 2) "
    "and the editing instruction.\n"
    "Instruction: {instruction}\n"
    "Which edit better follows the instruction, with higher quality and fewer artifacts? Areas the "
    "instruction does not ask to change should stay identical to the original image, and the style "
    "should stay consistent with it.\n"
    "Answer with 1 or 2 and briefly explain why."
)
IMAGE_LABELS = ("Original image:", "Edited image 1:", "Edited image 2:")

# Checked in this order; the first one set is used. Never logged, never in a repr or an error.
API_KEY_ENV_VARS = ("FLUX_JUDGE_API_KEY", "OPENAI_API_KEY")


class JudgeError(FluxMinimalError):
    """The judge gave no verdict: unreachable, timed out, HTTP error, or an answer with no 1/2."""


@dataclass(frozen=True)
class Verdict:
    winner: int  # 0: edit_a is better, 1: edit_b is better
    reason: str  # the judge's explanation (or how a tie was broken), for the tournament log


@runtime_checkable
class Judge(Protocol):
    """Anything with `compare`. Signal "no verdict" by raising `JudgeError`; the tournament then
    keeps the incumbent. Any other exception is treated as a bug and propagates."""

    def compare(self, source: Image.Image, edit_a: Image.Image, edit_b: Image.Image, instruction: str) -> int:
        """0 if edit_a is the better edit of `source` for `instruction`, 1 if edit_b is."""
        ...


@runtime_checkable
class ExplainingJudge(Judge, Protocol):
    """A judge that can also say why; the tournament logs the reason when it is available."""

    def verdict(self, source: Image.Image, edit_a: Image.Image, edit_b: Image.Image, instruction: str) -> Verdict:
        ...


# --- parsing the VLM's answer -----------------------------------------------------------------------

# A reference to one of the two edits: "1", "image 2", "edited image 1", "edit #2", "the second
# image", "the latter". The digit must stand alone ("12", "1.5", "1024" are not references).
_NOUN = r"(?:image|img|picture|photo|edit|output|result|option|candidate|version|one)"
_REF = (
    rf"((?:(?:edit(?:ed)?\s+)?{_NOUN}\s*(?:no\.?\s*|number\s*)?)?(?<![\d.,])[12](?!\d|[.,]\d)"
    rf"|(?:first|second|former|latter|1st|2nd)(?:\s+(?:edited\s+)?{_NOUN})?)"
)
_FILLER = (r"(?:is|was|seems|appears|looks|does|did|performs|follows|matches|adheres|to|the|instruction|"
           r"edit|request|clearly|slightly|much|far|overall|definitely|significantly|somewhat|a|would|be)")
# Explicit verdicts, anywhere in the answer. Group 1 is the reference.
_VERDICTS = [
    re.compile(rf"\b(?:answer|verdict|choice|winner|decision|conclusion)\s*(?:is|would\s+be|:|=|-)\s*"
               rf"(?:that\s+)?{_REF}"),
    re.compile(rf"\b(?:better|best|superior|preferred)\s+(?:edited\s+)?{_NOUN}?\s*(?:is|would\s+be|:)\s*{_REF}"),
    re.compile(rf"{_REF}(?:\s+{_FILLER}){{0,6}}\s+(?:better|superior|best|preferred|wins)\b"),
    re.compile(rf"\b(?:choose|chose|choosing|pick|picked|select|selected|prefer|go\s+with|recommend|vote\s+for"
               rf"|i\s+think|i'd\s+say|i\s+would\s+say)\s+(?:for\s+)?(?:the\s+)?{_REF}"),
]
_BOLD = re.compile(rf"\*\*\s*(?:the\s+)?{_REF}\s*[.:]?\s*\*\*")  # models bold their verdict: "**2**"
# The answer opens with the reference: "2", "2: ...", "Image 2.", "Edited image 1, because ...".
# ("Image 1 changes the sky, image 2 ..." opens with a description, not a verdict.)
_LEADING_BARE = re.compile(r"^\W*([12])(?!\d|[.,]\d|\s*(?:or|and|&|vs)\b)")
_LEADING_REF = re.compile(rf"^\W*(?:the\s+)?{_REF}\s*(?:$|[.,!)\n]|\s+(?:because|since|as)\b)")
_NEGATED = re.compile(r"\b(?:not|nor|neither)\s+(?:[\w.]+\s+){0,2}$")
_NUMBERED_LIST = re.compile(r"^\W*1[.)]\s[\s\S]*\n\W*2[.)]\s")


def _side(ref: str) -> int:
    return 0 if re.search(r"1|first|former", ref) else 1


def parse_verdict(answer: str) -> int:
    """0 if the answer picks edited image 1, 1 if it picks edited image 2; `JudgeError` if neither.

    The verdict is the *first explicit* one in the answer (the prompt asks for the answer first, then
    the reason, and reasons often mention the other image): an answer that opens with the reference
    ("2", "Image 2.", "**2**", "edit_image_1"), else the earliest of "answer: 2", "the better one is
    image 1", "image 2 is better", "the second image follows the instruction better", "I choose 2",
    "**Image 2**". A bare mention ("image 1 changes the sky") is not a verdict, nor a negated one
    ("image 2 is not better"); an answer with no verdict ("both are equally good") raises.
    """
    # Same-length substitutions, so match positions agree between the two views.
    text = re.sub(r"[_`#>\"]", " ", answer.lower())
    plain = text.replace("*", " ")
    # "1. Instruction following: ...\n2. Quality: ..." is a list, not an opening verdict "1".
    if not _NUMBERED_LIST.search(plain):
        for rx in (_LEADING_BARE, _LEADING_REF):
            m = rx.match(plain)
            if m:
                return _side(m.group(1))
    found = [m for rx in _VERDICTS for m in rx.finditer(plain)] + list(_BOLD.finditer(text))
    # "image 2 is not better" does not match at all; "neither image 1 nor image 2 is better" does
    # (from "2"), so drop a match whose reference follows a negation.
    found = [m for m in found if not _NEGATED.search(plain, 0, m.start(1))]
    if not found:
        raise JudgeError(f"the judge's answer names no winner (expected 1 or 2): {answer[:200]!r}")
    return _side(min(found, key=lambda m: m.start()).group(1))


# --- the VLM client -----------------------------------------------------------------------------------


def png_data_url(image: Image.Image) -> str:
    """The image as a `data:image/png;base64,...` URL (lossless, so the judge sees what we made)."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _retryable_status(code: int) -> bool:
    return code == 429 or code >= 500  # overload and server faults pass; other 4xx are our mistake


class VLMJudge:
    """A VLM judge behind an OpenAI-compatible `POST {url}/chat/completions` (vLLM, SGLang, OpenAI).

    url:         the API base, e.g. "http://127.0.0.1:8000/v1" (a full ".../chat/completions" also works).
    model:       the served model name, e.g. "Qwen/Qwen2.5-VL-72B-Instruct".
    api_key:     sent as "Authorization: Bearer ..."; when None, read from $FLUX_JUDGE_API_KEY, then
                 $OPENAI_API_KEY; when none is set, no header is sent (a local vLLM needs none).
    timeout:     seconds allowed to connect and for each socket read (urllib's timeout), per attempt.
    both_orders: ask (a, b) and (b, a) and map the second answer back, cancelling the judge's
                 position bias. If the two answers disagree it is a tie, and a tie keeps edit_a (the
                 tournament's incumbent, the earlier candidate). Two requests per comparison; if
                 either fails the comparison fails.
    retries:     extra attempts after a network error, a timeout, HTTP 5xx or 429, waiting
                 backoff * 2**k seconds (capped at max_backoff; a 429/503 Retry-After is honoured up
                 to the cap). Other 4xx (bad key, bad model name) and unparseable answers are not
                 retried: at temperature 0 the same request gets the same answer.
    max_tokens:  room for "1 or 2 and briefly explain why".

    `requests` counts HTTP requests sent (attempts included), for the NFE/cost accounting.
    """

    def __init__(self, url: str, model: str, api_key: str | None = None, timeout: float = 120.0,
                 both_orders: bool = False, retries: int = 3, backoff: float = 1.0, max_backoff: float = 30.0,
                 max_tokens: int = 256, prompt: str = JUDGE_PROMPT):
        if not re.match(r"^https?://", url):
            raise JudgeError(f"judge url must start with http:// or https://, got {url!r} "
                             f"(e.g. http://127.0.0.1:8000/v1)")
        base = url.rstrip("/")
        self.endpoint = base if base.endswith("/chat/completions") else base + "/chat/completions"
        self.model = model
        self.timeout, self.both_orders = timeout, both_orders
        self.retries, self.backoff, self.max_backoff = retries, backoff, max_backoff
        self.max_tokens, self.prompt = max_tokens, prompt
        self._api_key = api_key if api_key is not None else next(
            (os.environ[v] for v in API_KEY_ENV_VARS if os.environ.get(v)), None)
        self._opener = urllib.request.build_opener()  # reads the proxy settings now, per judge
        self.requests = 0

    def __repr__(self) -> str:
        key = "set" if self._api_key else "none"  # the key itself never leaves this object
        return (f"VLMJudge(endpoint={self.endpoint!r}, model={self.model!r}, api_key={key}, "
                f"both_orders={self.both_orders}, timeout={self.timeout}, retries={self.retries})")

    def compare(self, source: Image.Image, edit_a: Image.Image, edit_b: Image.Image, instruction: str) -> int:
        """0 if edit_a is better, 1 if edit_b is; `JudgeError` if the judge gives no verdict."""
        return self.verdict(source, edit_a, edit_b, instruction).winner

    def verdict(self, source: Image.Image, edit_a: Image.Image, edit_b: Image.Image, instruction: str) -> Verdict:
        """`compare` with the judge's explanation. With both_orders a disagreement is a tie -> 0."""
        first, why = self.ask(source, edit_a, edit_b, instruction)
        if not self.both_orders:
            return Verdict(first, why)
        swapped, why2 = self.ask(source, edit_b, edit_a, instruction)
        second = 1 - swapped  # map "1 = edit_b" back to our labels
        if first == second:
            return Verdict(first, f"both orders agree: {why} | swapped: {why2}")
        return Verdict(0, f"orders disagree (position bias), tie keeps edit_a: {why} | swapped: {why2}")

    def ask(self, source: Image.Image, edit_1: Image.Image, edit_2: Image.Image, instruction: str) -> tuple[int, str]:
        """One request: (0 if the judge prefers edit_1 else 1, its answer text)."""
        content: list[dict] = []
        for label, image in zip(IMAGE_LABELS, (source, edit_1, edit_2)):
            content.append({"type": "text", "text": label})
            content.append({"type": "image_url", "image_url": {"url": png_data_url(image)}})
        content.append({"type": "text", "text": self.prompt.format(instruction=instruction)})
        answer = self.chat(content)
        return parse_verdict(answer), answer.strip()

    def chat(self, content: list[dict], max_tokens: int | None = None) -> str:
        """One user message of content parts (text, image_url) at temperature 0 -> the answer text."""
        body = {"model": self.model, "messages": [{"role": "user", "content": content}],
                "temperature": 0, "max_tokens": max_tokens or self.max_tokens}
        return self._answer_text(self._post(json.dumps(body).encode()))

    def _post(self, body: bytes) -> bytes:
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        request = urllib.request.Request(self.endpoint, data=body, headers=headers, method="POST")
        for attempt in range(self.retries + 1):
            retry_after = 0.0
            self.requests += 1
            try:
                with self._opener.open(request, timeout=self.timeout) as response:
                    return response.read()
            except urllib.error.HTTPError as e:  # before URLError: it is a subclass
                detail = e.read(300).decode("utf-8", "replace").strip()
                problem = f"HTTP {e.code} {e.reason}: {detail}"
                if not _retryable_status(e.code):
                    hint = " (check the API key)" if e.code in (401, 403) else ""
                    raise JudgeError(f"judge at {self.endpoint} refused the request: {problem}{hint}") from None
                retry_after = _seconds(e.headers.get("Retry-After"))
            except (urllib.error.URLError, OSError, http.client.HTTPException) as e:  # refused, reset, timeout
                problem = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            if attempt == self.retries:
                raise JudgeError(f"judge at {self.endpoint} failed after {attempt + 1} attempts: {problem}")
            delay = min(max(self.backoff * 2**attempt, retry_after), self.max_backoff)
            logger.info("judge request failed (%s); retry %d/%d in %.2f s", problem, attempt + 1, self.retries, delay)
            time.sleep(delay)
        raise AssertionError("unreachable")

    def _answer_text(self, raw: bytes) -> str:
        try:
            content = json.loads(raw)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise JudgeError(f"judge at {self.endpoint} sent no chat completion: {raw[:200]!r}") from None
        if isinstance(content, list):  # some servers return content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if not isinstance(content, str) or not content.strip():
            raise JudgeError(f"judge at {self.endpoint} sent an empty answer: {raw[:200]!r}")
        return content


def _seconds(value: str | None) -> float:
    try:
        return max(0.0, float(value)) if value else 0.0
    except ValueError:  # an HTTP date: fall back to our own backoff
        return 0.0


# --- an oracle judge -----------------------------------------------------------------------------------


class ScoreJudge:
    """A judge from `score_fn(source, edit, instruction) -> float`, higher is better.

    A tie keeps edit_a (as does a NaN score, since no comparison with NaN is true). Each call scores
    both edits; an exception from score_fn propagates (it is a bug, not an unreachable judge).
    """

    def __init__(self, score_fn: Callable[[Image.Image, Image.Image, str], float]):
        self.score_fn = score_fn

    def compare(self, source: Image.Image, edit_a: Image.Image, edit_b: Image.Image, instruction: str) -> int:
        return self.verdict(source, edit_a, edit_b, instruction).winner

    def verdict(self, source: Image.Image, edit_a: Image.Image, edit_b: Image.Image, instruction: str) -> Verdict:
        a, b = self.score_fn(source, edit_a, instruction), self.score_fn(source, edit_b, instruction)
        return Verdict(1 if b > a else 0, f"scores {a:.4g} vs {b:.4g}")


# --- the tournament ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Comparison:
    incumbent: int  # candidate index shown as edit_a
    challenger: int  # candidate index shown as edit_b
    winner: int  # candidate index kept (the incumbent when the judge failed)
    reason: str  # the judge's explanation, if it gives one
    error: str | None = None  # why the judge gave no verdict; None when it did


@dataclass
class TournamentResult:
    winner: int  # index into the candidates
    comparisons: int  # judge calls made (M - 1 unless max_failures stopped asking)
    failures: int  # comparisons decided by the fallback (failed or skipped)
    log: list[Comparison] = field(default_factory=list)


def tournament(source: Image.Image, candidates: list[Image.Image], instruction: str, judge: Judge,
               max_failures: int | None = None) -> TournamentResult:
    """The paper's pairwise max-finding pass: incumbent = 0; for i in 1..M-1, keep the better of
    (incumbent, i) as judged by `judge.compare(source, candidates[incumbent], candidates[i],
    instruction)`. Exactly M - 1 judge calls (a `VLMJudge` with both_orders sends 2 requests each).

    The incumbent is always edit_a, the earlier candidate. When the judge raises `JudgeError`
    (unreachable, timed out, garbage, after its own retries) the comparison keeps the incumbent and
    a warning is logged; the pass always completes. Keeping the incumbent is deterministic, and with
    the judge fully down the result is candidate 0, the base seed: exactly the run without scaling.
    max_failures: after this many failed comparisons stop asking (each failure can cost retries x
    timeout) and keep the incumbent for the rest; None always asks.
    """
    if not candidates:
        raise FluxMinimalError("tournament needs at least one candidate image")
    explain = isinstance(judge, ExplainingJudge)
    result = TournamentResult(winner=0, comparisons=0, failures=0)
    for i in range(1, len(candidates)):
        inc = result.winner
        if max_failures is not None and result.failures >= max_failures:
            result.failures += 1
            result.log.append(Comparison(inc, i, inc, "", f"skipped after {max_failures} failed comparisons"))
            continue
        result.comparisons += 1
        try:
            if explain:
                v = judge.verdict(source, candidates[inc], candidates[i], instruction)
                side, reason = v.winner, v.reason
            else:
                side, reason = judge.compare(source, candidates[inc], candidates[i], instruction), ""
        except JudgeError as e:
            logger.warning("judge failed on candidate %d vs %d, keeping candidate %d: %s", inc, i, inc, e)
            result.failures += 1
            result.log.append(Comparison(inc, i, inc, "", str(e)))
            continue
        if side not in (0, 1):
            raise ValueError(f"{type(judge).__name__}.compare returned {side!r}; a judge returns 0 or 1")
        result.winner = i if side == 1 else inc
        result.log.append(Comparison(inc, i, result.winner, reason))
    if result.failures and result.failures == len(candidates) - 1:
        logger.warning("the judge decided no comparison: keeping candidate 0 (the same as no scaling)")
    return result
