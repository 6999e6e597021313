"""Loading MusicGen: Hugging Face ids, local directories, and random-weight models built from configs.

Every path ends in the same object, `MusicModel`: the transformers `MusicgenForConditionalGeneration`
(text encoder, EnCodec, decoder), its tokenizer, the device and dtype it lives on, and a fingerprint
that direction banks and feature files are checked against.

Random-weight models (`tiny-random`, `random-small|medium|large`) have the real architecture and cost,
so they serve tests and benchmarks; their audio is noise, and `MusicModel.is_random` says so.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import string
from dataclasses import dataclass
from pathlib import Path

import torch

from musicrfm.protocol import fields

__all__ = [
    "ModelFingerprint",
    "MusicModel",
    "ModelLoadError",
    "RANDOM_MODELS",
    "NOISE_LABEL",
    "is_random_model",
    "BUNDLED_MODELS",
    "HUB_MODELS",
    "check_model_name",
    "bundled_model_dir",
    "bundled_model_folder",
    "bundled_banks",
    "bundled_prompts",
    "load_model",
    "build_random_model",
    "seed_codebooks",
    "pick_device",
    "pick_dtype",
]

NOISE_WARNING = "random weights: this audio is noise, not music"
# NOISE_WARNING cut to fit a table cell: the `note` of a sweep's CSV rows, its summary and plot titles
# (docs/evaluation.md quotes it). Defined here, beside the warning, so that both change together.
NOISE_LABEL = "random weights: noise"


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says what is missing and how to get it."""


@dataclass(frozen=True)
class ModelFingerprint:
    """What a direction bank or a feature file must agree with to be used on a model."""

    architecture: str
    num_layers: int
    hidden_size: int

    def to_dict(self) -> dict:
        return {"architecture": self.architecture, "num_layers": self.num_layers, "hidden_size": self.hidden_size}

    @classmethod
    def from_dict(cls, d: dict) -> "ModelFingerprint":
        return cls(str(d["architecture"]), int(d["num_layers"]), int(d["hidden_size"]))

    def describe(self) -> str:
        return f"{self.architecture} with {self.num_layers} layers x hidden size {self.hidden_size}"


@dataclass
class MusicModel:
    """A loaded MusicGen: the HF model plus what the engine needs to know about it."""

    name: str
    hf: torch.nn.Module  # MusicgenForConditionalGeneration, in eval mode
    tokenizer: object
    device: torch.device
    dtype: torch.dtype
    is_random: bool

    @property
    def decoder_config(self):
        return self.hf.config.decoder

    @property
    def num_layers(self) -> int:
        return int(self.decoder_config.num_hidden_layers)

    @property
    def hidden_size(self) -> int:
        return int(self.decoder_config.hidden_size)

    @property
    def num_codebooks(self) -> int:
        return int(self.decoder_config.num_codebooks)

    @property
    def pad_token_id(self) -> int:
        # MusicGen uses the same id (= codebook size) for BOS and the delay-pattern padding. The bundled
        # model's config leaves it unset (mini.lm.export_mini says why), so the codebook size stands in.
        pad = self.decoder_config.pad_token_id
        return int(self.decoder_config.vocab_size if pad is None else pad)

    @property
    def sample_rate(self) -> int:
        return int(self.hf.config.audio_encoder.sampling_rate)

    @property
    def frame_rate(self) -> float:
        cfg = self.hf.config.audio_encoder
        hop = 1
        for r in cfg.upsampling_ratios:
            hop *= r
        return cfg.sampling_rate / hop

    @property
    def hop_length(self) -> int:
        return int(round(self.sample_rate / self.frame_rate))

    @property
    def fingerprint(self) -> ModelFingerprint:
        return ModelFingerprint("musicgen", self.num_layers, self.hidden_size)

    def progress_label(self, what: str) -> str:
        """A progress bar's label: `what`, marked as noise when the weights are random."""
        return f"{what} ({NOISE_LABEL})" if self.is_random else what

    def describe(self) -> str:
        text = f"{self.name} ({self.fingerprint.describe()}, {self.device.type}, {str(self.dtype).replace('torch.', '')})"
        return f"{text} [{NOISE_WARNING}]" if self.is_random else text


