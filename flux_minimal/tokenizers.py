"""The two tokenizers of FLUX: T5's (sentencepiece) and CLIP's (byte-level BPE, written out here).

Both are callables `tok(texts: list[str]) -> LongTensor [B, max_length]`, truncating and padding
exactly as FLUX's pipelines call Hugging Face's tokenizers (`padding="max_length",
truncation=True`), and warning when text is cut off. Facts in docs/flux.md section 7.

T5: `spiece.model` holds its own normaliser (NFKC-like rules, the "▁" word prefix, whitespace
folding), so we call the sentencepiece library instead of reimplementing it; then
`ids[:max_length-1] + [</s>]`, right-padded with <pad> (0). No BOS.

CLIP, as transformers' CLIPTokenizer does it (id for id; openai's CLIP minus ftfy's repairs):
    text -> NFC -> every whitespace run to " " -> lower case (char by char)
         -> pre-tokens by CLIP's regex (words, single digits, punctuation runs, contractions),
            each split again by GPT-2's (a no-op but for "<|endoftext|>"-like text, see GPT2_PATTERN)
         -> each pre-token's UTF-8 bytes as printable characters (bytes_to_unicode), "</w>" on the last
         -> BPE: merge the adjacent pair of lowest rank (merges.txt order) until none is left
            (vocab.json + merges.txt, or the same two tables in a transformers-5 tokenizer.json)
    ids = [<|startoftext|>] + ids[:max_length-2] + [<|endoftext|>], padded with <|endoftext|>
"""

import json
import unicodedata
import warnings
from collections import Counter
from functools import lru_cache
from pathlib import Path

import regex
import torch
from torch import Tensor

from .errors import WeightsError
from .loading import WEIGHTS_HELP


def _require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise WeightsError(f"{path}: no such file (the {what}). {WEIGHTS_HELP}")
    return path


def _pad_rows(rows: list[list[int]], max_length: int, pad_id: int) -> Tensor:
    return torch.tensor([r + [pad_id] * (max_length - len(r)) for r in rows], dtype=torch.long)  # [B, max_length]


def _warn_truncated(name: str, cut: list[tuple[int, int]], max_length: int) -> None:
    if cut:
        which = ", ".join(f"text {i} ({n} tokens)" for i, n in cut[:5])
        warnings.warn(f"{name}: {which} cut to max_length={max_length} tokens; the end of the text is ignored",
                      stacklevel=3)


class T5Tokenizer:
    """`T5Tokenizer(spiece_path, max_length=512)(texts) -> LongTensor [B, max_length]`."""

    def __init__(self, spiece_path: str | Path, max_length: int = 512):
        import sentencepiece  # imported here: only T5 needs it

        self.path = _require_file(Path(spiece_path), "T5 sentencepiece model, tokenizer_2/spiece.model")
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=str(self.path))
        except (RuntimeError, OSError) as e:
            raise WeightsError(f"{self.path} is not a sentencepiece model ({e}). {WEIGHTS_HELP}") from None
        self.max_length = max_length
        # HF's T5 ids, by name: <pad> = 0, </s> = 1, <unk> = 2 in every T5 vocabulary.
        self.pad_id, self.eos_id = self._id("<pad>"), self._id("</s>")
        # Like HF, special tokens written in the text are those tokens, not their characters; the
        # 100 sentinels follow the pieces in reverse (<extra_id_0> = 32099 for T5's 32000 pieces).
        n = self.sp.get_piece_size()
        self.specials = {"<pad>": self.pad_id, "</s>": self.eos_id, "<unk>": self.sp.unk_id()}
        self.specials |= {f"<extra_id_{i}>": n + 99 - i for i in range(100)}
        self.special_pattern = regex.compile("(" + "|".join(map(regex.escape, self.specials)) + ")")
        self.vocab_size = n + 100  # ids in [0, vocab_size); T5's embedding has 32128 >= 32100 rows

    def _id(self, piece: str) -> int:
        i = self.sp.piece_to_id(piece)
        if self.sp.id_to_piece(i) != piece:
            raise WeightsError(f"{self.path} has no {piece!r} piece: it is not a T5 sentencepiece model. "
                               f"{WEIGHTS_HELP}")
        return i

    def encode(self, text: str) -> list[int]:
        """Content ids of one text, without </s> and untruncated."""
        parts = self.special_pattern.split(text)  # odd parts are special tokens
        if len(parts) == 1:
            return self.sp.encode(text)
        ids = []
        for j, part in enumerate(parts):
            ids += [self.specials[part]] if j % 2 else self.sp.encode(part)
        return ids

    def __call__(self, texts: list[str] | str) -> Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        rows, cut = [], []
        for i, ids in enumerate(self.encode(t) for t in texts):
            if len(ids) > self.max_length - 1:
                cut.append((i, len(ids) + 1))
                ids = ids[: self.max_length - 1]
            rows.append(ids + [self.eos_id])
        _warn_truncated("T5 tokenizer", cut, self.max_length)
        return _pad_rows(rows, self.max_length, self.pad_id)


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """Byte -> a printable character: the 188 printable Latin-1 bytes map to themselves, the other
    68 (controls, space, soft hyphen, ...) in increasing order to chr(256), chr(257), ...
    Ordered as CLIP orders it, printable bytes first: the first 256 ids of its vocabulary are these
    values in this order (so "a" is 64 and "a</w>" 256 + 64 = 320)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


def merge_pair(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    """Merge every occurrence of `pair` in `symbols`, left to right (one BPE step)."""
    merged, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            merged.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            merged.append(symbols[i])
            i += 1
    return merged


BOS_TOKEN, EOS_TOKEN = "<|startoftext|>", "<|endoftext|>"
# CLIP's pre-tokenizer: the specials, contractions, letter runs, single digits, other non-space runs.
CLIP_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""")
# transformers then re-splits each pre-token with GPT-2's byte-level pattern. That changes only
# pre-tokens matched by the special alternatives after lower-casing ("<|EndOfText|>" -> "<|",
# "endoftext", "|>"), but we follow it rather than guess which pieces it cannot touch.
GPT2_PATTERN = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
# The specials are recognised in the raw text (before lower-casing), like HF's added tokens.
SPECIALS = regex.compile(r"(<\|startoftext\|>|<\|endoftext\|>)")
WHITESPACE = regex.compile(r"\s+")


