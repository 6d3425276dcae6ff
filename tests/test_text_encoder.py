"""The Qwen3 text encoder against transformers and tokenizers called directly.

The oracle tokenizes with the raw `tokenizers` library (tokenizer.json), truncates and right-pads
by hand, and runs the causal-LM class (`Qwen3ForCausalLM`, whose last entry of `hidden_states`
is the final-norm output): none of the encoder's own tokenizer settings, width fitting or
`Qwen3Model` loading is reused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from deco.text.encoder import Qwen3TextEncoder, TextEncoder, build_tiny_qwen3, fit_width

HIDDEN = 32  # the tiny model's width D
PAD_ID = 0  # <|endoftext|>, the first special token of the tiny tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_qwen3(tmp_path_factory.mktemp("qwen3") / "tiny", seed=0)


@pytest.fixture(scope="module")
def oracle_model(tiny: Path) -> torch.nn.Module:
    from transformers import Qwen3ForCausalLM

    model = Qwen3ForCausalLM.from_pretrained(str(tiny), local_files_only=True, dtype=torch.float32)
    return model.eval()


def oracle(folder: Path, model: torch.nn.Module, prompts: list[str], length: int) -> torch.Tensor:
    """(B, T, D) last hidden states: raw tokenizers ids, truncated, right-padded, masked by hand."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    ids = torch.full((len(prompts), length), PAD_ID, dtype=torch.long)
    mask = torch.zeros(len(prompts), length, dtype=torch.long)
    for i, prompt in enumerate(prompts):
        row = tok.encode(prompt, add_special_tokens=False).ids[:length]
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    return out.hidden_states[-1]  # type: ignore[no-any-return]


PROMPTS = ["a photo of a cat", "", "the quick brown fox jumps over the lazy dog at sunset near the sea",
           "a dog", "it's 12 o'clock;\nCafé"]


def test_is_a_text_encoder(tiny: Path) -> None:
    enc = Qwen3TextEncoder(tiny, 8, 48, device="cpu")
    assert isinstance(enc, TextEncoder)
    assert enc.dtype == torch.float32 and enc.device.type == "cpu"


@pytest.mark.parametrize(("length", "width"), [(8, 48), (12, 32), (6, 20)])
def test_matches_transformers(tiny: Path, oracle_model: torch.nn.Module, length: int, width: int) -> None:
    """Mixed lengths (empty, short, longer than T: truncated); width padded (48), equal, truncated."""
    enc = Qwen3TextEncoder(tiny, length, width, device="cpu")
    got = enc.encode(PROMPTS)
    want = oracle(tiny, oracle_model, PROMPTS, length)
    assert got.shape == (len(PROMPTS), length, width) and got.dtype == torch.float32
    d = min(width, HIDDEN)
    torch.testing.assert_close(got[..., :d], want[..., :d], rtol=1e-5, atol=1e-5)
    assert torch.all(got[..., d:] == 0)


TRICKY = ["it's 2024: 12 cats!\n\nCafé NAÏVE", "  spaces   and\ttabs ", "a", "ＡＢＣ ﬁ", "<|endoftext|> x"]


def test_tokenizer_is_the_releases(tiny: Path) -> None:
    """Ids and mask as the release's tokenizer class (Qwen2Tokenizer), loaded and called with
    the release's arguments, gives them; digits split one by one (Qwen's pattern, not GPT-2's)."""
    from transformers import Qwen2Tokenizer

    release = Qwen2Tokenizer.from_pretrained(str(tiny), max_length=12, padding_side="right")
    want = release(TRICKY, truncation=True, max_length=12, padding="max_length", return_tensors="pt")
    got = Qwen3TextEncoder(tiny, 12, 32, device="cpu").tokenize(TRICKY)
    assert torch.equal(got["input_ids"], want["input_ids"])
    assert torch.equal(got["attention_mask"], want["attention_mask"])
    assert release("2024").input_ids == [release.convert_tokens_to_ids(c) for c in "2024"]


