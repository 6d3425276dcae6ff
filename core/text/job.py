"""Text-to-image training data for `deco train --task t2i`: datasets, their streams, and the
`TextSource` that turns a batch's captions into the model's condition (B, T, E).

Three sources of text embeddings:

* the built-in demo (no `--data`): digit pairs with captions (`deco.text.digit_pairs`) and the tiny
  offline Qwen3 taught the demo's language (`deco.text.demo_encoder`: deterministic, frozen while the
  image model trains), written into the run folder as `text_encoder/`; the finite caption set is
  embedded once, a batch's condition is a lookup;
* `--text-encoder DIR` (a Qwen3 folder): the encoder runs in the loop on every batch's captions;
* `--embeddings DIR` (a `deco embed-text` store of the same captions): a lookup by caption.

The null embedding (caption dropout, guidance) is the encoding of "" (the release's default
negative prompt), from the encoder or the store.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from deco.data import CaptionItems
from deco.distributed import Dist
from deco.errors import FieldError
from deco.optimized.sampling import SampleSettings
from deco.optimized.trainer import TrainConfig
from deco.paths_inside import refuse_symlinked_output
from deco.text.captions import CaptionFolderDataset, WebDatasetCaptions, open_caption_dataset
from deco.text.demo_encoder import DemoEncoderConfig, train_demo_encoder
from deco.text.digit_pairs import GRID_PROMPTS, DigitPairsDataset, all_captions
from deco.text.embeddings import EmbeddingStore
from deco.text.encoder import Qwen3TextEncoder, TextEncoder

#: The demo's text encoder (`train_demo_encoder`'s recipe at the model's T), in the run folder.
DEMO_ENCODER_DIR = "text_encoder"
#: Prompts of the final grid on real data with an encoder (with --embeddings: the first captions).
GENERIC_PROMPTS = (
    "a photo of a cat sitting on a sofa", "a red car parked on a street at night",
    "a bowl of fruit on a wooden table", "a mountain lake at sunrise",
)

#: Defaults of the built-in text demo, chosen by short sweeps (bench/RESULTS_training.md): the
#: class demo's recipe (lr 1e-3, time shift 2) barely followed prompts after 1500 steps; lr 2e-3
#: and time shift 3 (still more training at high noise, where the layout is decided) did.
T2I_DEMO_DEFAULTS: dict[str, Any] = {
    "model": "DeCo-T2I-demo/8", "batch_size": 64, "steps": 2000, "checkpoint_every": 500,
    "resolution": 32, "accumulation": 1,
    "train": TrainConfig(lr=2e-3, ema_decay=0.995, timeshift=3.0),
    "sample": SampleSettings(steps=25, guidance=4.0, interval=(0.0, 1.0), timeshift=1.0, solver="adams"),
}
#: Defaults for real captioned data: the release's configs_t2i/pretraining_res256.yaml (AdamW 2e-4,
#: betas (0.9, 0.95), no weight decay, clipping 1.0, time shift 2, EMA 0.9999, REPA at block 6
#: when an encoder is given, 64 images per GPU x 8 GPUs, 3 accumulated micro-batches) and the
#: release's text-to-image sampler (`deco.config.RELEASE_SAMPLING["t2i"]`).
T2I_DEFAULTS: dict[str, Any] = {
    "model": "DeCo-XXL/16", "batch_size": 512 * 3, "steps": 200_000, "checkpoint_every": 10_000,
    "resolution": 256, "accumulation": 3,
    "train": TrainConfig(lr=2e-4, betas=(0.9, 0.95), weight_decay=0.0, grad_clip=1.0, ema_decay=0.9999,
                         timeshift=2.0, label_dropout=0.1, repa_layer=6),
    "sample": SampleSettings.release("t2i"),
}


class TextSource:
    """A run's text conditions: `embed(y)` maps a batch's captions (strings, or rows of a
    caption table) to (B, T, E) on `device`; `null` is the null embedding (T, E); `prompts`
    and `encode_prompts` give the final grid's condition."""

    def __init__(self, length: int, width: int, device: torch.device, *,
                 encoder: TextEncoder | None = None, store: EmbeddingStore | None = None,
                 table: Tensor | None = None, prompts: Sequence[str] = ()) -> None:
        if (encoder is None) == (store is None):
            raise ValueError("text source: give exactly one of an encoder and an embedding store")
        self.length, self.width, self.device = length, width, device
        self.encoder, self.store, self.table = encoder, store, table
        self.prompts = list(prompts)
        null = encoder.null() if encoder is not None else store.null  # type: ignore[union-attr]
        self.null = null.float().to(device)

    def embed(self, y: Tensor | Sequence[str]) -> Tensor:
        """(B, T, E) float32 on the run's device for captions y (rows when a table is set)."""
        if isinstance(y, Tensor):
            if self.table is None:
                raise TypeError("y: caption rows need a caption table")
            return self.table[y.to(self.table.device)].to(self.device)
        if self.encoder is not None:
            return self.encoder.encode(list(y)).float().to(self.device)
        assert self.store is not None
        return torch.stack([self.store.embedding_of(c) for c in y]).float().to(self.device)

    def encode_prompts(self, prompts: Sequence[str]) -> Tensor:
        """(N, T, E) for prompts: the encoder's, or the store's rows of these captions."""
        return self.embed(list(prompts)) if prompts else torch.zeros(0, self.length, self.width)


