"""`deco embed-text`: precompute the text embeddings of a caption dataset."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from deco.cli.common import default_of
from deco.text.embeddings import embed_captions


def register(sub: Any) -> None:
    p = sub.add_parser(
        "embed-text",
        help="encode the captions of a dataset once, into safetensors shards",
        description="Run a local Qwen3 text encoder (a Hugging Face folder, e.g. a downloaded "
        "Qwen3-1.7B; nothing is downloaded) over the captions of DATASET and write the (T, E) "
        "embeddings to OUT as safetensors shards with an index.json, in dataset order, plus the "
        "null embedding of the empty prompt. DATASET is a folder of images with a caption file "
        "beside each (x.jpg + x.txt) or WebDataset .tar shards of jpg/txt pairs. Rerunning "
        "resumes: finished shards are kept; a different encoder, T, E, dtype or caption list is "
        "an error (--restart starts over).",
    )
    p.add_argument("dataset", type=Path, help="caption folder, or a .tar shard / folder of shards")
    p.add_argument("out", type=Path, help="output folder (created; resumed when it exists)")
    p.add_argument("--text-encoder", type=Path, required=True, metavar="DIR",
                   help="local Hugging Face folder of a Qwen3 model (config.json, *.safetensors, tokenizer)")
    p.add_argument("--length", type=int, required=True, metavar="T",
                   help="tokens per caption (the model's text_length; 128 for the release)")
    p.add_argument("--width", type=int, required=True, metavar="E",
                   help="features per token (the model's text_dim; 2048 for the release)")
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"],
                   default=default_of(embed_captions, "dtype"),
                   help="storage dtype (default: %(default)s, what the release feeds its model)")
    p.add_argument("--batch-size", type=int, default=default_of(embed_captions, "batch_size"),
                   help="captions per encoder call (default: %(default)s)")
    p.add_argument("--shard-size", type=int, default=default_of(embed_captions, "shard_size"),
                   help="captions per shard file (default: %(default)s)")
    p.add_argument("--device", default=None,
                   help="torch device of the encoder (default: cuda when available, else cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--restart", action="store_true",
                   help="delete the embeddings of an earlier run in OUT (another encoder, settings or "
                   "captions) and start over, instead of refusing them")
    p.set_defaults(handler=embed_text)


def embed_text(args: argparse.Namespace) -> int:
    from deco.text.captions import open_caption_dataset
    from deco.text.encoder import Qwen3TextEncoder, check_encoder_folder, parse_device, require_text_packages

    for name in ("length", "width", "batch_size", "shard_size"):
        value = getattr(args, name)
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')}: expected a positive int, got {value}")
    require_text_packages()  # fail fast, before a long pass over the captions (deco.cli.main names the extra)
    check_encoder_folder(args.text_encoder)
    device = parse_device(args.device)
    # The resolution is irrelevant here: only the captions are read, never an image.
    dataset = open_caption_dataset(args.dataset, resolution=1)
    captions = list(dataset.iter_captions())
    encoder = Qwen3TextEncoder(args.text_encoder, args.length, args.width, device=device)
    index = embed_captions(captions, encoder, args.out, dtype=args.dtype, shard_size=args.shard_size,
                           batch_size=args.batch_size, progress=not args.no_progress,
                           restart=args.restart)
    print(f"wrote {index['count']} embeddings ({args.length} x {args.width}, {args.dtype}) in "
          f"{len(index['shards'])} shards to {args.out}")
    return 0