def test_truncation_and_padding_are_real(tiny: Path) -> None:
    """The long prompt really is longer than T and the short one shorter (else the test above
    would not cover truncation and padding), and padded positions keep non-zero states."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tiny / "tokenizer.json"))
    assert len(tok.encode(PROMPTS[2]).ids) > 12
    assert len(tok.encode(PROMPTS[3]).ids) < 6
    enc = Qwen3TextEncoder(tiny, 8, 48, device="cpu")
    assert enc.tokenize(PROMPTS[3:])["attention_mask"][0, -1] == 0
    assert enc.encode(PROMPTS[3:])[0, -1].abs().sum() > 0


def test_truncation_keeps_the_first_tokens(tiny: Path) -> None:
    """A prompt cut at T encodes like its first T tokens (causal attention, no end marker)."""
    enc = Qwen3TextEncoder(tiny, 6, 32, device="cpu")
    ids = enc.tokenize([PROMPTS[2]])["input_ids"][0]
    assert len(ids) == 6
    prefix = enc.tokenizer.decode(ids.tolist())
    torch.testing.assert_close(enc.encode([PROMPTS[2]]), enc.encode([prefix]), rtol=1e-5, atol=1e-5)


@settings(max_examples=10, deadline=None)
@given(st.lists(st.text(alphabet="abcdefghij ,.XYZ", max_size=30), min_size=1, max_size=4))
def test_batch_rows_do_not_interact(tiny: Path, oracle_model: torch.nn.Module, prompts: list[str]) -> None:
    enc = Qwen3TextEncoder(tiny, 10, 40, device="cpu")
    got = enc.encode(prompts)
    for i, prompt in enumerate(prompts):
        want = oracle(tiny, oracle_model, [prompt], 10)[0]
        torch.testing.assert_close(got[i, :, :HIDDEN], want, rtol=1e-5, atol=1e-5)


def test_null_is_the_cached_empty_prompt(tiny: Path, oracle_model: torch.nn.Module) -> None:
    enc = Qwen3TextEncoder(tiny, 8, 48, device="cpu")
    null = enc.null()
    assert null.shape == (8, 48)
    torch.testing.assert_close(null[:, :HIDDEN], oracle(tiny, oracle_model, [""], 8)[0], rtol=1e-5, atol=1e-5)
    assert enc.null() is null  # computed once
    negative = enc.null("blurry")
    assert not torch.allclose(negative, null)
    torch.testing.assert_close(negative, enc.encode(["blurry"])[0])
    with pytest.raises(TypeError, match=r"^negative:"):
        enc.null(None)  # type: ignore[arg-type]


def test_embeddings_can_feed_a_trained_model(tiny: Path) -> None:
    """Not inference tensors: autograd may save them for the backward of a trained layer."""
    text = Qwen3TextEncoder(tiny, 8, 48, device="cpu").encode(PROMPTS)
    assert not text.requires_grad
    layer = torch.nn.Linear(48, 4)
    layer(text).square().sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0


def test_bfloat16_on_request(tiny: Path) -> None:
    """The release's bf16 path (CUDA default) computes in bf16; it stays close to float32."""
    f32 = Qwen3TextEncoder(tiny, 8, 48, device="cpu").encode(PROMPTS)
    bf16 = Qwen3TextEncoder(tiny, 8, 48, device="cpu", dtype=torch.bfloat16).encode(PROMPTS)
    assert bf16.dtype == torch.bfloat16
    torch.testing.assert_close(bf16.float(), f32, rtol=0.1, atol=0.1)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_defaults_to_the_releases_bfloat16(tiny: Path, oracle_model: torch.nn.Module) -> None:
    enc = Qwen3TextEncoder(tiny, 8, 48)
    assert enc.device.type == "cuda" and enc.dtype == torch.bfloat16
    got = enc.encode(PROMPTS)
    assert got.dtype == torch.bfloat16 and got.device.type == "cuda"
    want = oracle(tiny, oracle_model, PROMPTS, 8)  # float32 on the CPU
    torch.testing.assert_close(got[..., :HIDDEN].float().cpu(), want, rtol=0.1, atol=0.1)


def test_fit_width() -> None:
    x = torch.arange(24.0).reshape(1, 2, 12)
    assert torch.equal(fit_width(x, 12), x)
    assert torch.equal(fit_width(x, 5), x[..., :5])
    padded = fit_width(x, 15)
    assert torch.equal(padded[..., :12], x) and torch.equal(padded[..., 12:], torch.zeros(1, 2, 3))
    with pytest.raises(ValueError, match=r"^width:"):
        fit_width(x, 0)


