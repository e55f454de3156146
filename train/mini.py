"""Train the miniature ICEdit world from scratch on a CPU, and write it as a loadable snapshot.

    .venv/bin/python -m train.mini --out assets/mini              # the shipped weights (~1 hour, 2 cores)
    .venv/bin/python -m train.mini --out /tmp/mini --scale 0.05   # the same stages in a few minutes

Every real component, at the "mini" preset, with the same code as the 12B model:
  1. tokenizers  a sentencepiece model (T5; BPE, whole words for this small vocabulary) and a byte-level
                 BPE (CLIP) learned on the world's text
  2. text        T5 and CLIP encoders, random and frozen: FLUX's are frozen too, and the DiT learns
                 to read whatever features they give
  3. vae         the 16-channel, 8x-downsampling VAE on rendered scenes (L1 + a light KL); its
                 scale and shift are then measured, as FLUX's 0.3611 / 0.1159 were
  4. base        the Fill MM-DiT (384 inputs) from scratch, as FLUX Fill was made: diptychs of one
                 scene ("the same scene") and of two scenes, random masks, captions as prompts.
                 It is not guidance-distilled: guidance is drawn at random so the model ignores it.
  5. adapters    LoRA and LoRA-MoE on the world's edit pairs with the IC prompt, trained by
                 train/train.py itself (the paper's recipe, AdamW instead of Prodigy)
The output folder is a snapshot like FLUX.1-Fill-dev in the BFL layout (flux1-fill-mini.safetensors,
ae.safetensors, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/) plus lora.safetensors and
lora_moe.safetensors, so `python -m infer.edit --weights OUT --lora OUT/lora_moe.safetensors` runs it.
"""

import argparse
import copy
import json
import math
import random
import shutil
import time
import warnings
from collections import Counter
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from flux_minimal.clip import CLIPTextModel
from flux_minimal.config import PRESETS
from flux_minimal.images import IC_PROMPT, make_diptych, to_tensor
from flux_minimal.mmdit import Flux
from flux_minimal.sampling import fill_conditioning, image_ids, noisy_sample, pack
from flux_minimal.t5 import T5EncoderModel
from flux_minimal.text import PromptEncoder
from flux_minimal.tokenizers import BOS_TOKEN, CLIP_PATTERN, EOS_TOKEN, bytes_to_unicode, merge_pair
from flux_minimal.vae import AutoEncoder, save_vae
from train import world

SIZE = 64  # scenes are 64 x 64; a diptych 128 x 64 is 8 x 4 = 32 tokens
# the base model's prompts (the captions come from world.caption)
SAME_SCENE_PROMPT = "A diptych with two side-by-side images of the same scene: {caption}"
TWO_SCENES_PROMPT = "Two images: left, {left}; right, {right}"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- 1. tokenizers --------------------------------------------------------------------------------

def learn_bpe(texts: list[str], n_merges: int) -> list[tuple[str, str]]:
    """Byte-level BPE merges, CLIP style (pre-tokens lower-cased, the last symbol with </w>)."""
    b2u = bytes_to_unicode()
    words = Counter(tok for t in texts for tok in CLIP_PATTERN.findall(" ".join(t.split()).lower()))
    vocab = {tuple([*(b2u[b] for b in w.encode()[:-1]), b2u[w.encode()[-1]] + "</w>"]): n for w, n in words.items()}
    merges = []
    for _ in range(n_merges):
        pairs = Counter()
        for syms, n in vocab.items():
            for a, b in zip(syms, syms[1:]):
                pairs[a, b] += n
        if not pairs or pairs.most_common(1)[0][1] < 2:
            break
        best = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))[0]  # ties: deterministic
        merges.append(best)
        vocab = {tuple(merge_pair(list(syms), best)): n for syms, n in vocab.items()}
    return merges


