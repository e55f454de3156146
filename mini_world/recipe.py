"""Train the miniature ICEdit world from scratch on a CPU, and write it as a loadable snapshot.

    .venv/bin/python -m mini_world.recipe --out assets/mini               # the shipped weights (~3 hours, 2 cores)
    .venv/bin/python -m mini_world.recipe --out /tmp/mini --scale 0.01    # every stage in a few minutes
    .venv/bin/python -m mini_world.recipe --out /tmp/mini --device cuda   # the same recipe on a GPU

Every stage checkpoints as it goes, so the same command run again continues where it stopped, exactly
(a stage killed at any moment gives the same weights as one that ran through). Stages, in order:
  tokenizers  a sentencepiece model (T5) and a byte-level BPE (CLIP) learned on the world's text
  t5          the T5 encoder pretrained with T5's objective, span corruption, on that text (span.py);
              CLIP stays random. Both are then frozen, as FLUX's are
  vae         the 16-channel VAE, 4x downsampling at 64 px (L1 + L2 + a light KL); its scale and shift
              are then measured, as FLUX's 0.3611 / 0.1159 were
  base        the Fill MM-DiT from scratch, as FLUX Fill was made: diptychs of one scene ("the same
              scene") and of two scenes (the right one described), masked right halves and random
              masks, captions as prompts. It never sees an edit: that prior is the adapters' job
  lora, moe   LoRA and LoRA-MoE on the world's edit pairs with the IC prompt, trained by
              train/train.py itself (the paper's objective, AdamW instead of Prodigy)
The output folder is a snapshot in FLUX's BFL layout (flux1-fill-mini.safetensors, ae.safetensors,
text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/) plus lora.safetensors and
lora_moe.safetensors; WORK (default OUT/../mini_work) keeps the checkpoints, the learning-curve
snapshots and progress.json (the seconds each stage trained).
"""

import argparse
import copy
import json
import math
import shutil
import time
import warnings
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from flux_minimal.clip import CLIPTextModel
from flux_minimal.config import PRESETS
from flux_minimal.errors import run_cli
from flux_minimal.files import check_folder, save_safetensors, write_text
from flux_minimal.icedit import IC_PROMPT, make_diptych
from flux_minimal.images import save_png, to_tensor
from flux_minimal.mmdit import Flux
from flux_minimal.sampling import Conditioning, encode_fill_example, flow_matching_mse
from flux_minimal.t5 import T5EncoderModel
from flux_minimal.text import PromptEncoder
from flux_minimal.tokenizers import T5Tokenizer, clip_vocab, learn_clip_merges
from flux_minimal.vae import AutoEncoder, load_vae, save_vae
from mini_world import world
from mini_world.loop import Loop, LoopConfig, log
from mini_world.span import SpanCorruption, span_batch

SIZE = 64  # scenes are 64 x 64; a diptych 128 x 64 is 8 x 16 = 128 tokens (4x VAE, 2x2 packing)
STAGES = ("tokenizers", "t5", "vae", "base", "lora", "moe")
# the base model's prompts (the captions come from world.caption)
SAME_SCENE_PROMPT = "A diptych with two side-by-side images of the same scene: {caption}"
TWO_SCENES_PROMPT = "Two different scenes side by side. On the right: {right}"


# ---- 1. tokenizers --------------------------------------------------------------------------------

