"""VIE-Score for text-guided image editing (Ku et al. 2024), asked of a VLM behind infer/judge.py's client.

Two questions per edit, each answered as {"score": [a, b], "reasoning": "..."} on a 0-10 scale:
    SC (semantic consistency)  the source and the edit, in that order, with the instruction:
                               [editing success, degree of over-editing]
    PQ (perceptual quality)    the edit alone: [naturalness, artifacts]
    SC = min(SC scores), PQ = min(PQ scores), Overall = sqrt(SC x PQ)
The prompts are VIEScore's own for its "tie" task (its `viescore` package: the context without
delimiters, then the rules), quoted below; as there, the text comes first and the images after it in
one user message. The paper's "GPT" column on Emu Edit is not reproduced: ICEdit has not published
how it is computed (its issue #61: "in the Sup. Mat., not released"), so evaluate.py reports SC, PQ
and Overall and leaves that column empty.

Two ways to ask, differing where the reference leaves results to chance:
    ours (default)   any OpenAI-compatible judge, temperature 0, PNG images; a reply that cannot be
                     parsed, or a judge that fails, leaves that sample's scores empty
    compat=True      VIEScore's own requests (mllm_tools/openai.py, viescore/__init__.py): GPT-4o
                     (gpt-4o-2024-05-13 at api.openai.com unless a judge is given), no temperature
                     (the API's default), JPEG images (PIL's default quality 75, EXIF applied), 1400
                     max tokens; when either reply cannot be parsed both are asked again, and a reply
                     still unparseable becomes one random integer score in 0..10 (its
                     `guess_if_cannot_parse`; seeded here, and counted as `vie_guessed`). The reference
                     would ask a third time, without end, for a reply with braces that never parse;
                     here the second try is the last. A judge that fails still leaves the sample empty.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import math
import random
import re

from PIL import Image, ImageOps

from infer.judge import JudgeError, VLMJudge, png_data_url

logger = logging.getLogger(__name__)

CONTEXT = """You are a professional digital artist. You will have to evaluate the effectiveness of the AI-generated image(s) based on given rules.
All the input images are AI-generated. All human in the images are AI-generated too. so you need not worry about the privacy confidentials.

You will have to give your output in this way (Keep your reasoning concise and short.):
{
"score" : [...],
"reasoning" : "..."
}"""

SC_RULES = """RULES:

Two images will be provided: The first being the original AI-generated image and the second being an edited version of the first.
The objective is to evaluate how successfully the editing instruction has been executed in the second image.

Note that sometimes the two images might look identical due to the failure of image edit.


From scale 0 to 10: 
A score from 0 to 10 will be given based on the success of the editing. (0 indicates that the scene in the edited image does not follow the editing instruction at all. 10 indicates that the scene in the edited image follow the editing instruction text perfectly.)
A second score from 0 to 10 will rate the degree of overediting in the second image. (0 indicates that the scene in the edited image is completely different from the original. 10 indicates that the edited image can be recognized as a minimal edited yet effective version of original.)
Put the score in a list such that output score = [score1, score2], where 'score1' evaluates the editing success and 'score2' evaluates the degree of overediting.

Editing instruction: <instruction>
"""

PQ_RULES = """RULES:

The image is an AI-generated image.
The objective is to evaluate how successfully the image has been generated.

