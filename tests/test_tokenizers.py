"""Both tokenizers id for id against transformers' (version 5: both backed by `tokenizers`).

CLIP: on the real CLIP vocabulary (fetched once from the open-clip-torch wheel, see
text_fixtures.real_clip_vocab) and on a tiny BPE trained here (offline). T5: on a sentencepiece
model trained here; our T5 tokenizer *is* sentencepiece plus FLUX's truncation and padding, so
it also equals what transformers' slow T5Tokenizer (4.x, sentencepiece-backed) gave.
"""

import random
import warnings

import pytest
import sentencepiece as spm
import torch
from transformers import CLIPTokenizer as HFCLIPTokenizer

from flux_minimal.icedit import IC_PROMPT
from flux_minimal import CLIPTokenizer, T5Tokenizer, WeightsError
from flux_minimal.tokenizers import bytes_to_unicode
from tests.text_fixtures import (CLIP_VOCAB_HELP, hf_t5_tokenizer, real_clip_vocab, train_clip_merges,
                                 train_spiece, write_clip_tokenizer)

CORPUS = [
    "a photo of a cat", "Make the sky PURPLE!!!", IC_PROMPT.format(instruction="turn the cat into a tiger"),
    "hello--world...!? (parens) [brackets] {braces} #hash @at $5 100% a+b=c", "'quoted' \"double\" `back`",
    "don't it's we're they've I'm you'll he'd DON'T IT'S", "it''s 'S 'LL ab'sx",
    "12345 3.14 1,000,000 2024-06-01 10:30", "café naïve résumé Ångström Straße", "e\u0301 (combining accent)",
    "😀🌈👍🏽 emoji 🇫🇷", "東京タワー 你好世界 안녕하세요", "  extra   whitespace\t\tand\nnewlines  ",
    "ΟΔΟΣ Σ σ ς", "İstanbul", "\x00\x01control\x7f chars", "a\u00a0b\u2003c\u200bd\u3000e",
    "ﬁ ligature ½ ² ① Ａｂｃ", "&amp; &lt;html&gt;", "𝓗𝓮𝓵𝓵𝓸", "", " ",
    "<|endoftext|> inside <|startoftext|>", "<|EndOfText|>", "word " * 100,  # the last one is truncated
]


def fuzz_strings(n: int, seed: int = 0) -> list[str]:
    """Random strings over ASCII, Latin-1, Greek, CJK, emoji, combining marks and odd whitespace."""
    rng = random.Random(seed)
    alphabet = [chr(c) for c in list(range(32, 127)) * 3 + list(range(0xA0, 0x17F)) + list(range(0x370, 0x3FF))
                + list(range(0x4E00, 0x4E20)) + list(range(0x1F600, 0x1F610))
                + [9, 10, 13, 0x0, 0x1F, 0x85, 0xAD, 0x200B, 0x2028, 0x3000, 0x300, 0x301]]
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(n)]


def quiet(tok, texts):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tok(texts)


# ---- CLIP ----------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def real_clip():
    try:
        folder = real_clip_vocab()
    except (RuntimeError, OSError, ValueError) as e:
        pytest.skip(f"the real CLIP vocabulary is not available: {e}. {CLIP_VOCAB_HELP}")
    ours = CLIPTokenizer(folder / "vocab.json", folder / "merges.txt")
    return ours, HFCLIPTokenizer.from_pretrained(folder)


def hf_clip_ids(tok, texts, max_length=77):
    return tok(texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt").input_ids


def test_clip_real_vocabulary_known_ids(real_clip):
    ours, _ = real_clip
    assert len(ours.encoder) == 49408 and (ours.bos_id, ours.eos_id, ours.pad_id) == (49406, 49407, 49407)
    ids = ours(["a photo of a cat"])
    assert ids.shape == (1, 77) and ids.dtype == torch.long
    assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]  # openai CLIP's ids
    assert (ids[0, 7:] == 49407).all()  # FLUX pads with <|endoftext|>


def test_clip_id_for_id_real_vocabulary(real_clip):
    ours, ref = real_clip
    assert torch.equal(quiet(ours, CORPUS), hf_clip_ids(ref, CORPUS))
    fuzz = fuzz_strings(300)
    assert torch.equal(quiet(ours, fuzz), hf_clip_ids(ref, fuzz))