def learn_clip_merges(texts: list[str], n_merges: int, min_count: int = 2) -> list[tuple[str, str]]:
    """A byte-level BPE learnt CLIP's way, for small vocabularies (the miniature model, tests): the
    lower-cased texts' pre-tokens as byte symbols with </w> on each word's last one, then repeatedly
    the most frequent adjacent pair is merged (ties: the larger pair), until n_merges or no pair
    occurs min_count times."""
    b2u = bytes_to_unicode()
    counts = Counter(tok for t in texts for tok in CLIP_PATTERN.findall(t.lower()))
    words = {tuple([*(b2u[b] for b in w.encode()[:-1]), b2u[w.encode()[-1]] + "</w>"]): n for w, n in counts.items()}
    merges = []
    while len(merges) < n_merges:
        pairs = Counter()
        for symbols, n in words.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += n
        if not pairs or max(pairs.values()) < min_count:
            break
        best = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))[0]
        merges.append(best)
        words = {tuple(merge_pair(list(symbols), best)): n for symbols, n in words.items()}
    return merges


def clip_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """CLIP's vocabulary for a merge list, in openai's order: the 256 byte symbols, the same with
    </w>, one token per merge, then <|startoftext|> and <|endoftext|> (so EOS is the last id)."""
    symbols = list(bytes_to_unicode().values())
    tokens = [*symbols, *(s + "</w>" for s in symbols), *("".join(m) for m in merges), BOS_TOKEN, EOS_TOKEN]
    return {t: i for i, t in enumerate(tokens)}