def test_builder_is_deterministic(tmp_path: Path) -> None:
    a = build_tiny_qwen3(tmp_path / "a", seed=3)
    b = build_tiny_qwen3(tmp_path / "b", seed=3)
    c = build_tiny_qwen3(tmp_path / "c", seed=4)
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.json",
            "merges.txt"} <= set(names)
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_bytes() == (c / "tokenizer.json").read_bytes()
    state = torch.get_rng_state()
    build_tiny_qwen3(tmp_path / "d", seed=5)
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is untouched


def test_identity(tiny: Path, tmp_path: Path) -> None:
    """Changes with T, E, dtype and the weights; equal for an identical folder."""
    base = Qwen3TextEncoder(tiny, 8, 48, device="cpu").identity
    assert Qwen3TextEncoder(tiny, 8, 48, device="cpu").identity == base
    assert Qwen3TextEncoder(build_tiny_qwen3(tmp_path / "same", seed=0), 8, 48, device="cpu").identity == base
    others = {Qwen3TextEncoder(tiny, 9, 48, device="cpu").identity,
              Qwen3TextEncoder(tiny, 8, 40, device="cpu").identity,
              Qwen3TextEncoder(tiny, 8, 48, device="cpu", dtype=torch.bfloat16).identity,
              Qwen3TextEncoder(build_tiny_qwen3(tmp_path / "other", seed=1), 8, 48, device="cpu").identity}
    assert base not in others and len(others) == 4


# ------------------------------------------------------------------------------ bad input
def copy_folder(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        if f.name not in skip:
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_missing_folder_and_files(tiny: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"^text_encoder: no such folder"):
        Qwen3TextEncoder(tmp_path / "nope", 8, 48)
    with pytest.raises(ValueError, match=r"^text_encoder: .* is not a folder"):
        Qwen3TextEncoder(tiny / "config.json", 8, 48)
    for missing, what in ((("config.json",), "config.json"), (("model.safetensors",), "safetensors"),
                          (("tokenizer.json", "merges.txt"), "tokenizer files")):
        folder = copy_folder(tiny, tmp_path / f"no-{missing[0]}", skip=missing)
        with pytest.raises(FileNotFoundError, match=f"^text_encoder: .*{what}"):
            Qwen3TextEncoder(folder, 8, 48)


def test_vocab_and_merges_suffice(tiny: Path, tmp_path: Path) -> None:
    """Without tokenizer.json (older Qwen folders), vocab.json + merges.txt give the same ids."""
    folder = copy_folder(tiny, tmp_path / "no-tokenizer-json", skip=("tokenizer.json",))
    got = Qwen3TextEncoder(folder, 12, 32, device="cpu").tokenize(TRICKY)
    want = Qwen3TextEncoder(tiny, 12, 32, device="cpu").tokenize(TRICKY)
    assert torch.equal(got["input_ids"], want["input_ids"])


def test_missing_weights_are_an_error(tiny: Path, tmp_path: Path) -> None:
    """transformers would initialise missing weights at random; the encoder refuses."""
    from safetensors.torch import load_file, save_file

    folder = copy_folder(tiny, tmp_path / "partial")
    state = load_file(str(folder / "model.safetensors"))
    del state[next(k for k in state if "layers.1." in k)]
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"^text_encoder: .* lacks weights"):
        Qwen3TextEncoder(folder, 8, 48)


def test_wrong_model_type(tiny: Path, tmp_path: Path) -> None:
    folder = copy_folder(tiny, tmp_path / "llama")
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "llama"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"^text_encoder: .*'llama'.*expected qwen3"):
        Qwen3TextEncoder(folder, 8, 48)


def test_bad_arguments(tiny: Path) -> None:
    with pytest.raises(ValueError, match=r"^length:"):
        Qwen3TextEncoder(tiny, 0, 48)
    with pytest.raises(ValueError, match=r"^width:"):
        Qwen3TextEncoder(tiny, 8, 2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^device: not a torch device: 'gpu0'"):
        Qwen3TextEncoder(tiny, 8, 48, device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"^device: 'cuda' requested, but CUDA is not available"):
            Qwen3TextEncoder(tiny, 8, 48, device="cuda")
    enc = Qwen3TextEncoder(tiny, 8, 48, device="cpu")
    with pytest.raises(TypeError, match=r"^prompts:"):
        enc.encode("a cat")
    with pytest.raises(TypeError, match=r"^prompts:"):
        enc.encode(["a cat", 3])  # type: ignore[list-item]
    assert enc.encode([]).shape == (0, 8, 48)