def write_tokenizers(out: Path, corpus: list[str], n_pieces: int, n_merges: int, texts: list[str]) -> int:
    """tokenizer_2/spiece.model and tokenizer/{vocab.json, merges.txt}, learned on `corpus`; T5's padded
    length fits the longest of `texts`. Returns that length."""
    import sentencepiece as spm
    (out / "tokenizer_2").mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_prefix=str(out / "tokenizer_2" / "spiece"),
                                   vocab_size=n_pieces, model_type="bpe", character_coverage=1.0, pad_id=0,
                                   eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False, minloglevel=2,
                                   num_threads=1, seed_sentencepiece_size=100_000)
    (out / "tokenizer_2" / "spiece.vocab").unlink(missing_ok=True)
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer_2" / "spiece.model"))
    longest = max(len(sp.encode(t)) for t in texts) + 1  # + </s>
    max_length = int(math.ceil(longest * 1.2 / 8) * 8)  # room for unseen phrasings
    write_text(out / "tokenizer_2" / "tokenizer_config.json", json.dumps({"model_max_length": max_length}))

    merges = learn_clip_merges(corpus, n_merges)
    (out / "tokenizer").mkdir(parents=True, exist_ok=True)
    write_text(out / "tokenizer" / "vocab.json", json.dumps(clip_vocab(merges), ensure_ascii=False))
    write_text(out / "tokenizer" / "merges.txt", "#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    return max_length


def sized_preset(out: Path):
    """The mini preset with the vocabulary sizes of the tokenizers in `out`."""
    preset = copy.deepcopy(PRESETS["mini"])
    t5_vocab = T5Tokenizer(out / "tokenizer_2" / "spiece.model").vocab_size
    clip_vocab = len(json.loads((out / "tokenizer" / "vocab.json").read_text()))
    preset.t5 = replace(preset.t5, vocab_size=int(math.ceil(t5_vocab / 64) * 64))
    preset.clip = replace(preset.clip, vocab_size=clip_vocab, eos_token_id=clip_vocab - 1)
    return preset


def text_corpus(seed: int) -> list[str]:
    """Everything the text side ever reads: captions, instructions, IC prompts, and the base model's
    two prompt forms (drawn here on their own, so changing the base's tasks leaves the text alone)."""
    rng = np.random.default_rng([3, seed])
    base = [SAME_SCENE_PROMPT.format(caption=world.caption(world.random_scene(rng))) if k % 2 else
            TWO_SCENES_PROMPT.format(right=world.caption(world.random_scene(rng))) for k in range(1000)]
    return world.world_text_corpus(4000, seed=seed) + base


# ---- 2. text encoders -----------------------------------------------------------------------------

def save_text_encoder(out: Path, folder: str, model: torch.nn.Module, cfg) -> None:
    (out / folder).mkdir(parents=True, exist_ok=True)
    write_text(out / folder / "config.json", json.dumps(asdict(cfg), indent=1))
    save_safetensors(model.state_dict(), out / folder / "model.safetensors")


def train_t5(out: Path, work: Path, preset, corpus: list[str], steps: int, device, seed: int, save_every: float) -> None:
    """T5 pretrained by span corruption (span.py); CLIP random. Both written to `out`."""
    torch.manual_seed(seed)
    clip, t5 = CLIPTextModel(preset.clip), T5EncoderModel(preset.t5)
    save_text_encoder(out, "text_encoder", clip, preset.clip)
    length = json.loads((out / "tokenizer_2" / "tokenizer_config.json").read_text())["model_max_length"]
    tok = T5Tokenizer(out / "tokenizer_2" / "spiece.model", length)
    model = SpanCorruption(t5).to(device)

    def loss_fn(m, g, step):
        rng = np.random.default_rng(int(torch.randint(2**31, (1,), generator=g)))
        texts = [corpus[i] for i in rng.integers(len(corpus), size=128)]
        inp, tgt = span_batch(tok, texts, rng)
        return m(inp.to(device), tgt.to(device))

    cfg = LoopConfig(steps=steps, lr=2e-3, ema=0.99, log_every=max(1, steps // 10), seed=seed, save_every_s=save_every)
    ema = Loop(work / "t5", model, cfg).run(loss_fn)
    save_text_encoder(out, "text_encoder_2", ema.t5.cpu(), preset.t5)


# ---- 3. VAE ---------------------------------------------------------------------------------------

def scenes(rng: np.random.Generator, n: int) -> torch.Tensor:
    return torch.cat([to_tensor(world.render(world.random_scene(rng), SIZE)) for _ in range(n)])


def train_vae(out: Path, work: Path, preset, steps: int, batch: int, device, seed: int, save_every: float) -> None:
    torch.manual_seed(seed)
    vae = AutoEncoder(preset.ae).to(device)

    def loss_fn(m, g, step):
        x = scenes(np.random.default_rng(int(torch.randint(2**31, (1,), generator=g))), batch).to(device)
        mean, logvar = m.encoder(x).chunk(2, dim=1)
        noise = torch.randn(mean.shape, generator=g).to(device)
        z = mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * noise  # trained on samples: a smooth decoder
        rec = m.decoder(z)
        kl = 0.5 * (mean.square() + logvar.exp() - 1 - logvar).mean()
        return (rec - x).abs().mean() + (rec - x).square().mean() + 1e-4 * kl

    cfg = LoopConfig(steps=steps, lr=1e-3, weight_decay=0.0, ema=0.998, log_every=max(1, steps // 10), seed=seed,
                     save_every_s=save_every)
    vae = Loop(work / "vae", vae, cfg).run(loss_fn)
    rng = np.random.default_rng([4, seed])
    with torch.no_grad():  # scale and shift so the latents the DiT sees have mean 0, std 1
        mean = torch.cat([vae.encoder(scenes(rng, 64).to(device)).chunk(2, dim=1)[0] for _ in range(8)])
        shift, scale = mean.mean().item(), 1.0 / mean.std().item()
        x = scenes(rng, 64).to(device)
        mae = (vae.decoder(vae.encoder(x).chunk(2, dim=1)[0]) - x).abs().mean().item() / 2  # in [0, 1] units
    vae.params = replace(vae.params, scale_factor=scale, shift_factor=shift)
    vae.scale_factor, vae.shift_factor = scale, shift
    log(f"vae: scale {scale:.4f}, shift {shift:.4f}, reconstruction MAE {mae:.4f} (images in [0, 1])")
    save_vae(vae.cpu(), out / "ae.safetensors")


# ---- 4. the base Fill model -----------------------------------------------------------------------

def object_box(o: world.Obj, pad: int = 2) -> tuple[slice, slice]:
    """Pixel rows and columns of an object's bounding box (plus `pad`), clipped to the scene."""
    r = o.radius * SIZE + pad
    y0, y1 = max(0, int(o.y * SIZE - r)), min(SIZE, int(math.ceil(o.y * SIZE + r)))
    x0, x1 = max(0, int(o.x * SIZE - r)), min(SIZE, int(math.ceil(o.x * SIZE + r)))
    return slice(y0, y1), slice(x0, x1)


def base_example(rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(canvas [3, 64, 128], mask [1, 64, 128], prompt) for base training: inpainting under captions,
    as FLUX Fill was trained, and never an edit pair (the edit prior is the adapters' job). Tasks:
      45%  one scene twice, the right half masked: "the same scene" is a copy (the IC prompt's prior)
      25%  the same, and one object hidden on the left too: the right half is the captioned scene, so
           the hidden object is drawn from the caption (which words are which colours and shapes)
      15%  two unrelated scenes, the right one described and masked: drawing from a caption
      15%  one scene twice, one to three rectangles masked anywhere"""
    a, u = world.random_scene(rng), rng.random()
    b = a if u < 0.7 or u >= 0.85 else world.random_scene(rng)
    prompt = (TWO_SCENES_PROMPT.format(right=world.caption(b)) if b is not a
              else SAME_SCENE_PROMPT.format(caption=world.caption(a)))
    canvas = to_tensor(make_diptych(world.render(a, SIZE), world.render(b, SIZE)))[0]
    mask = torch.zeros(1, SIZE, 2 * SIZE)
    if u < 0.85:
        mask[..., SIZE:] = 1  # the right half, as ICEdit asks
        if 0.45 <= u < 0.7:
            rows, cols = object_box(a.objects[rng.integers(len(a.objects))])
            mask[:, rows, cols] = 1
    else:
        for _ in range(rng.integers(1, 4)):
            h, w = rng.integers(8, SIZE + 1), rng.integers(8, SIZE + 1)
            y, x = rng.integers(0, SIZE - h + 1), rng.integers(0, 2 * SIZE - w + 1)
            mask[:, y:y + h, x:x + w] = 1
    return canvas, mask, prompt


@torch.no_grad()
def encode_pool(vae, text: PromptEncoder, n: int, seed: int, device, chunk: int = 100) -> dict:
    """n base-training examples as latents, conditioning and prompt embeddings, computed once.
    Chunk k draws from the generator (seed, k), so the pool is the same on every (re)start."""
    parts = {"x0": [], "cond": [], "txt": [], "vec": []}
    for k in range(math.ceil(n / chunk)):
        rng = np.random.default_rng([5, seed, k])
        ex = [base_example(rng) for _ in range(min(chunk, n - k * chunk))]
        canvas, mask = torch.stack([e[0] for e in ex]).to(device), torch.stack([e[1] for e in ex]).to(device)
        x0, cond = encode_fill_example(vae, canvas, mask)
        parts["x0"].append(x0)
        parts["cond"].append(cond)
        with warnings.catch_warnings():  # long captions are cut to T5's length, on purpose
            warnings.simplefilter("ignore")
            txt, _, vec = text.encode_prompt([e[2] for e in ex], device=device)
        parts["txt"].append(txt)
        parts["vec"].append(vec)
    return {k: torch.cat(v) for k, v in parts.items()}


def train_base(out: Path, work: Path, preset, steps: int, batch: int, pool_size: int, device, seed: int,
               compile: bool, save_every: float) -> None:
    vae, text = load_vae(out / "ae.safetensors", device=device), PromptEncoder.from_pretrained(out, device=device)
    t0 = time.perf_counter()
    pool = encode_pool(vae, text, pool_size, seed, device)
    log(f"base: {pool_size} examples encoded in {time.perf_counter() - t0:.0f}s")
    torch.manual_seed(seed)
    model = Flux(preset.flux).to(device)

    def loss_fn(m, g, step):
        idx = torch.randint(0, pool_size, (batch,), generator=g).to(device)
        x0 = pool["x0"][idx]
        eps = torch.randn(x0.shape, generator=g).to(device)
        t = torch.sigmoid(torch.randn(batch, generator=g)).to(device)
        guidance = (1 + 59 * torch.rand(batch, generator=g)).to(device)  # not distilled: taught to ignore it
        cond = Conditioning.of(pool["txt"][idx], pool["vec"][idx], pool["cond"][idx], SIZE, 2 * SIZE,
                               preset.ae.downsample)
        return flow_matching_mse(m, x0, eps, t, cond, guidance).mean()

    cfg = LoopConfig(steps=steps, lr=1e-3, log_every=max(1, steps // 20), snapshot_every=max(1, steps // 8), seed=seed,
                     save_every_s=save_every)
    ema = Loop(work / "base", model, cfg, compile=compile).run(loss_fn)
    save_safetensors(ema.state_dict(), out / "flux1-fill-mini.safetensors")


# ---- 5. adapters, through the real training script --------------------------------------------------

def train_adapter(out: Path, work: Path, name: str, n_pairs: int, steps: int, device, seed: int,
                  compile: bool) -> None:
    from train.train import main as train_main
    pairs = work / "pairs"
    if not (pairs / "pairs.jsonl").is_file():
        world.write_pairs_folder(pairs, world.make_split(n_pairs, seed, SIZE, split="train"))
    run = work / name
    args = ["--weights", str(out), "--data", str(pairs), "--resolution", str(SIZE), "--steps", str(steps),
            "--batch", "32", "--optimizer", "adamw", "--lr", "1e-3", "--schedule", "cosine", "--weight-decay", "0.01",
            "--rank", "32",
            "--adapter", {"lora": "lora", "moe": "moe"}[name], "--experts", "4", "--cache",
            "--save-every", str(max(1, steps // 8)), "--log-every", str(max(1, steps // 20)), "--seed", str(seed),
            "--device", str(device), "--no-progress", "--out", str(run)]
    if compile:
        args.append("--compile")
    if (run / "latest").is_file():
        args += ["--resume", str(run)]
    train_main(args)
    shutil.copy(run / "adapter.safetensors", out / f"{'lora' if name == 'lora' else 'lora_moe'}.safetensors")


# ---- examples for the README ----------------------------------------------------------------------

EXAMPLES = [  # (scene, an instruction that fits it)
    (world.Scene(world.Background("gray"), (world.Obj("circle", "red", "large", 0.3, 0.35),
                                            world.Obj("square", "yellow", "medium", 0.7, 0.7))),
     "turn the red circle blue"),
    (world.Scene(world.Background("teal", "striped"), (world.Obj("star", "white", "large", 0.5, 0.5),)),
     "remove the white star"),
    (world.Scene(world.Background("beige"), (world.Obj("triangle", "green", "medium", 0.3, 0.6),
                                             world.Obj("diamond", "purple", "small", 0.75, 0.3))),
     "make the background checkered"),
    (world.Scene(world.Background("pink"), (world.Obj("cross", "black", "medium", 0.25, 0.5),)),
     "add a blue circle on the right"),
]


def write_examples(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (scene, instruction) in enumerate(EXAMPLES, 1):
        save_png(world.render(scene, SIZE), folder / f"scene_{i:02d}.png")
        lines.append(f"scene_{i:02d}.png: {instruction}")
    write_text(folder / "instructions.txt", "\n".join(lines) + "\n")


# ---- the recipe -----------------------------------------------------------------------------------

class Progress:
    """WORK/progress.json: which stages are done and how long each trained (seconds), kept across restarts."""

    def __init__(self, path: Path):
        self.path = path
        self.stages = json.loads(path.read_text()) if path.is_file() else {}

    def done(self, stage: str) -> bool:
        return self.stages.get(stage, {}).get("done", False)

    def finish(self, stage: str, seconds: float) -> None:
        self.stages[stage] = {"done": True, "seconds": round(seconds, 1)}
        write_text(self.path, json.dumps(self.stages, indent=1))


def stage_seconds(work: Path, stage: str, started: float) -> float:
    """What a stage trained in all its sittings (its checkpoints keep count), else this sitting's time."""
    from mini_world.loop import trained_seconds
    folder = work / stage
    if stage in ("t5", "vae", "base") and (folder / "latest").is_file():
        return trained_seconds(folder)
    if stage in ("lora", "moe") and (folder / "log.jsonl").is_file():  # train.py logs its training time
        return json.loads((folder / "log.jsonl").read_text().splitlines()[-1])["seconds"]
    return time.perf_counter() - started


def can_compile(device: str) -> bool:
    """torch.compile builds C++ kernels on the CPU: without a compiler the recipe runs eager (slower)."""
    if device.startswith("cuda") or any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        return True
    log("no C++ compiler found: the DiT runs without torch.compile (~1.5x slower steps)")
    return False


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mini_world.recipe", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("assets/mini"))
    ap.add_argument("--work", type=Path, default=None, help="checkpoints and progress (default: OUT/../mini_work)")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every step count (0.01: a smoke run)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu or cuda: the shipped weights come from the CPU")
    ap.add_argument("--stages", default=",".join(STAGES), help="run only these (a stage after its inputs)")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile of the DiT (slower steps)")
    ap.add_argument("--save-every", type=float, default=300, help="seconds between checkpoints")
    ap.add_argument("--examples", type=Path, default=Path("examples/mini"), help="where the README's scenes go")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out, work = args.out, args.work or args.out.parent / "mini_work"
    for folder, what in ((out, "--out folder"), (work, "--work folder"), (args.examples, "--examples folder")):
        check_folder(folder, what)
    n = lambda k: max(2, int(k * args.scale))  # noqa: E731
    device, compile, seed = torch.device(args.device), not args.no_compile and can_compile(args.device), args.seed
    progress = Progress(work / "progress.json")
    corpus = world.world_text_corpus(4000, seed=seed)

    for stage in args.stages.split(","):
        if stage not in STAGES:
            raise SystemExit(f"unknown stage {stage!r}; the stages are {', '.join(STAGES)}")
        if progress.done(stage):
            log(f"{stage}: done already ({progress.stages[stage]['seconds'] / 60:.1f} min)")
            continue
        started = time.perf_counter()
        log(f"{stage}: start")
        if stage == "tokenizers":
            # T5's padded length fits the edit prompts (every token of it costs the DiT at every step);
            # the base model's longest captions are cut, which only drops their last words.
            edit_prompts = [t for t in corpus if t.startswith(IC_PROMPT[:40])]
            length = write_tokenizers(out, text_corpus(seed), n_pieces=256, n_merges=300, texts=edit_prompts)
            log(f"tokenizers: T5 length {length}")
        elif stage == "t5":
            train_t5(out, work, sized_preset(out), text_corpus(seed), n(3000), device, seed, args.save_every)
        elif stage == "vae":
            train_vae(out, work, sized_preset(out), n(2000), 32, device, seed, args.save_every)
        elif stage == "base":
            train_base(out, work, sized_preset(out), n(8000), 32, n(24000), device, seed, compile, args.save_every)
        else:
            train_adapter(out, work, stage, n(16000), n(3500), device, seed, compile)
        progress.finish(stage, stage_seconds(work, stage, started))
    write_examples(args.examples)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    total = sum(s["seconds"] for s in progress.stages.values())
    log(f"done: {out} ({size / 2**20:.1f} MiB); trained {total / 60:.0f} min in all: "
        + ", ".join(f"{k} {v['seconds'] / 60:.1f}" for k, v in progress.stages.items()))
    return 0


if __name__ == "__main__":
    run_cli(main)