def demo_encoder_folder(out: Path, d: Dist, length: int) -> Path:
    """The demo's encoder, built deterministically: rank 0 writes it into the run folder (where
    `deco sample` finds it; a resumed run reuses it), the other ranks into a temporary folder
    (no concurrent writes)."""
    scratch = None if d.is_main else Path(tempfile.mkdtemp(prefix="deco-tiny-qwen3-"))
    # A link there (a copied run folder) would have the encoder written wherever it points.
    folder = refuse_symlinked_output(out / DEMO_ENCODER_DIR, what=f"the run folder {out}") \
        if scratch is None else scratch / "enc"
    if not (folder / "config.json").is_file():
        train_demo_encoder(folder, DemoEncoderConfig(length=length))
    return folder


def check_model_text(config: Any, length: int, width: int, what: str, flag: str) -> None:
    """A FieldError naming `flag` when the embeddings' (T, E) differ from the model's."""
    if (config.text_length, config.text_dim) != (length, width):
        raise FieldError(flag, f"{what} gives (T, E) = ({length}, {width}) embeddings, but the model "
                               f"expects text_length = {config.text_length}, text_dim = {config.text_dim}")


def open_text_source(run: Any, config: Any, out: Path, d: Dist) -> tuple[Any, TextSource]:
    """(dataset, TextSource) of a text run: the demo's, or a caption dataset's with its encoder
    or embedding store. Errors name the flag."""
    length, width = config.text_length, config.text_dim
    if run.data is None:
        if run.text_encoder is not None or run.embeddings is not None:
            raise FieldError("text_encoder" if run.embeddings is None else "embeddings",
                             "the built-in demo uses its own tiny encoder; give --data for this")
        encoder = Qwen3TextEncoder(demo_encoder_folder(out, d, length), length, width, device="cpu")
        table = torch.cat([encoder.encode(chunk) for chunk in _chunks(all_captions(), 256)]).float()
        dataset = DigitPairsDataset(seed=run.train.seed)
        source = TextSource(length, width, d.device, encoder=encoder, table=table, prompts=GRID_PROMPTS)
        return dataset, source
    if (run.text_encoder is None) == (run.embeddings is None):
        raise FieldError("text_encoder", "a captioned --data needs exactly one of --text-encoder DIR "
                                         "and --embeddings DIR")
    try:
        data = open_caption_dataset(run.data, run.resolution, rank=d.rank, world_size=d.world_size)
    except (OSError, ValueError) as exc:
        raise FieldError("data", str(exc).removeprefix("data: ")) from None
    if run.embeddings is not None:
        try:
            store = EmbeddingStore(run.embeddings)
        except (OSError, ValueError) as exc:
            raise FieldError("embeddings", str(exc).removeprefix("embeddings: ")) from None
        check_model_text(config, store.length, store.width, str(run.embeddings), "embeddings")
        firsts = [c for _, c in zip(range(len(GENERIC_PROMPTS)), data.iter_captions(), strict=False)]
        return _items(data), TextSource(length, width, d.device, store=store, prompts=firsts)
    try:
        encoder = Qwen3TextEncoder(run.text_encoder, length, width, device=d.device)
    except (OSError, ValueError) as exc:
        raise FieldError("text_encoder", str(exc).removeprefix("text_encoder: ")) from None
    return _items(data), TextSource(length, width, d.device, encoder=encoder, prompts=GENERIC_PROMPTS)


def _items(data: CaptionFolderDataset | WebDatasetCaptions) -> Any:
    return CaptionItems(data) if isinstance(data, CaptionFolderDataset) else data


def _chunks(items: Sequence[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


class ShardStream:
    """An endless stream of this rank's batches from WebDataset shards (read in order, split
    over ranks by `WebDatasetCaptions`), resumable: its state counts the batches taken, and a
    resumed stream skips that many (the shards are read in a fixed order, so this is exact)."""

    def __init__(self, dataset: WebDatasetCaptions, batch_size: int, num_workers: int = 0) -> None:
        self.dataset, self.batch_size, self.num_workers = dataset, batch_size, num_workers
        self.taken = 0

    def __iter__(self) -> Iterator[tuple[Tensor, list[str]]]:
        skip = self.taken
        while True:
            loader: DataLoader[Any] = DataLoader(self.dataset, batch_size=self.batch_size,
                                                 num_workers=self.num_workers, drop_last=True)
            empty = True
            for batch in loader:
                empty = False
                if skip:
                    skip -= 1
                    continue
                self.taken += 1
                yield batch[0], list(batch[1])
            if empty:
                raise FieldError("batch_size", f"this rank's shards hold fewer than {self.batch_size} "
                                               f"samples (one batch)")

    def state(self) -> dict[str, int]:
        return {"batches": self.taken}

    def load_state(self, state: dict[str, Any]) -> None:
        self.taken = int(state["batches"])
