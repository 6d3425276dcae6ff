"""Sharded, resumable generation of N class-conditional samples and the ADM sample-batch file.

The evaluation protocol of ADM/DiT: 50,000 samples, 50 per ImageNet class, scored by the ADM
suite from one `.npz` holding `arr_0` (N, H, W, 3) uint8 images and `arr_1` (N,) labels.

    plan = ShardPlan(count=50_000, num_classes=1000, shard_size=1000, seed=0)
    generate_shards(generate, "samples/", plan)          # every torchrun rank calls this
    if rank == 0:                                        # after a barrier
        assemble_sample_batch("samples/", "samples.npz", plan)

or `generate_sample_batch(generate, "samples/", "samples.npz", plan)`, which does both and the
barrier. `generate(labels, seed)` maps (n,) int64 labels and an int seed to (n, H, W, 3) uint8
images; it knows nothing of shards, so any sampler fits.

Choices:
- Labels are class-balanced and cyclic (label i = i mod K): every class gets count // K or one more
  (the first count % K classes), and every shard, indeed every prefix, is as balanced as it can be.
- Shard s holds labels[s·shard_size : (s+1)·shard_size] and is generated with seed `seed + s`, so
  the output depends on the plan only, not on the number of processes. Rank r of W takes shards
  r, r + W, r + 2W, ...
- A shard (`shard_00000.npz`: `images`, `labels`) is written atomically when it completes, so a
  file that exists is complete; a restarted run skips it. `plan.json` records the plan and the
  caller's `inputs` (what else decides the images: the model's hash, the sampler settings,
  the resolution; deco.plan_identity): a folder holding another plan's shards is refused
  rather than mixed, naming what changed; `restart=True` deletes them first.
- The batch file is written member by member through `numpy.lib.format` onto open zip members, so
  assembling 50k 256² images (9.8 GB) holds one shard in memory, not all of them.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch.distributed as dist
from numpy.typing import NDArray
from tqdm import tqdm

from deco.atomic import atomic_write
from deco.paths_inside import resolve_inside
from deco.plan_identity import check_plan
from deco.untrusted import UntrustedFileError, read_json, read_npz

#: generate(labels (n,) int64, seed) -> images (n, H, W, 3) uint8
Generate = Callable[[NDArray[np.int64], int], Any]

PLAN_FILE = "plan.json"


def balanced_labels(count: int, num_classes: int) -> NDArray[np.int64]:
    """`count` labels, label i = i mod num_classes: each class count // K times or once more."""
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise ValueError(f"count: expected a positive int, got {count!r}")
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes: expected a positive int, got {num_classes!r}")
    return np.arange(count, dtype=np.int64) % num_classes


@dataclass(frozen=True)
class ShardPlan:
    """What to generate: `count` samples of `num_classes` classes in shards of `shard_size`."""

    count: int
    num_classes: int
    shard_size: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        balanced_labels(self.count, self.num_classes)  # validates count and num_classes
        if not isinstance(self.shard_size, int) or isinstance(self.shard_size, bool) or self.shard_size < 1:
            raise ValueError(f"shard_size: expected a positive int, got {self.shard_size!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed: expected an int, got {self.seed!r}")

    @property
    def num_shards(self) -> int:
        return -(-self.count // self.shard_size)

    def shard_labels(self, index: int) -> NDArray[np.int64]:
        """The labels of shard `index` (the last shard may be shorter)."""
        if not 0 <= index < self.num_shards:
            raise ValueError(f"index: expected a shard in 0..{self.num_shards - 1}, got {index}")
        start = index * self.shard_size
        stop = min(start + self.shard_size, self.count)
        return np.arange(start, stop, dtype=np.int64) % self.num_classes

    def shard_seed(self, index: int) -> int:
        return self.seed + index

    def shards_of_rank(self, rank: int, world_size: int) -> list[int]:
        """Shards rank, rank + world_size, ... (round robin, so ranks finish together)."""
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank: expected 0 <= rank < world_size, got rank {rank}, "
                             f"world_size {world_size}")
        return list(range(rank, self.num_shards, world_size))


def shard_path(folder: str | Path, index: int) -> Path:
    return Path(folder) / f"shard_{index:05d}.npz"