From scale 0 to 10: 
A score from 0 to 10 will be given based on image naturalness. 
(
    0 indicates that the scene in the image does not look natural at all or give a unnatural feeling such as wrong sense of distance, or wrong shadow, or wrong lighting. 
    10 indicates that the image looks natural.
)
A second score from 0 to 10 will rate the image artifacts. 
(
    0 indicates that the image contains a large portion of distortion, or watermark, or scratches, or blurred faces, or unusual body parts, or subjects not harmonized. 
    10 indicates the image has no artifacts.
)
Put the score in a list such that output score = [naturalness, artifacts]"""

SC_PROMPT = CONTEXT + "\n" + SC_RULES
PQ_PROMPT = CONTEXT + "\n" + PQ_RULES


def parse_scores(answer: str) -> list[float]:
    """The "score" list of a reply: the JSON object from the first "{" to the last "}" (newlines
    removed, as VIEScore does), or a bare "[a, b]"; every score must be a number in [0, 10]."""
    start, end = answer.find("{"), answer.rfind("}")
    scores = None
    if start != -1 and end > start:
        try:
            scores = json.loads(answer[start:end + 1].replace("\n", " "))["score"]
        except (json.JSONDecodeError, KeyError, TypeError):
            scores = None
    if scores is None and (m := re.search(r"\[\s*(\d+(?:\.\d+)?)\s*,\s*(\d+(?:\.\d+)?)\s*\]", answer)):
        scores = [float(m.group(1)), float(m.group(2))]
    scores = [scores] if isinstance(scores, (int, float)) else scores
    if not (isinstance(scores, list) and scores and all(isinstance(x, (int, float)) and 0 <= x <= 10 for x in scores)):
        raise JudgeError(f"no 0-10 score list in the judge's answer: {answer[:200]!r}")
    return [float(x) for x in scores]


def jpeg_data_url(image: Image.Image) -> str:
    """VIEScore's encode_pil_image after its load_image: EXIF applied, RGB, JPEG at PIL's default quality."""
    buf = io.BytesIO()
    ImageOps.exif_transpose(image).convert("RGB").save(buf, format="JPEG")
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def try_parse(answer: str) -> list[float] | None:
    try:
        return parse_scores(answer)
    except JudgeError:
        return None


REFERENCE_URL, REFERENCE_MODEL = "https://api.openai.com/v1", "gpt-4o-2024-05-13"  # VIEScore's GPT4o class


class UnsetTemperatureJudge(VLMJudge):
    """The judge client sending VIEScore's request body: model, messages and max_tokens, no temperature."""

    def chat(self, content: list[dict], max_tokens: int | None = None) -> str:
        body = {"model": self.model, "messages": [{"role": "user", "content": content}],
                "max_tokens": max_tokens or self.max_tokens}
        return self._answer_text(self._post(json.dumps(body).encode()))


class VIEScore:
    """`VIEScore(url, model).score(source, edit, instruction) -> {"sc", "pq", "overall"}` (0-10);
    `compat=True` asks as the reference does (module docstring), `seed` seeds its guesses."""

    def __init__(self, url: str, model: str, compat: bool = False, seed: int = 0, **judge_kw):
        judge = UnsetTemperatureJudge if compat else VLMJudge
        self.judge = judge(url, model, **{"max_tokens": 1400, **judge_kw})
        self.compat, self.rng = compat, random.Random(seed)
        self.encode = jpeg_data_url if compat else png_data_url

    def _content(self, prompt: str, images: list[Image.Image]) -> list[dict]:
        return [{"type": "text", "text": prompt},
                *({"type": "image_url", "image_url": {"url": self.encode(im)}} for im in images)]

    def score(self, source: Image.Image, edit: Image.Image, instruction: str) -> dict:
        sc_ask = self._content(SC_PROMPT.replace("<instruction>", instruction), [source, edit])
        pq_ask = self._content(PQ_PROMPT, [edit])
        if self.compat:
            return self._score_as_reference(sc_ask, pq_ask)
        sc, pq = min(parse_scores(self.judge.chat(sc_ask))), min(parse_scores(self.judge.chat(pq_ask)))
        return {"sc": sc, "pq": pq, "overall": math.sqrt(sc * pq)}

    def _score_as_reference(self, sc_ask: list[dict], pq_ask: list[dict]) -> dict:
        """VIEScore.evaluate's loop: both asked; if either reply is unparseable, both asked again;
        what is still unparseable then becomes [random.randint(0, 10)]."""
        for _ in range(2):
            scores = [try_parse(self.judge.chat(ask)) for ask in (sc_ask, pq_ask)]
            if None not in scores:
                break
        guessed = sum(s is None for s in scores)
        sc, pq = (min(s) if s is not None else float(self.rng.randint(0, 10)) for s in scores)
        return {"sc": sc, "pq": pq, "overall": math.sqrt(sc * pq), "vie_guessed": guessed}

    def score_or_none(self, source: Image.Image, edit: Image.Image, instruction: str) -> dict:
        """`score`, or empty scores (and a warning) when the judge fails: the run goes on."""
        try:
            return self.score(source, edit, instruction)
        except JudgeError as e:
            logger.warning("VIE-Score left empty for %r: %s", instruction, e)
            print(f"warning: VIE-Score left empty ({e})")
            return {"sc": None, "pq": None, "overall": None, "vie_error": str(e)[:200]}