# --- device and dtype -------------------------------------------------------------------------------


def pick_device(requested: str | None = None) -> torch.device:
    if requested and requested != "auto":
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(device: torch.device, requested: str | None = None) -> torch.dtype:
    if requested and requested != "auto":
        table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
                 "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
        if requested not in table:
            raise ValueError(f"unknown dtype {requested!r}; use one of {sorted(table)}")
        return table[requested]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


# --- random-weight models ---------------------------------------------------------------------------

# Decoder sizes of the released checkpoints (layers, hidden, heads, ffn); text encoder is T5-base for all.
_MUSICGEN_SIZES = {
    "small": (24, 1024, 16, 4096),
    "medium": (48, 1536, 24, 6144),
    "large": (48, 2048, 32, 8192),
}
RANDOM_MODELS = ("tiny-random", *(f"random-{s}" for s in _MUSICGEN_SIZES))


def is_random_model(name: str) -> bool:
    """Does `name` load a random-weight model (its audio is noise)? Known before any weights are read, so
    callers that plan work without loading the model (a sweep's driver) can say so up front."""
    return name in RANDOM_MODELS


def _char_tokenizer():
    """A character-level tokenizer built in-process (no files to download), T5-style special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for ch in string.ascii_lowercase + string.digits + " .,'-!?&/()#":
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.normalizer = None
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    from tokenizers import normalizers

    tok.normalizer = normalizers.Lowercase()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def random_model_config(name: str, max_positions: int | None = None):
    """Config for a random-weight model: `tiny-random` (tests) or `random-small|medium|large` (benchmarks)."""
    from transformers import EncodecConfig, MusicgenConfig, MusicgenDecoderConfig, T5Config

    if name == "tiny-random":
        text = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
        # 1.2 kbps = 4 codebooks of 6 bits at 50 frames/s: the decoder's 4 codebooks, as 2.2 kbps is for
        # encodec_32khz's 11-bit codebooks.
        codec = EncodecConfig(sampling_rate=32000, audio_channels=1, hidden_size=16, num_filters=4,
                              num_residual_layers=1, upsampling_ratios=[8, 5, 4, 4], codebook_size=64,
                              target_bandwidths=[1.2], use_causal_conv=False, num_lstm_layers=1,
                              use_conv_shortcut=False, normalize=False)
        dec = MusicgenDecoderConfig(vocab_size=64, pad_token_id=64, bos_token_id=64, num_codebooks=4,
                                    num_hidden_layers=4, hidden_size=32, num_attention_heads=4, ffn_dim=64,
                                    max_position_embeddings=max_positions or 2048, dropout=0.0)
    elif name.startswith("random-") and name[len("random-"):] in _MUSICGEN_SIZES:
        layers, hidden, heads, ffn = _MUSICGEN_SIZES[name[len("random-"):]]
        text = T5Config(vocab_size=64, d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12,
                        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
        codec = EncodecConfig(sampling_rate=32000, audio_channels=1, hidden_size=128, num_filters=64,
                              num_residual_layers=1, upsampling_ratios=[8, 5, 4, 4], codebook_size=2048,
                              target_bandwidths=[2.2], use_causal_conv=False, num_lstm_layers=2,
                              use_conv_shortcut=False, normalize=False)
        dec = MusicgenDecoderConfig(vocab_size=2048, pad_token_id=2048, bos_token_id=2048, num_codebooks=4,
                                    num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                                    ffn_dim=ffn, max_position_embeddings=max_positions or 2048, dropout=0.0)
    else:
        raise ModelLoadError(f"unknown random model {name!r}; choose one of {', '.join(RANDOM_MODELS)}")
    cfg = MusicgenConfig(text_encoder=text.to_dict(), audio_encoder=codec.to_dict(), decoder=dec.to_dict())
    cfg.decoder_start_token_id = dec.bos_token_id
    cfg.pad_token_id = dec.pad_token_id
    return cfg


def seed_codebooks(codec: torch.nn.Module, seed: int) -> None:
    """Fill a new EnCodec's codebooks with seeded Gaussian entries. transformers initialises them to zero,
    so every code would decode to the same audio and nothing downstream would depend on the tokens."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in codec.quantizer.layers:
            embed = layer.codebook.embed
            embed.copy_(torch.randn(embed.shape, generator=gen).to(embed))


