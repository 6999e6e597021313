"""Train musicgen-mini's language model: a T5-architecture text encoder (with a word-level tokenizer
built from the corpus captions) and a MusicGen decoder (4 codebooks, delay pattern) on the tokens the
trained codec gives the corpus, then assemble and export the whole `MusicgenForConditionalGeneration`.

Training sequences follow the engine's decode loop exactly (engine.decoder.delayed_inputs: position p
carries codebook k of frame p - k - 1, BOS before a window's first frame), so what the decoder learns
is what `engine.loop.Generator` asks of it, including after a re-prompt:
- a sequence is two clips with the same caption back to back (a different note half of the time), seen
  through a window of `frames` at a random offset: the model learns to continue, and to change pitch
  at a note onset, which is where live steering asks it to go;
- captions are dropped (zero text states, masked: the engine's unconditional row) for classifier-free
  guidance, and replaced by the empty prompt now and then, so `--prompt ""` means "any note".
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from musicrfm.engine.decoder import delayed_inputs

from .corpus import Corpus
from .training import load_checkpoint, save_checkpoint, train_for

__all__ = ["LMSettings", "build_tokenizer", "build_mini", "encode_corpus", "train_lm", "export_mini"]

IGNORE = -100


@dataclass(frozen=True)
class LMSettings:
    seed: int = 0
    layers: int = 4
    hidden: int = 256
    heads: int = 4
    ffn: int = 1024
    dropout: float = 0.1
    text_dim: int = 128
    text_layers: int = 2
    text_heads: int = 4
    text_ffn: int = 256
    max_positions: int = 256  # the decoder's context (sinusoidal table): 5.1 s at 50 frames/s
    frames: int = 252  # training window: with the delay's 3 extra positions, the whole context
    batch_size: int = 16
    lr: float = 1e-3
    warmup_steps: int = 200
    weight_decay: float = 0.01
    caption_dropout: float = 0.15  # rows trained unconditioned (for guidance)
    empty_caption: float = 0.05  # rows trained with the empty prompt
    pair_other_note: float = 0.5  # share of sequences whose second clip is another clip of the caption


# --- tokenizer --------------------------------------------------------------------------------------


def build_tokenizer(captions: list[str]):
    """Word-level tokenizer over the captions' words (lower-cased; punctuation its own token), with T5's
    special tokens: <pad> = 0, </s> = 1 (appended to every text), <unk> = 2."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    splitter = pre_tokenizers.Whitespace()
    words = sorted({w for c in captions for w, _ in splitter.pre_tokenize_str(c.lower())})
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = splitter
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=64)


# --- model ------------------------------------------------------------------------------------------


def mini_config(codec_config, vocab_size: int, s: LMSettings):
    from transformers import MusicgenConfig, MusicgenDecoderConfig, T5Config

    text = T5Config(vocab_size=vocab_size, d_model=s.text_dim, d_kv=s.text_dim // s.text_heads, d_ff=s.text_ffn,
                    num_layers=s.text_layers, num_heads=s.text_heads, dropout_rate=s.dropout,
                    decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    k, v = int(codec_config.num_quantizers), int(codec_config.codebook_size)
    dec = MusicgenDecoderConfig(vocab_size=v, pad_token_id=v, bos_token_id=v, num_codebooks=k,
                                num_hidden_layers=s.layers, hidden_size=s.hidden, num_attention_heads=s.heads,
                                ffn_dim=s.ffn, max_position_embeddings=s.max_positions, dropout=s.dropout,
                                attention_dropout=0.0, activation_dropout=0.0)
    cfg = MusicgenConfig(text_encoder=text.to_dict(), audio_encoder=codec_config.to_dict(), decoder=dec.to_dict())
    cfg.decoder_start_token_id = v
    cfg.pad_token_id = v
    return cfg


def build_mini(codec, tokenizer, s: LMSettings):
    """A MusicgenForConditionalGeneration around the trained codec, text encoder and decoder fresh."""
    from transformers import MusicgenForConditionalGeneration

    cfg = mini_config(codec.config, len(tokenizer), s)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s.seed)
        model = MusicgenForConditionalGeneration(cfg)
    model.audio_encoder.load_state_dict(codec.state_dict())
    gc = model.generation_config
    gc.decoder_start_token_id = gc.bos_token_id = gc.pad_token_id = cfg.decoder.pad_token_id
    gc.guidance_scale, gc.do_sample, gc.top_k = 3.0, True, 50
    gc.max_length = s.max_positions
    return model


