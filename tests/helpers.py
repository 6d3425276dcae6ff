"""Helpers shared by the test modules (import them with `from helpers import ...`).

Nothing here computes a DeCo quantity: these are tolerances, random inputs and the location of the
release fixtures, so that every test compares an implementation against an independent oracle.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray

from deco.config import DeCoConfig, parameter_shapes

REPO_ROOT = Path(__file__).resolve().parent.parent

#: The release ran in float32; the float64 reference must agree to this (relative to max |expected|).
FIXTURE_RTOL = 1e-5


def fixtures_folder() -> Path:
    """$DECO_FIXTURES, else `<repo root>/../shared/fixtures` (it may not exist)."""
    env = os.environ.get("DECO_FIXTURES")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "fixtures"


def release_fixtures(*names: str) -> Path:
    """The release fixtures folder, required to hold `names`: skipped locally when one is
    absent, failed under CI (CI set), so CI never passes by silently skipping a comparison with
    the release. A CI without them by design (a fork's GitHub Actions run: the fixtures are not in
    the repository) sets DECO_FIXTURES_OPTIONAL=1 and skips them, listed as skipped."""
    folder = fixtures_folder()
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        message = f"release fixtures {missing} not found in {folder} (set DECO_FIXTURES)"
        if os.environ.get("CI") and not os.environ.get("DECO_FIXTURES_OPTIONAL"):
            pytest.fail(message)
        pytest.skip(message)
    return folder


def release_fixture(name: str) -> Path:
    """One file of the release fixtures (see `release_fixtures`)."""
    return release_fixtures(name) / name


def rel_err(got: Any, expected: Any) -> float:
    """max |got - expected| / max |expected| (the fixture metric); inf on a shape mismatch."""
    got = np.asarray(got, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if got.shape != expected.shape:
        return float("inf")
    err = float(np.max(np.abs(got - expected))) if got.size else 0.0
    scale = float(np.max(np.abs(expected))) if expected.size else 0.0
    return err / scale if scale > 0 else err


def _is_norm_weight(name: str) -> bool:
    # RMSNorm / LayerNorm gains: norm1, norm2, q_norm, k_norm, decoder.blocks.j.norm
    return name.endswith("norm1.weight") or name.endswith("norm2.weight") or name.endswith(
        "norm.weight"
    )


def random_weights(
    config: DeCoConfig, seed: int = 0, scale: float = 1.0
) -> dict[str, NDArray[np.float64]]:
    """Non-zero random float64 weights for every entry of `parameter_shapes(config)`.

    Norm gains are 1 + 0.1 N(0, 1); matrices N(0, scale^2 / fan_in) (so activations stay O(1));
    biases and the label table 0.1 * scale * N(0, 1). Nothing is zero, unlike a real
    initialisation (AdaLN-Zero), so a wiring mistake changes the output.
    """
    rng = np.random.default_rng(seed)
    out: dict[str, NDArray[np.float64]] = {}
    for name, shape in parameter_shapes(config).items():
        if _is_norm_weight(name):
            out[name] = 1.0 + 0.1 * rng.standard_normal(shape)
        elif len(shape) == 2 and name != "y_embed.weight":
            out[name] = rng.standard_normal(shape) * (scale / np.sqrt(shape[1]))
        else:
            out[name] = 0.1 * scale * rng.standard_normal(shape)
    return out


def tiny_config(architecture: str = "deco", **overrides: Any) -> DeCoConfig:
    """A small config that runs in milliseconds in the float64 reference."""
    name = "DeCo-tiny/4" if architecture == "deco" else "DiT-tiny/4"
    return DeCoConfig.preset(name, **overrides)


def tiny_model(config: DeCoConfig, seed: int) -> Any:
    """The deco.optimized model of `config` (eval mode, float32) with `random_weights(config, seed)`."""
    import torch  # here: the reference's tests import this module without torch

    from deco.optimized.weights import build_model

    model = build_model(config)
    model.load_state_dict({k: torch.from_numpy(v.astype(np.float32))
                           for k, v in random_weights(config, seed=seed).items()})
    return model.eval()


#: Tiny DeCoTransformer2DModel configs (16 x 16 images, patches of 4): class- and text-conditional.
TINY_DIFFUSERS_CONFIGS: dict[str, dict[str, Any]] = {
    "class": dict(architecture="deco", in_channels=3, patch_size=4, hidden_size=32, num_heads=2,
                  depth=2, decoder_depth=2, decoder_width=8, num_classes=10, sample_size=16),
    "text": dict(architecture="t2i", in_channels=3, patch_size=4, hidden_size=32, num_heads=2,
                 depth=2, decoder_depth=2, decoder_width=8, num_classes=0, text_depth=1,
                 text_dim=24, text_length=6, sample_size=16),
}


def tiny_transformer(kind: str, seed: int = 0) -> Any:
    """A tiny DeCoTransformer2DModel (`TINY_DIFFUSERS_CONFIGS[kind]`, eval mode) with every weight
    normal(0, 0.3) from `seed` (the default init zeroes the decoder's output layers, which would
    make every output 0)."""
    import torch

    from deco.diffusers import DeCoTransformer2DModel

    model = DeCoTransformer2DModel(**TINY_DIFFUSERS_CONFIGS[kind]).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


def tiny_text_encoder(folder: Path, corpus: list[str]) -> Path:
    """A tiny random Qwen3 (hidden 32) and a BPE tokenizer trained on `corpus` with `tokenizers`,
    saved as one folder (`folder`, returned) in transformers' format."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=120,
                                                              special_tokens=["<pad>", "<unk>"]))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>",
                                                unk_token="<unk>")
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    config = transformers.Qwen3Config(
        vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=64,
        pad_token_id=fast.pad_token_id)
    transformers.Qwen3Model(config).eval().save_pretrained(folder)
    return folder


def save_checkpoint(model: Any, folder: Path) -> Path:
    """`model` written as the weight file `folder`/m.safetensors (its own `save`); returns the path."""
    path = folder / "m.safetensors"
    model.save(path)
    return path


def cases(table: list[tuple[Any, ...]]) -> list[Any]:
    """`pytest.param(*row[1:], id=row[0])` for each row of a table whose first column is an id."""
    return [pytest.param(*row[1:], id=row[0]) for row in table]


def missing_extra(message: str) -> None:
    """An optional dependency (an extra) is missing: skip locally, fail under CI (CI set), which
    installs every extra the tests need."""
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message, allow_module_level=True)


def umask_fixture(*masks: int) -> Callable[..., Iterator[int]]:
    """A fixture that runs each test under every umask in `masks` and restores the previous one
    afterwards; assign it in a test module: `umask = umask_fixture(0o022, 0o077)`."""

    @pytest.fixture(params=masks)
    def umask(request: pytest.FixtureRequest) -> Iterator[int]:
        mask: int = request.param
        old = os.umask(mask)
        try:
            yield mask
        finally:
            os.umask(old)

    return umask


def node_with_onnxruntime() -> str:
    """The `node` executable, with examples/node_modules installed (onnxruntime-node); skipped
    locally and failed under CI without them (`missing_extra`)."""
    path = shutil.which("node")
    if path is None:
        missing_extra("node is not installed (Node.js 20 or later)")
    if not (REPO_ROOT / "examples" / "node_modules" / "onnxruntime-node").is_dir():
        missing_extra("examples/node_modules is missing: run `npm ci --ignore-scripts` in examples/")
    return str(path)


def require_module(name: str) -> Any:
    """Import an optional dependency for a test module (see `missing_extra`)."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as exc:
        missing_extra(f"{name} is not installed ({exc}); see the extras in pyproject.toml")