def build_random_model(name: str = "tiny-random", seed: int = 0, max_positions: int | None = None):
    """(hf model, tokenizer) with seeded random weights: same classes as the real checkpoints."""
    from transformers import MusicgenForConditionalGeneration

    cfg = random_model_config(name, max_positions)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        hf = MusicgenForConditionalGeneration(cfg)
    seed_codebooks(hf.audio_encoder, seed)
    gc = hf.generation_config
    gc.decoder_start_token_id = gc.bos_token_id = gc.pad_token_id = cfg.decoder.pad_token_id
    gc.guidance_scale, gc.do_sample, gc.top_k = 3.0, True, 250
    return hf, _char_tokenizer()


# --- bundled models ---------------------------------------------------------------------------------

# Models that ship inside the package (engine/weights/<name>): trained here, small enough to commit.
BUNDLED_MODELS = ("musicgen-mini",)


def bundled_model_folder(name: str) -> Path:
    """engine/weights/<name>: where a bundled model is (or is exported to)."""
    return Path(__file__).resolve().parent / "weights" / name


def bundled_model_dir(name: str) -> Path:
    """Where a bundled model lives; ModelLoadError if its weights are not there."""
    folder = bundled_model_folder(name)
    if not (folder / "model.safetensors").is_file():
        raise ModelLoadError(
            f"the bundled model {name!r} has no weights in {folder}: reinstall the package, or train and "
            "export it with `musicrfm mini corpus | codec | lm | export` (docs/musicgen-mini.md)"
        )
    return folder


def bundled_banks(name: str) -> list[Path]:
    """The direction banks shipped with a bundled model (engine/weights/<name>/banks/*.safetensors), sorted;
    [] for any other model."""
    if name not in BUNDLED_MODELS:
        return []
    folder = bundled_model_folder(name) / "banks"
    return sorted(folder.glob("*.safetensors"))


def bundled_prompts(name: str) -> tuple[str, ...]:
    """Prompts a bundled model was trained to follow (its recipe's `example_prompts`); () otherwise."""
    if name not in BUNDLED_MODELS:
        return ()
    recipe = bundled_model_folder(name) / "recipe.json"
    if not recipe.is_file():
        return ()
    return tuple(json.loads(recipe.read_text()).get("example_prompts", ()))


def bundled_layer_norms(name: str, site: str) -> dict | None:
    """A bundled model's typical activation norms at an injection point (its recipe's `layer_norms`, the
    engine.bank.LayerNorms dict), for a bank that carries none; None for other models or when not recorded."""
    if name not in BUNDLED_MODELS:
        return None
    recipe = bundled_model_folder(name) / "recipe.json"
    if not recipe.is_file():
        return None
    return (json.loads(recipe.read_text()).get("layer_norms") or {}).get(site)


# --- loading ----------------------------------------------------------------------------------------


