"""Text test fixtures: tiny tokenizers trained here, the real CLIP vocabulary, and a tiny snapshot's
four text folders, all offline except `real_clip_vocab` (one `pip download`, cached).

For a pipeline test snapshot:

    write_tiny_text_components(root)   # root/text_encoder, text_encoder_2, tokenizer, tokenizer_2

writes what diffusers' FluxFillPipeline loads (CLIPTextModel, T5EncoderModel, CLIPTokenizer,
T5TokenizerFast `.from_pretrained(root, subfolder=...)`) with random weights and dimensions that
match PRESETS["tiny-fill"] (T5 d_model = context_in_dim 64, CLIP hidden = vec_in_dim 32).

transformers here is version 5: its T5Tokenizer reads a bare spiece.model only with `protobuf`
installed, which this project does not need; so the T5 oracle is built from the model's pieces,
scores and normaliser (read with a 20-line protobuf reader), as transformers' own converter does,
and tokenizer_2/ also gets the tokenizer.json that FLUX's real folder has.
"""

import gzip
import json
import os
import random
import subprocess
import sys
import zipfile

from dataclasses import dataclass
from pathlib import Path

from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel
from transformers import CLIPTokenizer as HFCLIPTokenizer
from transformers import T5Tokenizer as HFT5Tokenizer

from flux_minimal import PRESETS
from flux_minimal.icedit import IC_PROMPT
from flux_minimal.tokenizers import clip_vocab, learn_clip_merges
from tests.helpers import randomize_

REPO = Path(__file__).resolve().parents[1]
_WORDS = ("make turn add remove replace keep change the a an sky purple red green blue cat dog tiger car bicycle "
          "mountain snow rain sun moon person people left right side image photo picture background style "
          "painting watercolor cartoon anime realistic night day bright dark please into with of on in at to "
          "from and or but not very big small old new happy wearing hat glasses hair face smile The Make Add "
          "Remove Turn Replace café naïve résumé über straße 東京 猫 犬 こんにちは 😀 🌈 0 1 2 3 4 5 6 7 8 9 "
          ", . ! ? ; : ' \" ( ) - don't it's we're I'm").split()


def text_corpus(n: int = 2000, seed: int = 0) -> list[str]:
    """Prompt-like lines (the in-context template among them) to train the tiny tokenizers on."""
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 15))) for _ in range(n)]
    return lines + [IC_PROMPT.format(instruction=line) for line in lines[:50]]


# ---- T5: sentencepiece ---------------------------------------------------------------------------

def train_spiece(folder: Path, vocab_size: int = 128, seed: int = 0) -> Path:
    """A unigram sentencepiece model with T5's special ids (<pad> 0, </s> 1, <unk> 2, no BOS) and
    its default normaliser (nmt_nfkc). One thread, so the same corpus gives the same model."""
    import sentencepiece as spm

    folder.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text_corpus(seed=seed)), model_prefix=str(folder / "spiece"), vocab_size=vocab_size,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>",
        unk_piece="<unk>", character_coverage=1.0, num_threads=1, minloglevel=2)
    (folder / "spiece.vocab").unlink(missing_ok=True)
    return folder / "spiece.model"


def _proto_fields(buf: bytes):
    """(field number, value) of one protobuf message; length-delimited values as bytes."""
    i = 0

    def varint():
        nonlocal i
        out = shift = 0
        while True:
            b = buf[i]
            i += 1
            out |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                return out

    while i < len(buf):
        key = varint()
        kind = key & 7
        if kind == 0:
            value = varint()
        elif kind in (1, 5):  # fixed 64 / 32 bits
            size = 8 if kind == 1 else 4
            value, i = buf[i:i + size], i + size
        elif kind == 2:
            n = varint()
            value, i = buf[i:i + n], i + n
        else:
            raise ValueError(f"protobuf wire type {kind} is not used by sentencepiece models")
        yield key >> 3, value


def spm_precompiled_charsmap(spiece_path: Path) -> bytes | None:
    """ModelProto.normalizer_spec (field 3) .precompiled_charsmap (field 2): the normaliser's table."""
    specs = [v for n, v in _proto_fields(Path(spiece_path).read_bytes()) if n == 3]
    maps = [v for n, v in _proto_fields(specs[0]) if n == 2] if specs else []
    return maps[0] if maps else None


def hf_t5_tokenizer(spiece_path: Path, model_max_length: int = 512) -> HFT5Tokenizer:
    """transformers' T5Tokenizer for a spiece.model, as its converter builds it: the pieces and
    scores, then 100 sentinels in reverse (<extra_id_0> last), and the model's normaliser."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(spiece_path))
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    vocab += [(f"<extra_id_{i}>", 0.0) for i in range(99, -1, -1)]
    return HFT5Tokenizer(vocab=vocab, _spm_precompiled_charsmap=spm_precompiled_charsmap(spiece_path),
                         extra_ids=100, model_max_length=model_max_length)


# ---- CLIP: byte-level BPE ------------------------------------------------------------------------

def write_clip_tokenizer(folder: Path, merges: list[tuple[str, str]], model_max_length: int = 77) -> Path:
    """vocab.json, merges.txt and the two json files of FLUX's tokenizer/ folder."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(clip_vocab(merges), ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
               "unk_token": "<|endoftext|>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    config = dict(special, tokenizer_class="CLIPTokenizer", model_max_length=model_max_length, do_lower_case=True,
                  add_prefix_space=False, errors="replace")
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return folder