@torch.no_grad()
def encode_corpus(codec, corpus: Corpus, *, batch: int = 32, progress: bool = True) -> np.ndarray:
    """Every corpus clip through the codec: int16 codes [clips, K, frames]."""
    from tqdm import tqdm

    codec.eval()
    bandwidth = codec.config.target_bandwidths[-1]
    out = []
    for start in tqdm(range(0, len(corpus.clips), batch), disable=not progress, desc="encode"):
        x = torch.from_numpy(corpus.audio[start : start + batch].astype(np.float32) / 32768.0)[:, None]
        codes = codec.encode(x, bandwidth=bandwidth).audio_codes  # [1, B, K, F]
        out.append(codes[0].to(torch.int16).numpy())
    return np.concatenate(out)


# --- training ---------------------------------------------------------------------------------------


def training_batch(codes: np.ndarray, captions: list[str], rows: np.ndarray, partners: dict[str, np.ndarray],
                   s: LMSettings, rng: np.random.Generator, pad: int):
    """(inputs [B, K, T + K - 1], targets [B, K, T + K - 1] with IGNORE where the delay pattern has no
    token, captions [B]) for a batch of corpus rows."""
    k, length = codes.shape[1], codes.shape[2]
    windows, texts = [], []
    for row in rows:
        caption = captions[row]
        group = partners[caption]
        other = int(rng.choice(group)) if rng.random() < s.pair_other_note else int(row)
        seq = np.concatenate([codes[row], codes[other]], axis=1)
        offset = 0 if rng.random() < 0.3 else int(rng.integers(0, 2 * length - s.frames + 1))
        windows.append(seq[:, offset : offset + s.frames])
        draw = rng.random()
        texts.append(None if draw < s.caption_dropout else "" if draw < s.caption_dropout + s.empty_caption
                     else caption)
    t = s.frames
    window = torch.from_numpy(np.stack(windows).astype(np.int64))  # [B, K, T]
    window = F.pad(window, (0, k), value=pad)  # the delay reads up to K frames past the end (as padding)
    inputs = delayed_inputs(window, 0, t + k - 2, pad, end=t)
    targets = delayed_inputs(window, 1, t + k - 1, IGNORE, end=t)
    return inputs, targets, texts