# The released MusicGen checkpoints the engine runs (melody conditions differently: not supported yet).
HUB_MODELS = ("facebook/musicgen-small", "facebook/musicgen-medium", "facebook/musicgen-large")
# A Hugging Face id: owner/name, each starting with a letter or digit (what the hub accepts).
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def check_model_name(name: str) -> str:
    """`name` if load_model can try it: a bundled or random-weight model, an existing directory, or
    something shaped like a Hugging Face id (owner/name). Anything else is a typo (`musicgen-mni`): a
    ModelLoadError at once that offers the close names, instead of hub lookups that retry and fail late."""
    if not isinstance(name, str) or not name:
        raise ModelLoadError(f"a model name is a non-empty string, got {fields.shown(name)}")
    if name in BUNDLED_MODELS or is_random_model(name) or Path(name).expanduser().is_dir():
        return name
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep in name.replace("/", ""):
        raise ModelLoadError(f"model directory {name!r} does not exist")
    if _HUB_ID.fullmatch(name):
        return name
    known = (*BUNDLED_MODELS, *RANDOM_MODELS, *HUB_MODELS)
    near = difflib.get_close_matches(name.casefold(), known, n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(near)}?" if near else ""
    raise ModelLoadError(
        f"unknown model {name!r}{hint} (models: {', '.join(BUNDLED_MODELS)} (bundled), {', '.join(RANDOM_MODELS)} "
        f"(random weights), a Hugging Face id owner/name such as {HUB_MODELS[0]}, or a directory saved with "
        "save_pretrained)"
    )


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")


def _load_pretrained(name: str):
    from transformers import AutoTokenizer, MusicgenForConditionalGeneration

    path = Path(name).expanduser()
    is_dir = path.is_dir()  # otherwise a hub id: check_model_name refused everything else
    if is_dir and not (path / "config.json").is_file():
        raise ModelLoadError(
            f"{path} has no config.json: a model directory must come from save_pretrained() "
            "(config.json, model.safetensors, tokenizer files)"
        )
    source = str(path) if is_dir else name
    errors = []
    # Local files first: never touch the network when the weights are already here.
    for local_only in (True,) if (is_dir or _offline()) else (True, False):
        try:
            hf = MusicgenForConditionalGeneration.from_pretrained(source, local_files_only=local_only)
            tok = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
            return hf, tok
        except (OSError, ValueError) as exc:  # transformers raises OSError for missing files
            errors.append(f"{type(exc).__name__}: {str(exc).splitlines()[0]}")
    if is_dir:
        raise ModelLoadError(f"could not load MusicGen from {path}: {errors[-1]}")
    raise ModelLoadError(
        f"MusicGen weights for {name!r} are not on this machine and could not be downloaded ({errors[-1]}). "
        f"On a machine with internet access run `hf download {name}` (or "
        f"`MusicgenForConditionalGeneration.from_pretrained({name!r}).save_pretrained(DIR)`), then copy the "
        "Hugging Face cache or DIR here and pass --model DIR. For a smoke test without weights use "
        "--model tiny-random (its audio is noise)."
    )


def load_model(name: str = "musicgen-mini", device: str | None = None, dtype: str | None = None,
               seed: int = 0, max_positions: int | None = None) -> MusicModel:
    """Load `name`: a bundled model (musicgen-mini), a random-weight model name, a Hugging Face id or a
    local directory. A name that can be none of these fails at once (`check_model_name`)."""
    check_model_name(name)
    dev = pick_device(device)
    dt = pick_dtype(dev, dtype)
    if is_random_model(name):
        hf, tok = build_random_model(name, seed=seed, max_positions=max_positions)
        is_random = True
    else:
        hf, tok = _load_pretrained(str(bundled_model_dir(name)) if name in BUNDLED_MODELS else name)
        is_random = False
    arch = type(hf).__name__
    if arch != "MusicgenForConditionalGeneration":  # melody prepends its conditioning: not supported yet
        raise ModelLoadError(f"{name!r} is a {arch}, not a MusicGen model")
    hf = hf.to(device=dev, dtype=dt).eval()
    hf.requires_grad_(False)
    return MusicModel(name=name, hf=hf, tokenizer=tok, device=dev, dtype=dt, is_random=is_random)