def write_tokenizers(out: Path, corpus: list[str], n_pieces: int, n_merges: int, texts: list[str]
                     ) -> tuple[int, int, int]:
    """tokenizer_2/spiece.model and tokenizer/{vocab.json, merges.txt}, learned on `corpus`; T5's padded
    length fits the longest of `texts`. Returns (T5 vocab, CLIP vocab, T5 length)."""
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
    (out / "tokenizer_2" / "tokenizer_config.json").write_text(json.dumps({"model_max_length": max_length}))

    merges = learn_bpe(corpus, n_merges)
    b2u = list(bytes_to_unicode().values())
    vocab = [*b2u, *(s + "</w>" for s in b2u), *("".join(m) for m in merges), BOS_TOKEN, EOS_TOKEN]
    (out / "tokenizer").mkdir(parents=True, exist_ok=True)
    (out / "tokenizer" / "vocab.json").write_text(json.dumps({s: i for i, s in enumerate(vocab)}, ensure_ascii=False))
    (out / "tokenizer" / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    return sp.get_piece_size() + 100, len(vocab), max_length


# ---- 2. text encoders -----------------------------------------------------------------------------

def write_text_encoders(out: Path, preset, seed: int) -> None:
    torch.manual_seed(seed)
    for folder, model, cfg in (("text_encoder_2", T5EncoderModel(preset.t5), preset.t5),
                               ("text_encoder", CLIPTextModel(preset.clip), preset.clip)):
        (out / folder).mkdir(parents=True, exist_ok=True)
        (out / folder / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / folder / "model.safetensors")


# ---- 3. VAE ---------------------------------------------------------------------------------------

def scenes(rng: np.random.Generator, n: int) -> torch.Tensor:
    return torch.cat([to_tensor(world.render(world.random_scene(rng), SIZE)) for _ in range(n)])


def train_vae(preset, steps: int, batch: int, seed: int) -> AutoEncoder:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    vae = AutoEncoder(preset.ae)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.05)
    for step in range(1, steps + 1):
        x = scenes(rng, batch)
        mean, logvar = vae.encoder(x).chunk(2, dim=1)
        z = mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * torch.randn_like(mean)  # trained on samples: a smooth decoder
        rec = vae.decoder(z)
        kl = 0.5 * (mean.square() + logvar.exp() - 1 - logvar).mean()
        loss = (rec - x).abs().mean() + (rec - x).square().mean() + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % max(1, steps // 10) == 0:
            log(f"vae step {step}/{steps}: L1 {(rec - x).abs().mean():.4f}, KL {kl:.3f}")
    vae.eval()
    with torch.no_grad():  # scale and shift so the latents the DiT sees have mean 0, std 1
        mean = torch.cat([vae.encoder(scenes(rng, 64)).chunk(2, dim=1)[0] for _ in range(8)])
        shift, scale = mean.mean().item(), 1.0 / mean.std().item()
        x = scenes(rng, 64)
        mae = (vae.decoder(vae.encoder(x).chunk(2, dim=1)[0]) - x).abs().mean().item() / 2  # in [0, 1] units
    vae.params = replace(vae.params, scale_factor=scale, shift_factor=shift)
    vae.scale_factor, vae.shift_factor = scale, shift
    log(f"vae: scale {scale:.4f}, shift {shift:.4f}, reconstruction MAE {mae:.4f} (images in [0, 1])")
    return vae


# ---- 4. the base Fill model -----------------------------------------------------------------------

def base_example(rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(canvas [3, 64, 128], mask [1, 64, 128], prompt) for base training."""
    a = world.random_scene(rng)
    if rng.random() < 0.6:  # one scene twice: the prior the IC prompt relies on
        b, prompt = a, SAME_SCENE_PROMPT.format(caption=world.caption(a))
    else:
        b = world.random_scene(rng)
        prompt = TWO_SCENES_PROMPT.format(left=world.caption(a), right=world.caption(b))
    canvas = to_tensor(make_diptych(world.render(a, SIZE), world.render(b, SIZE)))[0]
    mask = torch.zeros(1, SIZE, 2 * SIZE)
    u = rng.random()
    if u < 0.5:
        mask[..., SIZE:] = 1  # the right half, as ICEdit asks
    elif u < 0.6:
        mask[..., :SIZE] = 1
    else:  # one to three rectangles anywhere
        for _ in range(rng.integers(1, 4)):
            h, w = rng.integers(8, SIZE + 1), rng.integers(8, SIZE + 1)
            y, x = rng.integers(0, SIZE - h + 1), rng.integers(0, 2 * SIZE - w + 1)
            mask[:, y:y + h, x:x + w] = 1
    return canvas, mask, prompt


@torch.no_grad()
def encode_pool(vae, text: PromptEncoder, n: int, rng: np.random.Generator, chunk: int = 64) -> dict:
    """n training examples with their latents, conditioning and prompt embeddings, computed once."""
    x0, cond, txt, vec = [], [], [], []
    for i in range(0, n, chunk):
        ex = [base_example(rng) for _ in range(min(chunk, n - i))]
        canvas, mask = torch.stack([e[0] for e in ex]), torch.stack([e[1] for e in ex])
        x0.append(pack(vae.encode(canvas)))
        cond.append(fill_conditioning(vae, canvas, mask))
        with warnings.catch_warnings():  # long two-scene captions are cut to T5's length, on purpose
            warnings.simplefilter("ignore")
            t, _, v = text.encode_prompt([e[2] for e in ex])
        txt.append(t)
        vec.append(v)
    return {"x0": torch.cat(x0), "cond": torch.cat(cond), "txt": torch.cat(txt), "vec": torch.cat(vec)}


def train_base(preset, vae, text, steps: int, batch: int, pool_size: int, seed: int) -> Flux:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed + 1)
    t0 = time.perf_counter()
    pool = encode_pool(vae, text, pool_size, rng)
    log(f"base: {pool_size} examples encoded in {time.perf_counter() - t0:.0f}s")
    model = Flux(preset.flux).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.05)
    g = torch.Generator().manual_seed(seed)
    ids = image_ids(batch, SIZE, 2 * SIZE)
    losses = []
    for step in range(1, steps + 1):
        idx = torch.randint(0, pool_size, (batch,), generator=g)
        x0, eps = pool["x0"][idx], torch.randn(batch, *pool["x0"].shape[1:], generator=g)
        t = torch.sigmoid(torch.randn(batch, generator=g))
        guidance = 1 + 59 * torch.rand(batch, generator=g)  # not distilled: taught to ignore it
        txt = pool["txt"][idx]
        v = model(img=torch.cat([noisy_sample(x0, eps, t), pool["cond"][idx]], dim=-1), img_ids=ids, txt=txt,
                  txt_ids=torch.zeros(batch, txt.shape[1], 3), timesteps=t, y=pool["vec"][idx], guidance=guidance)
        loss = F.mse_loss(v, eps - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():  # an exponential moving average: what ships
            decay = min(0.999, (1 + step) / (10 + step))
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        losses.append(loss.item())
        if step % max(1, steps // 20) == 0:
            log(f"base step {step}/{steps}: loss {np.mean(losses[-50:]):.4f} ({time.perf_counter() - t0:.0f}s)")
    return ema


# ---- 5. adapters, through the real training script --------------------------------------------------

def train_adapters(out: Path, work: Path, n_pairs: int, steps: int, seed: int) -> None:
    from train.train import main as train_main
    pairs = work / "pairs"
    if not (pairs / "pairs.jsonl").is_file():
        world.write_pairs_folder(pairs, world.make_split(n_pairs, seed, SIZE, split="train"))
    common = ["--weights", str(out), "--data", str(pairs), "--resolution", str(SIZE), "--steps", str(steps),
              "--batch", "16", "--optimizer", "adamw", "--lr", "1e-3", "--weight-decay", "0.01", "--rank", "32",
              "--cache", "--save-every", str(steps), "--log-every", str(max(1, steps // 10)), "--seed", str(seed),
              "--no-progress"]
    for name, adapter in (("lora", "lora"), ("lora_moe", "moe")):
        log(f"adapter {name}: {steps} steps on {n_pairs} pairs")
        run = work / name
        train_main([*common, "--adapter", adapter, "--experts", "4", "--out", str(run)])
        shutil.copy(run / "adapter.safetensors", out / f"{name}.safetensors")


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
        world.render(scene, SIZE).save(folder / f"scene_{i:02d}.png")
        lines.append(f"scene_{i:02d}.png: {instruction}")
    (folder / "instructions.txt").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("assets/mini"))
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: OUT/../mini_work)")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every step count (0.05: a smoke run)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stages", default="tokenizers,text,vae,base,adapters")
    ap.add_argument("--examples", type=Path, default=Path("examples/mini"), help="where the README's scenes go")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    random.seed(args.seed)
    out, work = args.out, args.work or args.out.parent / "mini_work"
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    stages, s = args.stages.split(","), args.scale
    n = lambda k: max(2, int(k * s))  # noqa: E731
    t_start = time.perf_counter()
    preset = copy.deepcopy(PRESETS["mini"])

    corpus = world.world_text_corpus(4000, seed=args.seed)
    if "tokenizers" in stages:
        rng = np.random.default_rng(args.seed)
        base_prompts = [base_example(rng)[2] for _ in range(500)]
        # T5's padded length fits the edit prompts (every token of it costs the DiT at every step);
        # the base model's longest captions are cut, which only drops their last words.
        edit_prompts = [t for t in corpus if t.startswith(IC_PROMPT[:40])]
        t5_vocab, clip_vocab, max_length = write_tokenizers(out, corpus + base_prompts, n_pieces=256, n_merges=300,
                                                            texts=edit_prompts)
        log(f"tokenizers: T5 {t5_vocab} ids, CLIP {clip_vocab} ids, T5 length {max_length}")
    t5_vocab = 100 + __import__("sentencepiece").SentencePieceProcessor(
        model_file=str(out / "tokenizer_2" / "spiece.model")).get_piece_size()
    clip_vocab = len(json.loads((out / "tokenizer" / "vocab.json").read_text()))
    preset.t5 = replace(preset.t5, vocab_size=int(math.ceil(t5_vocab / 64) * 64))
    preset.clip = replace(preset.clip, vocab_size=clip_vocab, eos_token_id=clip_vocab - 1)
    if "text" in stages:
        write_text_encoders(out, preset, args.seed)
    text = PromptEncoder.from_pretrained(out)
    if "vae" in stages:
        vae = train_vae(preset, steps=n(1500), batch=32, seed=args.seed)
        save_vae(vae, out / "ae.safetensors")
    from flux_minimal.vae import load_vae
    vae = load_vae(out / "ae.safetensors")
    if "base" in stages:
        flux = train_base(preset, vae, text, steps=n(12000), batch=32, pool_size=n(24000), seed=args.seed)
        save_file({k: v.contiguous() for k, v in flux.state_dict().items()}, out / "flux1-fill-mini.safetensors")
    if "adapters" in stages:
        train_adapters(out, work, n_pairs=n(8000), steps=n(2000), seed=args.seed)
    write_examples(args.examples)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    log(f"done in {(time.perf_counter() - t_start) / 60:.1f} min: {out} ({size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
