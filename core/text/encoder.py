"""Text encoders for the text-to-image model: prompts -> (B, T, E) hidden states.

The release conditions its text-to-image DeCo on the last hidden states of Qwen3-1.7B
(`Qwen3Model`, not the LM head), computed like this:

* the tokenizer (no chat template, no prefix) right-pads every prompt to exactly T = max_length
  tokens and truncates longer ones; the model sees the attention mask, and the hidden states at
  the padded positions are kept (the DiT gets no mask);
* the feature width is padded with zeros, or truncated, to the model's text width E;
* the LM runs in bfloat16 on CUDA (the release casts the whole LM to bf16); on a CPU this module
  uses float32, where bf16 matmuls are slow and buy nothing;
* the null (unconditional) embedding is the encoding of the negative prompt, "" by default,
  computed once and cached. "" has no tokens (Qwen adds no BOS), so every position is padding
  and fully masked: its states are whatever transformers' attention (sdpa by default) returns
  for fully masked rows, as in the release.

Everything is read from a local folder in Hugging Face layout (config.json, *.safetensors,
tokenizer files): nothing is downloaded. `build_tiny_qwen3` writes such a folder for a tiny,
randomly initialised Qwen3 with its own byte-level BPE tokenizer, deterministically, for tests
and demos that need an encoder without a download. `transformers` and `tokenizers` are the
optional extra `deco-diffusion[text]`; they are imported only when an encoder is built.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from deco.errors import first_line, quiet_transformers
from deco.extras import install_command
from deco.untrusted import UntrustedFileError, json_object, read_json, read_safetensors_header

#: Files a tokenizer folder may provide; one of the two sets must be complete.
_TOKENIZER_FILE_SETS = (("tokenizer.json",), ("vocab.json", "merges.txt"))

#: Qwen2/Qwen3's pre-tokenization pattern (contractions, letter runs, single digits, symbols,
#: new lines, spaces), as in their published tokenizer.json.
QWEN_SPLIT_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
                      r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
#: Qwen's end-of-text token, also its pad token.
QWEN_PAD_TOKEN = "<|endoftext|>"

#: A small fixed corpus for the tiny tokenizer (its merges only need to be deterministic).
_TINY_CORPUS = (
    "a photo of a cat sitting on a red sofa",
    "a picture of a dog running on green grass",
    "a view of the sea at sunset with two boats",
    "the quick brown fox jumps over the lazy dog",
    "an image of a handwritten digit zero one two three four five six seven eight nine",
    "a scene of a city street at night with yellow lights",
    "it's 12 o'clock; we'll see 3 cats.\nNew line, café and naïve words",
)


@runtime_checkable
class TextEncoder(Protocol):
    """What the text-to-image model needs from a text encoder.

    `length` is T (tokens per prompt) and `width` E (features per token), both taken from the
    model's config (`text_length`, `text_dim`); `identity` is a short string that changes when the
    encoder, T, E or the computation dtype change (stored with precomputed embeddings)."""

    @property
    def length(self) -> int: ...

    @property
    def width(self) -> int: ...

    @property
    def identity(self) -> str: ...

    def encode(self, prompts: Sequence[str]) -> Tensor:
        """prompts (B strings) -> (B, T, E) float tensor."""
        ...

    def null(self, negative: str = "") -> Tensor:
        """The unconditional embedding (T, E): the encoding of `negative`, cached."""
        ...


def fit_width(hidden: Tensor, width: int) -> Tensor:
    """(B, T, D) -> (B, T, width): zero-pad the features on the right, or keep the first `width`.

    The release does this so that one DiT width fits text encoders of any hidden size."""
    if width < 1:
        raise ValueError(f"width: expected a positive int, got {width}")
    d = hidden.shape[-1]
    if d > width:
        return hidden[..., :width]
    if d < width:
        pad = hidden.new_zeros((*hidden.shape[:-1], width - d))
        return torch.cat([hidden, pad], dim=-1)
    return hidden


def check_prompts(prompts: Sequence[str]) -> list[str]:
    """`prompts` as a list, or a TypeError naming the argument."""
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise TypeError(f"prompts: expected a list of str, got {type(prompts).__name__}")
    bad = [type(p).__name__ for p in prompts if not isinstance(p, str)]
    if bad:
        raise TypeError(f"prompts: expected a list of str, found an item of type {bad[0]}")
    return list(prompts)


def require_text_packages() -> None:
    """A ModuleNotFoundError with the install command when the `text` extra is missing."""
    import importlib.util  # here: only to name missing extras

    missing = [m for m in ("transformers", "tokenizers") if importlib.util.find_spec(m) is None]
    if missing:
        raise ModuleNotFoundError(f"text_encoder: needs {' and '.join(missing)}: "
                                  f"{install_command('text')}", name=missing[0])


def check_encoder_folder(folder: str | Path) -> Path:
    """The folder as a Path, after checking it holds a config, weights and tokenizer files.

    Errors name the argument (`text_encoder`) and what is missing, so a half-downloaded folder
    is one clear line instead of a download attempt or a traceback deep inside transformers."""
    path = Path(folder)
    if not path.exists():
        raise FileNotFoundError(f"text_encoder: no such folder: {path}")
    if not path.is_dir():
        raise ValueError(f"text_encoder: {path} is not a folder (expected a Hugging Face model folder)")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"text_encoder: {path} has no config.json")
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        raise FileNotFoundError(f"text_encoder: {path} has no *.safetensors weights")
    for file in weights:  # headers checked (deco.untrusted): no pickle under a safetensors name
        try:
            read_safetensors_header(file)
        except UntrustedFileError as exc:
            raise ValueError(f"text_encoder: {exc}") from None
    if not any(all((path / f).is_file() for f in files) for files in _TOKENIZER_FILE_SETS):
        raise FileNotFoundError(
            f"text_encoder: {path} has no tokenizer files (tokenizer.json, or vocab.json + merges.txt)"
        )
    return path


def folder_fingerprint(folder: Path) -> str:
    """sha256 (first 16 hex digits) over the names and contents of the folder's json, txt and
    safetensors files: two folders agree exactly when they hold the same encoder."""
    digest = hashlib.sha256()
    suffixes = (".json", ".txt", ".safetensors")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in suffixes)
    for path in files:
        digest.update(path.name.encode() + b"\0")
        digest.update(file_sha256(path).encode())
    return digest.hexdigest()[:16]


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def parse_device(device: str | torch.device | None) -> torch.device:
    """`device` as a torch.device (None: CUDA when available, else the CPU); an unknown device
    or CUDA without a CUDA build/GPU is a ValueError naming the argument."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device: not a torch device: {device!r} ({exc})") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} requested, but CUDA is not available")
    return parsed