def read_vocab_and_merges(vocab_path: Path, merges_path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """vocab.json ({token: id}) and merges.txt (one "a b" pair a line, ranked by order; an optional
    "#version" first line), as transformers 4 and FLUX's tokenizer/ folder store CLIP's BPE."""
    vocab_path = _require_file(Path(vocab_path), "CLIP vocabulary, tokenizer/vocab.json")
    merges_path = _require_file(Path(merges_path), "CLIP merges, tokenizer/merges.txt")
    try:
        encoder = json.loads(vocab_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise WeightsError(f"{vocab_path} is not valid JSON ({e}). {WEIGHTS_HELP}") from None
    lines = merges_path.read_text(encoding="utf-8").splitlines()
    if lines and lines[0].startswith("#version"):
        lines = lines[1:]
    merges = [tuple(line.split()) for line in lines if line.strip()]
    if any(len(m) != 2 for m in merges):
        raise WeightsError(f"{merges_path}: every line must be two symbols separated by a space. {WEIGHTS_HELP}")
    return encoder, merges


def read_tokenizer_json(path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The same BPE from a `tokenizers` file (tokenizer.json, all that transformers 5 saves for
    CLIP): model.vocab, model.merges as ["a", "b"] pairs (or "a b" strings, as tokenizers < 0.20
    wrote them), and the specials of added_tokens where the vocabulary lacks them."""
    path = _require_file(Path(path), "CLIP tokenizer, tokenizer/tokenizer.json")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise WeightsError(f"{path} is not valid JSON ({e}). {WEIGHTS_HELP}") from None
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE" or model.get("end_of_word_suffix") != "</w>":
        kind = {k: model.get(k) for k in ("type", "end_of_word_suffix")} if isinstance(model, dict) else None
        raise WeightsError(f"{path}: \"model\" is not CLIP's byte-level BPE (type \"BPE\" with end_of_word_suffix "
                           f"\"</w>\"); found {kind}. {WEIGHTS_HELP}")
    encoder = dict(model.get("vocab") or {})
    for token in data.get("added_tokens") or []:
        encoder.setdefault(token["content"], token["id"])
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges") or []]
    if any(len(m) != 2 for m in merges):
        raise WeightsError(f"{path}: every model.merges entry must be a pair of symbols. {WEIGHTS_HELP}")
    return encoder, merges


class CLIPTokenizer:
    """`CLIPTokenizer(vocab_path, merges_path, max_length=77)(texts) -> LongTensor [B, max_length]`;
    `CLIPTokenizer.from_folder(folder)` also reads a folder holding only tokenizer.json."""

    def __init__(self, vocab_path: str | Path, merges_path: str | Path, max_length: int = 77):
        self._setup(*read_vocab_and_merges(vocab_path, merges_path), max_length, Path(vocab_path))

    @classmethod
    def from_folder(cls, folder: str | Path, max_length: int = 77) -> "CLIPTokenizer":
        """vocab.json + merges.txt when both are there, else tokenizer.json (a folder saved by transformers 5)."""
        folder = Path(folder)
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            return cls(folder / "vocab.json", folder / "merges.txt", max_length)
        if not (folder / "tokenizer.json").is_file():
            raise WeightsError(f"{folder}: no CLIP tokenizer here: it needs vocab.json + merges.txt, or tokenizer.json "
                               f"(as `huggingface-cli download` or transformers' save_pretrained write them). "
                               f"{WEIGHTS_HELP}")
        tokenizer = cls.__new__(cls)
        tokenizer._setup(*read_tokenizer_json(folder / "tokenizer.json"), max_length, folder / "tokenizer.json")
        return tokenizer

    def _setup(self, encoder: dict[str, int], merges: list[tuple[str, str]], max_length: int, source: Path) -> None:
        self.encoder = encoder
        self.bpe_ranks: dict[tuple[str, str], int] = {m: i for i, m in enumerate(merges)}
        for token in (BOS_TOKEN, EOS_TOKEN):
            if token not in self.encoder:
                raise WeightsError(f"{source} has no {token}: it is not a CLIP vocabulary. {WEIGHTS_HELP}")
        self.bos_id, self.eos_id = self.encoder[BOS_TOKEN], self.encoder[EOS_TOKEN]
        self.pad_id = self.unk_id = self.eos_id  # FLUX's tokenizer_config: pad = unk = <|endoftext|>
        self.vocab_size = max(self.encoder.values()) + 1  # ids in [0, vocab_size)
        self.max_length = max_length
        self.byte_encoder = bytes_to_unicode()
        self.cache: dict[str, list[int]] = {}

    def normalize(self, text: str) -> str:
        """NFC, whitespace runs to one space, lower case one character at a time (so a final capital
        sigma becomes "σ" as in transformers' Rust normaliser, not Python's word-final "ς")."""
        text = WHITESPACE.sub(" ", unicodedata.normalize("NFC", text))
        return "".join(c.lower() for c in text)

    def bpe(self, word: str) -> list[int]:
        """One pre-token (already bytes_to_unicode'd) -> its ids; cached, as prompts repeat words."""
        if word in self.cache:
            return self.cache[word]
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            pairs = {(a, b) for a, b in zip(symbols, symbols[1:])}
            best = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if best not in self.bpe_ranks:
                break
            symbols = merge_pair(symbols, best)
        ids = [self.encoder.get(s, self.unk_id) for s in symbols]
        if len(self.cache) < 100_000:  # bounded: a long-running server sees unbounded text
            self.cache[word] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """Content ids of one text, without BOS/EOS and untruncated."""
        ids = []
        for part in SPECIALS.split(text):  # odd parts are the special tokens themselves
            if part in (BOS_TOKEN, EOS_TOKEN):
                ids.append(self.encoder[part])
                continue
            for piece in CLIP_PATTERN.findall(self.normalize(part)):
                for token in GPT2_PATTERN.findall(piece):
                    ids += self.bpe("".join(self.byte_encoder[b] for b in token.encode("utf-8")))
        return ids

    def __call__(self, texts: list[str] | str) -> Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        rows, cut = [], []
        for i, text in enumerate(texts):
            ids = self.encode(text)
            if len(ids) > self.max_length - 2:
                cut.append((i, len(ids) + 2))
                ids = ids[: self.max_length - 2]
            rows.append([self.bos_id] + ids + [self.eos_id])
        _warn_truncated("CLIP tokenizer", cut, self.max_length)
        return _pad_rows(rows, self.max_length, self.pad_id)