def test_clip_truncation_warns(real_clip):
    ours, ref = real_clip
    long = "word " * 100  # 100 tokens
    with pytest.warns(UserWarning, match=r"CLIP tokenizer: text 1 \(102 tokens\) cut to max_length=77"):
        ids = ours(["short", long])
    assert ids[1, -1] == 49407 and torch.equal(ids, hf_clip_ids(ref, ["short", long]))
    exactly = " ".join(["word"] * 75)  # 75 + BOS + EOS = 77: fits
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ours([exactly])[0, -1] == 49407


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A 768-id vocabulary (so other special ids: 766 and 767) from a BPE trained here: offline."""
    return write_clip_tokenizer(tmp_path_factory.mktemp("clip_tok"), train_clip_merges(254))


def test_clip_id_for_id_tiny_vocabulary(tiny_clip):
    ours = CLIPTokenizer(tiny_clip / "vocab.json", tiny_clip / "merges.txt")
    ref = HFCLIPTokenizer.from_pretrained(tiny_clip)
    assert (ours.bos_id, ours.eos_id) == (766, 767)
    texts = CORPUS + fuzz_strings(200, seed=1)
    assert torch.equal(quiet(ours, texts), hf_clip_ids(ref, texts))


def test_clip_max_length(tiny_clip):
    ours = CLIPTokenizer(tiny_clip / "vocab.json", tiny_clip / "merges.txt", max_length=8)
    ref = HFCLIPTokenizer.from_pretrained(tiny_clip)
    texts = ["a short one", "make the sky purple and the grass blue please"]
    assert torch.equal(quiet(ours, texts), hf_clip_ids(ref, texts, max_length=8))


def test_bytes_to_unicode():
    table = bytes_to_unicode()
    assert len(set(table.values())) == 256
    assert all(c.isprintable() and not c.isspace() for c in table.values())
    assert table[ord("a")] == "a" and table[ord(" ")] == "Ġ" and table[0] == "Ā"


# ---- T5 ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def spiece(tmp_path_factory):
    return train_spiece(tmp_path_factory.mktemp("spiece"))


def hf_t5_ids(tok, texts, max_length):
    return tok(texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt").input_ids


@pytest.mark.parametrize("max_length", [16, 512])
def test_t5_id_for_id(spiece, max_length):
    ours, ref = T5Tokenizer(spiece, max_length=max_length), hf_t5_tokenizer(spiece)
    # U+0085 is whitespace to transformers 5's T5 tokenizer, a character to sentencepiece (and so to
    # the slow tokenizer BFL used): left to test_t5_equals_sentencepiece_on_anything.
    fuzz = [t for t in fuzz_strings(200, seed=2) if "\x85" not in t]
    texts = CORPUS + ["</s> <pad> <unk> <extra_id_0> <extra_id_99> sentinels in text"] + fuzz
    out = quiet(ours, texts)
    assert out.shape == (len(texts), max_length)
    assert torch.equal(out, hf_t5_ids(ref, texts, max_length))


def test_t5_layout_and_warning(spiece):
    ours = T5Tokenizer(spiece, max_length=16)
    sp = spm.SentencePieceProcessor(model_file=str(spiece))
    text = "make the sky purple"
    n = len(sp.encode(text))
    assert n < 15
    ids = ours(text)[0].tolist()  # a single string is accepted too
    assert ids == sp.encode(text) + [1] + [0] * (15 - n)  # content, </s>, pads; no BOS

    long = " ".join(["purple"] * 40)
    with pytest.warns(UserWarning, match=r"T5 tokenizer: text 0 \(\d+ tokens\) cut to max_length=16"):
        ids = ours([long])[0].tolist()
    assert ids == sp.encode(long)[:15] + [1]  # cut to max_length - 1, then </s>

    # the boundary: n content tokens fit max_length n + 1 silently, and warn at max_length n
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert T5Tokenizer(spiece, max_length=n + 1)(text)[0].tolist() == sp.encode(text) + [1]
    with pytest.warns(UserWarning, match=f"cut to max_length={n}"):
        assert T5Tokenizer(spiece, max_length=n)(text)[0].tolist() == sp.encode(text)[:n - 1] + [1]


def test_t5_equals_sentencepiece_on_anything(spiece):
    """transformers 5's T5 tokenizer re-implements sentencepiece and differs on rare inputs (U+0085,
    "²" + a combining accent); ours is sentencepiece itself, as the slow one was."""
    ours, sp = T5Tokenizer(spiece, max_length=64), spm.SentencePieceProcessor(model_file=str(spiece))
    for text in fuzz_strings(300, seed=3) + ["²\u0301dĄeU", "a\x85b"]:
        ids = sp.encode(text)[:63] + [1]
        assert quiet(ours, [text])[0].tolist() == ids + [0] * (64 - len(ids))


# ---- errors ------------------------------------------------------------------------------------

def test_errors(tmp_path, spiece):
    with pytest.raises(WeightsError, match=r"spiece\.model: no such file.*weights\.md"):
        T5Tokenizer(tmp_path / "spiece.model")
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(WeightsError, match=r"bad\.model is not a sentencepiece model"):
        T5Tokenizer(tmp_path / "bad.model")
    with pytest.raises(WeightsError, match=r"vocab\.json: no such file"):
        CLIPTokenizer(tmp_path / "vocab.json", tmp_path / "merges.txt")
    (tmp_path / "vocab.json").write_text('{"a": 0}')
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(WeightsError, match=r"vocab\.json has no <\|startoftext\|>"):
        CLIPTokenizer(tmp_path / "vocab.json", tmp_path / "merges.txt")