class Qwen3TextEncoder:
    """The release's text encoder: a Qwen3 LM's last hidden states, from a local folder.

    `folder` is what a user who downloaded e.g. Qwen3-1.7B has (the causal-LM checkpoint; its
    `lm_head` is not used). `length` T and `width` E come from the model's config. `device`
    defaults to CUDA when available; `dtype` to bfloat16 on CUDA (as the release) and float32
    elsewhere. Embeddings are returned in that dtype, on that device."""

    def __init__(self, folder: str | Path, length: int, width: int, *,
                 device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        for name, value in (("length", length), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        require_text_packages()
        self.folder = check_encoder_folder(folder)
        self.length, self.width = length, width
        self.device = parse_device(device)
        self.dtype = dtype if dtype is not None else (
            torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.tokenizer = load_tokenizer(self.folder)
        self.model = load_qwen3(self.folder, self.dtype).to(self.device)
        self._null: dict[str, Tensor] = {}

    @functools.cached_property
    def identity(self) -> str:
        """Weights and tokenizer fingerprint, T, E and dtype. Computed on first use: hashing the
        3.4 GB of Qwen3-1.7B takes seconds, which only `embed-text`'s resume check needs."""
        return (f"qwen3:{folder_fingerprint(self.folder)}:T{self.length}:E{self.width}:"
                f"{str(self.dtype).removeprefix('torch.')}")

    def tokenize(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        """input_ids and attention_mask, both (B, T): right-padded to T, truncated to T."""
        batch = self.tokenizer(check_prompts(prompts), truncation=True, max_length=self.length,
                               padding="max_length", return_tensors="pt")
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    # no_grad, not inference_mode: the embeddings feed a model being trained, and autograd
    # refuses to save inference tensors for backward.
    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> Tensor:
        """prompts (B strings) -> (B, T, E) last hidden states, width fitted to E."""
        if len(prompts) == 0:
            return torch.zeros(0, self.length, self.width, dtype=self.dtype, device=self.device)
        tokens = {k: v.to(self.device) for k, v in self.tokenize(prompts).items()}
        # The release also runs its encoder under CUDA bf16 autocast (on top of bf16 weights).
        autocast = self.device.type == "cuda" and self.dtype == torch.bfloat16
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            hidden = self.model(**tokens).last_hidden_state  # (B, T, D)
        return fit_width(hidden.to(self.dtype), self.width)  # (B, T, E)

    def null(self, negative: str = "") -> Tensor:
        """The unconditional embedding (T, E) of `negative`, computed once per string."""
        if not isinstance(negative, str):
            raise TypeError(f"negative: expected a str, got {type(negative).__name__}")
        if negative not in self._null:
            self._null[negative] = self.encode([negative])[0]
        return self._null[negative]


def load_tokenizer(folder: Path) -> Any:
    """The folder's tokenizer, offline, right padding; a tokenizer without a pad token is an
    error (padding to T needs one; Qwen's is <|endoftext|>)."""
    from transformers import AutoTokenizer  # here: an optional extra (text)

    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    # Set after loading rather than passed to from_pretrained: the keyword handling of the
    # tokenizer constructors differs between transformers 4 and 5, the attribute does not.
    tokenizer.padding_side = "right"
    if tokenizer.pad_token_id is None:
        raise ValueError(f"text_encoder: the tokenizer in {folder} has no pad token")
    return tokenizer


def load_qwen3(folder: Path, dtype: torch.dtype) -> Any:
    """`Qwen3Model` from the folder's weights, frozen, in eval mode.

    Missing weights are an error: transformers would otherwise initialise them at random and
    only warn, which silently gives meaningless embeddings."""
    from transformers import Qwen3Model  # here: an optional extra (text)

    config = json_object(read_json(folder / "config.json"), f"text_encoder: {folder / 'config.json'}")
    if config.get("model_type") != "qwen3":
        raise ValueError(f"text_encoder: {folder} holds a {config.get('model_type')!r} model, expected qwen3")
    with quiet_transformers():
        # Typed as the model alone by transformers; with output_loading_info it is a pair.
        try:
            loaded: Any = Qwen3Model.from_pretrained(str(folder), local_files_only=True, dtype=dtype,
                                                     output_loading_info=True)
        except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
            # transformers' refusals (a pickle it will not load, a config it cannot build)
            raise ValueError(f"text_encoder: {folder} cannot be loaded by transformers "
                             f"({first_line(exc)[:200]})") from None
    model, info = loaded
    if info["missing_keys"] or info["mismatched_keys"]:
        bad = sorted(info["missing_keys"]) + sorted(str(k) for k in info["mismatched_keys"])
        raise ValueError(f"text_encoder: {folder} lacks weights for {len(bad)} tensors, e.g. {bad[0]}")
    model.eval().requires_grad_(False)
    return model


def write_tiny_tokenizer(out: Path, vocab_size: int) -> int:
    """Train a byte-level BPE tokenizer with Qwen2's pipeline (NFC, Qwen's split pattern, bytes;
    no BOS or EOS added) on a fixed corpus and write it as Qwen checkpoints ship theirs
    (tokenizer.json, vocab.json + merges.txt, tokenizer_config.json naming Qwen2Tokenizer).
    Returns the vocabulary size."""
    from tokenizers import (  # here: an optional extra (text)
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast  # here: an optional extra (text)

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[QWEN_PAD_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(list(_TINY_CORPUS), trainer=trainer)
    fast: Any = PreTrainedTokenizerFast  # untyped constructor
    fast(tokenizer_object=bpe, eos_token=QWEN_PAD_TOKEN, pad_token=QWEN_PAD_TOKEN).save_pretrained(str(out))
    bpe.model.save(str(out))  # vocab.json + merges.txt, which Qwen2Tokenizer reads
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "Qwen2Tokenizer"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return int(bpe.get_vocab_size())


def build_tiny_qwen3(folder: str | Path, seed: int = 0, *, hidden: int = 32, layers: int = 2,
                     vocab_size: int = 320) -> Path:
    """Write a tiny random Qwen3 causal LM and its byte-level BPE tokenizer to `folder`.

    The folder has the layout of a downloaded Qwen3 checkpoint (config.json, model.safetensors,
    the tokenizer files of `write_tiny_tokenizer`; tied input/output embeddings like Qwen3-1.7B,
    <|endoftext|> as pad token), so it loads through the same code path. The same arguments
    give byte-identical files. The global torch RNG is left untouched."""
    from transformers import Qwen3Config, Qwen3ForCausalLM  # here: an optional extra (text)

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    vocab = write_tiny_tokenizer(out, vocab_size)
    heads = max(1, hidden // 8)
    config = Qwen3Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        head_dim=hidden // heads, max_position_embeddings=512, tie_word_embeddings=True,
        # Larger than Qwen's 0.02 so that a tiny random model's states vary visibly per token.
        # No pad_token_id (as Qwen3-1.7B): it would zero the pad row of the embedding table.
        initializer_range=0.2, eos_token_id=0, bos_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config)
    model.save_pretrained(str(out))
    return out