def train_clip_merges(n_merges: int = 254, seed: int = 0) -> list[tuple[str, str]]:
    """Exactly n_merges merges learnt on the test corpus with the product's learner (every pair
    counts, even one seen once, so the tiny presets' vocabulary sizes are met)."""
    merges = learn_clip_merges(text_corpus(seed=seed), n_merges, min_count=1)
    if len(merges) < n_merges:
        raise RuntimeError(f"the corpus allows only {len(merges)} merges")
    return merges


CLIP_VOCAB_HELP = ("The real CLIP vocabulary ships as open_clip/bpe_simple_vocab_16e6.txt.gz in the PyPI wheel "
                   "open-clip-torch; this test fetches it with `pip download open_clip_torch --no-deps -d "
                   ".cache/open_clip` (needs access to PyPI once, then it is cached). Run that command by hand, "
                   "or copy a wheel there, to run this test offline.")


def real_clip_vocab(cache: Path = REPO / ".cache" / "open_clip") -> Path:
    """A folder with CLIP's vocab.json + merges.txt built from open_clip's bpe_simple_vocab_16e6.txt.gz
    exactly as CLIP does (merges = lines[1 : 49152-256-2+1]). Downloads the wheel into `cache`
    (gitignored) on first use; raises RuntimeError with CLIP_VOCAB_HELP when that fails."""
    out = cache / "clip-vit-l-14-tokenizer"
    if (out / "vocab.json").is_file() and (out / "merges.txt").is_file():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache.glob("open_clip_torch-*.whl"))
    if not wheels:
        try:
            r = subprocess.run([sys.executable, "-m", "pip", "download", "open_clip_torch", "--no-deps", "-q",
                                "-d", str(cache)], capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"pip download open_clip_torch took over 300 s. {CLIP_VOCAB_HELP}") from None
        wheels = sorted(cache.glob("open_clip_torch-*.whl"))
        if r.returncode != 0 or not wheels:
            raise RuntimeError(f"pip download open_clip_torch failed: {r.stderr.strip()[-300:]}. {CLIP_VOCAB_HELP}")
    try:
        with zipfile.ZipFile(wheels[-1]) as z:
            lines = gzip.decompress(z.read("open_clip/bpe_simple_vocab_16e6.txt.gz")).decode("utf-8").split("\n")
    except (zipfile.BadZipFile, KeyError, OSError) as e:
        raise RuntimeError(f"{wheels[-1]} is unreadable ({e!r}): delete it. {CLIP_VOCAB_HELP}") from None
    merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    write_clip_tokenizer(tmp, merges)
    if not out.exists():  # else another process won the race: keep theirs
        tmp.replace(out)
    return out


# ---- a tiny snapshot's text folders --------------------------------------------------------------

@dataclass
class TinyText:
    """The transformers objects written by `write_tiny_text_components` (the references)."""

    clip: CLIPTextModel
    t5: T5EncoderModel
    clip_tokenizer: HFCLIPTokenizer
    t5_tokenizer: HFT5Tokenizer


def hf_clip_config() -> CLIPTextConfig:
    """PRESETS["tiny-fill"].clip as transformers' config, with FLUX's legacy special ids (eos 2)."""
    c = PRESETS["tiny-fill"].clip
    return CLIPTextConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                          num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                          max_position_embeddings=c.max_position_embeddings, layer_norm_eps=c.layer_norm_eps,
                          hidden_act=c.hidden_act, bos_token_id=0, pad_token_id=1, eos_token_id=2)


def hf_t5_config() -> T5Config:
    c = PRESETS["tiny-fill"].t5
    return T5Config(vocab_size=c.vocab_size, d_model=c.d_model, d_kv=c.d_kv, d_ff=c.d_ff, num_layers=c.num_layers,
                    num_heads=c.num_heads, relative_attention_num_buckets=c.relative_attention_num_buckets,
                    relative_attention_max_distance=c.relative_attention_max_distance,
                    layer_norm_epsilon=c.layer_norm_epsilon, feed_forward_proj="gated-gelu",
                    tie_word_embeddings=False, is_encoder_decoder=False, use_cache=False)


def write_tiny_text_components(root: Path, seed: int = 0, std: float = 0.1) -> TinyText:
    """Write root/text_encoder (CLIPTextModel), root/text_encoder_2 (T5EncoderModel), both random
    (N(0, std), norms 1 + noise), root/tokenizer (a 254-merge BPE, 768 ids) and root/tokenizer_2
    (a 128-piece spiece.model + tokenizer.json etc., 228 ids). Offline; about a second."""
    root = Path(root)
    clip = randomize_(CLIPTextModel(hf_clip_config()), std=std, seed=seed).eval()
    clip.save_pretrained(root / "text_encoder")
    t5 = randomize_(T5EncoderModel(hf_t5_config()), std=std, seed=seed + 1).eval()
    t5.save_pretrained(root / "text_encoder_2")

    merges = train_clip_merges(PRESETS["tiny-fill"].clip.vocab_size - 514, seed=seed)
    write_clip_tokenizer(root / "tokenizer", merges, model_max_length=clip.config.max_position_embeddings)
    clip_tokenizer = HFCLIPTokenizer.from_pretrained(root / "tokenizer")

    spiece = train_spiece(root / "tokenizer_2", seed=seed)
    t5_tokenizer = hf_t5_tokenizer(spiece)
    t5_tokenizer.save_pretrained(root / "tokenizer_2")  # tokenizer.json + configs, beside spiece.model
    assert spiece.is_file(), "save_pretrained must leave spiece.model in place"
    assert clip.config.vocab_size >= len(clip_tokenizer) and t5.config.vocab_size >= len(t5_tokenizer)
    return TinyText(clip, t5, clip_tokenizer, t5_tokenizer)