def text_states(model, tokenizer, texts: list[str | None]) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoder states and mask as engine.decoder.MusicgenDecoder.encode_text builds them; None = the
    unconditional row (zero states, nothing to attend)."""
    batch = tokenizer([t or "" for t in texts], return_tensors="pt", padding=True)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    states = model.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    proj = getattr(model, "enc_to_dec_proj", None)
    if proj is not None:
        states = proj(states)
    drop = torch.tensor([t is None for t in texts])
    mask = mask.masked_fill(drop[:, None], 0)
    return states * mask[..., None].to(states.dtype), mask


def lm_loss(model, tokenizer, inputs: torch.Tensor, targets: torch.Tensor, texts: list[str | None]) -> torch.Tensor:
    b, k, t = inputs.shape
    states, mask = text_states(model, tokenizer, texts)
    out = model.decoder(input_ids=inputs.reshape(b * k, t), encoder_hidden_states=states,
                        encoder_attention_mask=mask)
    logits = out.logits.reshape(b, k, t, -1)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE)


def _partners(corpus: Corpus, rows: np.ndarray) -> dict[str, np.ndarray]:
    groups: dict[str, list[int]] = {}
    for r in rows:
        groups.setdefault(corpus.clips[int(r)].caption, []).append(int(r))
    return {c: np.array(g) for c, g in groups.items()}


def train_lm(corpus: Corpus, codec, codes: np.ndarray, out: str | Path, s: LMSettings = LMSettings(), *,
             minutes: float | None = None, steps: int | None = None, total_steps: int = 20_000,
             eval_every: float = 10.0, threads: int | None = None, progress: bool = True) -> dict:
    """Train (or resume) the text encoder and decoder in `out`/checkpoint; the codec stays frozen.
    The learning rate warms up, then follows a cosine to 10% at `total_steps`."""
    if threads:
        torch.set_num_threads(threads)
    out = Path(out)
    captions = [c.caption for c in corpus.clips]
    tokenizer = build_tokenizer(captions)
    model = build_mini(codec, tokenizer, s)
    model.audio_encoder.requires_grad_(False)
    params = [p for n, p in model.named_parameters() if not n.startswith("audio_encoder.")]
    opt = torch.optim.AdamW(params, lr=s.lr, betas=(0.9, 0.98), weight_decay=s.weight_decay)
    state = load_checkpoint(out / "checkpoint", model, opt)
    if state is not None and state["settings"] != json.loads(json.dumps(asdict(s))):
        raise ValueError(f"{out} was trained with other settings: {state['settings']}")
    state = state or {"step": 0, "seconds": 0.0, "settings": asdict(s), "total_steps": total_steps,
                      "log": [], "evals": []}
    pad = model.config.decoder.pad_token_id
    train = corpus.indices(validation=False)
    held = corpus.indices(validation=True)
    train_partners, held_partners = _partners(corpus, train), _partners(corpus, held)
    fixed = training_batch(codes, captions, held[np.random.default_rng(1).choice(len(held), 64)],
                           held_partners, s, np.random.default_rng(2), pad)
    window: list[float] = []

    def lr_at(step: int) -> float:
        if step < s.warmup_steps:
            return s.lr * (step + 1) / s.warmup_steps
        done = min(1.0, (step - s.warmup_steps) / max(1, state["total_steps"] - s.warmup_steps))
        return s.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * done)))

    def step_fn(step: int) -> dict:
        rng = np.random.default_rng([s.seed, step])
        inputs, targets, texts = training_batch(codes, captions, rng.choice(train, s.batch_size), train_partners,
                                                s, rng, pad)
        model.train()
        model.audio_encoder.eval()
        loss = lm_loss(model, tokenizer, inputs, targets, texts)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        window.append(loss.item())
        return {"loss": round(loss.item(), 3)}

    def checkpoint(step: int, seconds: float) -> None:
        model.eval()
        began = time.perf_counter()
        with torch.no_grad():
            held_loss = lm_loss(model, tokenizer, *fixed).item()
        entry = {"step": step, "seconds": round(seconds, 1), "train_loss": round(float(np.mean(window)), 4)
                 if window else None, "held_out_loss": round(held_loss, 4), "lr": lr_at(step),
                 "eval_seconds": round(time.perf_counter() - began, 1)}
        window.clear()
        state["evals"].append(entry)
        state.update(step=step, seconds=seconds)
        save_checkpoint(out / "checkpoint", model, opt, dict(state))
        if progress:
            print(f"[lm] {entry}", flush=True)

    train_for(step_fn, start_step=state["step"], start_seconds=state["seconds"], minutes=minutes, steps=steps,
              every=(eval_every, checkpoint), progress=progress, desc="lm")
    model.eval()
    return {"state": state, "model": model, "tokenizer": tokenizer}


def _unset_decoder_token_ids(config_path: Path) -> None:
    """Write the decoder's pad and BOS ids as null in an exported config.json. MusicGen's BOS / padding id is
    the codebook size (512), one past the codes, and the decoder config accepts that; but transformers'
    MusicgenConfig checks the decoder's ids against [0, vocab_size) and warns on every load that 512 lies
    outside the vocabulary. The id is still on record where generation reads it (the top-level pad and
    decoder-start ids, generation_config.json), and MusicModel.pad_token_id takes the codebook size."""
    config = json.loads(config_path.read_text())
    config["decoder"]["pad_token_id"] = config["decoder"]["bos_token_id"] = None
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def export_mini(model, tokenizer, folder: str | Path, recipe: dict, dtype: torch.dtype = torch.float16) -> int:
    """save_pretrained the model (weights in `dtype`) and tokenizer into `folder`, with recipe.json;
    returns the bytes written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.to(dtype).save_pretrained(folder)
    model.to(torch.float32)
    _unset_decoder_token_ids(folder / "config.json")
    tokenizer.save_pretrained(folder)
    (folder / "recipe.json").write_text(json.dumps(recipe, indent=1) + "\n")
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