def _distributed_rank_world() -> tuple[int, int]:
    """(rank, world size) of an initialised torch.distributed group, else (0, 1)."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch is a dependency
        return 0, 1
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _check_plan_file(folder: Path, plan: ShardPlan, inputs: dict[str, Any] | None) -> None:
    """Write plan.json, or check that the one there is this plan (PlanMismatch naming the
    changed fields otherwise)."""
    path = resolve_inside(folder, PLAN_FILE, what=f"folder: {folder}")  # a link out is refused, not read
    wanted = {**asdict(plan), **({} if inputs is None else {"inputs": inputs})}
    if path.is_file():
        try:
            found = read_json(path)
        except OSError as exc:
            raise ValueError(f"folder: unreadable {path}: {exc}") from exc
        except UntrustedFileError as exc:
            raise ValueError(f"folder: {exc}") from None
        # JSON has no tuples: compare what a reload of `wanted` would give
        check_plan(found, json.loads(json.dumps(wanted)), f"folder: {folder} holds shards of another plan")
        return
    # Every rank may get here at once; each writes the same content atomically.
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(wanted, indent=1) + "\n"))


def _check_images(images: Any, labels: NDArray[np.int64], index: int) -> NDArray[np.uint8]:
    array = np.asarray(images.detach().cpu().numpy() if hasattr(images, "detach") else images)
    n = len(labels)
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[0] != n or array.shape[3] != 3:
        raise ValueError(f"generate: expected uint8 images ({n}, H, W, 3) for shard {index}, "
                         f"got {array.dtype} {array.shape}")
    return np.ascontiguousarray(array)


def _write_shard(path: Path, images: NDArray[np.uint8], labels: NDArray[np.int64]) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a name
            np.savez(f, images=images, labels=labels)

    atomic_write(path, write)


def read_shard(path: str | Path) -> tuple[NDArray[np.uint8], NDArray[np.int64]]:
    """(images (n, H, W, 3) uint8, labels (n,) int64) of one shard file."""
    try:
        arrays = read_npz(path, ("images", "labels"))  # headers checked before allocating
    except OSError as exc:
        raise ValueError(f"shard: cannot read {path}: {exc}") from exc
    except UntrustedFileError as exc:
        raise ValueError(f"shard: {exc}") from None
    images, labels = arrays["images"], arrays["labels"]
    if (images.dtype != np.uint8 or images.ndim != 4 or labels.dtype != np.int64
            or labels.shape != images.shape[:1]):
        raise ValueError(f"shard: {path} holds {images.dtype} images {images.shape} and {labels.dtype} "
                         f"labels {labels.shape}; expected uint8 (n, H, W, 3) and int64 (n,)")
    return images, labels


def clear_shards(folder: str | Path) -> None:
    """Delete the shards, plan and torn temporaries of `folder` (and nothing else)."""
    folder = Path(folder)
    for pattern in ("shard_*.npz", PLAN_FILE, ".shard_*.tmp", f".{PLAN_FILE}.*.tmp"):
        for path in folder.glob(pattern):
            path.unlink(missing_ok=True)


def generate_shards(generate: Generate, folder: str | Path, plan: ShardPlan, *,
                    rank: int | None = None, world_size: int | None = None,
                    progress: bool = True, inputs: dict[str, Any] | None = None,
                    restart: bool = False) -> list[int]:
    """Generate this rank's missing shards into `folder`; return the indices it generated.

    rank/world_size default to torch.distributed's when a process group is initialised, else
    0 and 1. Shards already on disk are skipped (resume after a crash or pre-emption) when
    plan.json records this plan and these `inputs` (JSON: the model's hash, settings, ...);
    otherwise a PlanMismatch, unless `restart`, which first deletes the earlier shards."""
    if not callable(generate):
        raise TypeError("generate: expected a callable (labels, seed) -> images, "
                        f"got {type(generate).__name__}")
    if not isinstance(plan, ShardPlan):
        raise TypeError(f"plan: expected a ShardPlan, got {type(plan).__name__}")
    if (rank is None) != (world_size is None):
        raise ValueError(f"rank: give both rank and world_size or neither, got rank={rank}, "
                         f"world_size={world_size}")
    if rank is None or world_size is None:
        rank, world_size = _distributed_rank_world()
    folder = Path(folder)
    if restart and rank == 0:
        clear_shards(folder)
    if restart and _distributed_rank_world()[1] > 1:
        dist.barrier()  # no rank checks the plan before rank 0 has cleared the folder
    folder.mkdir(parents=True, exist_ok=True)
    _check_plan_file(folder, plan, inputs)
    mine = plan.shards_of_rank(rank, world_size)
    todo = [i for i in mine if not shard_path(folder, i).is_file()]

    done: list[int] = []
    with tqdm(total=len(mine), initial=len(mine) - len(todo), unit="shard",
              desc=f"sampling (rank {rank})", disable=not progress or rank != 0) as bar:
        for index in todo:
            labels = plan.shard_labels(index)
            images = _check_images(generate(labels.copy(), plan.shard_seed(index)), labels, index)
            _write_shard(shard_path(folder, index), images, labels)
            done.append(index)
            bar.update(1)
    return done


def _write_npy_member(archive: zipfile.ZipFile, name: str, dtype: np.dtype[Any],
                      shape: tuple[int, ...], chunks: Callable[[], Any]) -> None:
    """Stream one .npy member: the header, then each chunk's bytes (C order)."""
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    member: IO[bytes]
    with archive.open(name, "w", force_zip64=True) as member:
        # format 1.0: the oldest, read by every numpy and by ADM's own streaming reader
        np.lib.format.write_array_header_1_0(member, header)
        for chunk in chunks():
            member.write(np.ascontiguousarray(chunk, dtype=dtype).tobytes())


def assemble_sample_batch(folder: str | Path, out: str | Path, plan: ShardPlan) -> Path:
    """Write the ADM sample batch `out` (.npz: arr_0 images, arr_1 labels) from the shards.

    Every shard must be there and agree with the plan; one shard at a time is in memory."""
    folder, out = Path(folder), Path(out)
    paths = [shard_path(folder, i) for i in range(plan.num_shards)]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"folder: {len(missing)} of {len(paths)} shards missing in {folder} "
                                f"(first: {missing[0]}); run the generation again to finish them")
    labels = []
    size: tuple[int, int] | None = None
    for index, path in enumerate(paths):  # check everything before writing anything
        # A shard is copied into `out`: one that links out of the folder is refused, not read.
        resolve_inside(folder, path.name, what=f"folder: {folder}")
        images, shard_labels = read_shard(path)
        expected = plan.shard_labels(index)
        if not np.array_equal(shard_labels, expected) or images.shape[0] != len(expected):
            raise ValueError(f"shard: {path} does not hold the plan's labels for shard {index}")
        if size is None:
            size = (int(images.shape[1]), int(images.shape[2]))
        elif images.shape[1:3] != size:
            raise ValueError(f"shard: {path} has images of size {images.shape[1:3]}, the first had {size}")
        labels.append(shard_labels)
    assert size is not None

    def images_in_order() -> Any:
        for path in paths:
            yield read_shard(path)[0]

    def write(tmp: str) -> None:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            _write_npy_member(archive, "arr_0.npy", np.dtype(np.uint8), (plan.count, *size, 3),
                              images_in_order)
            _write_npy_member(archive, "arr_1.npy", np.dtype(np.int64), (plan.count,), lambda: labels)

    atomic_write(out, write)
    return out


def generate_sample_batch(generate: Generate, folder: str | Path, out: str | Path, plan: ShardPlan, *,
                          progress: bool = True, inputs: dict[str, Any] | None = None,
                          restart: bool = False) -> Path | None:
    """generate_shards on every rank, a barrier, then rank 0 assembles `out` (returned there;
    None on the other ranks)."""
    generate_shards(generate, folder, plan, progress=progress, inputs=inputs, restart=restart)
    rank, world_size = _distributed_rank_world()
    if world_size > 1:
        dist.barrier()
    if rank != 0:
        return None
    return assemble_sample_batch(folder, out, plan)


def shard_indices(folder: str | Path) -> Sequence[int]:
    """Indices of the shard files present in `folder` (sorted)."""
    return sorted(int(p.stem.split("_")[1]) for p in Path(folder).glob("shard_*.npz"))
