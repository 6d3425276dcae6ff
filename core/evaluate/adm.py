"""FID, sFID, Inception Score, precision and recall, as the ADM evaluation suite computes them.

    inception = load_inception("weights-inception-2015-12-05-6726825d.pth", device)
    result = evaluate_sample_batches("samples.npz", "VIRTUAL_imagenet256_labeled.npz", inception)

Inputs are ADM's sample batches: `.npz` files with `arr_0`, (N, H, W, 3) uint8 images; a reference
batch may also hold precomputed statistics `mu`/`sigma` (pool features) and `mu_s`/`sigma_s`
(spatial features), which are then used instead of its images' (as ADM does).

The network and the numbers:
- Inception-v3 is torch-fidelity's `FeatureExtractorInceptionV3`: a PyTorch port of the very
  TensorFlow graph ADM's evaluator runs (`classify_image_graph_def.pb`, "inception-2015-12-05"),
  with its weights (`weights-inception-2015-12-05-6726825d.pth`, given as a local file: nothing is
  downloaded) and its preprocessing: uint8 RGB at any size -> bilinear resize to 299×299 written to
  match TensorFlow 1's `resize_bilinear` (align_corners=False, no antialias) -> (x - 128) / 128.
- FID: Fréchet distance of Gaussians fitted (mean, unbiased covariance) to the 2048-d `pool_3`
  features. sFID: the same on the first 7 channels of `mixed_6/conv` (the 1×1 branch of
  Mixed_6d after its ReLU, 17×17×7 = 2023 values per image; we flatten channel-major where ADM
  flattens NHWC, a permutation of coordinates that leaves the distance unchanged).
- IS: softmax of the 1008-way logits *without* the final bias (ADM's `softmax/logits/MatMul`),
  exp(mean KL(p(y|x) || p(y))) per split of 5000 consecutive samples, averaged over splits.
- Precision/recall: Kynkäänniemi et al. 2019 with k = 3: each point's manifold radius is the
  distance to its 3rd nearest neighbour in its own set (itself excluded); precision is the
  fraction of samples inside some reference ball, recall the fraction of references inside some
  sample ball (distances ≤ radius). ADM uses its 10k reference images for this.

How this differs from ADM's TensorFlow evaluator: the convolutions run in PyTorch (float32; on a
GPU with TF32 off) rather than TensorFlow, so features agree to float32 round-off, not bit for bit
(torch-fidelity reports FIDs equal to TensorFlow's to about 1e-3 relative); pairwise distances
for precision/recall are float64 here where ADM uses float16 (float32 where float16 overflows),
which can move a point across a ball's boundary; and ADM's precomputed reference statistics come
from TensorFlow, so mixing them with our sample statistics adds that round-off difference too
(`ignore_reference_stats` recomputes them from the reference images instead).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import io
import sys
import zipfile
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor, nn

from deco.errors import first_line
from deco.evaluate.frechet import frechet_distance, gaussian_stats
from deco.extras import install_command
from deco.safe_load import load_weights_only
from deco.untrusted import read_npz

Array = NDArray[np.float64]

#: ADM: first 7 channels of mixed_6/conv; 5000-sample IS splits; k = 3 neighbourhoods.
SPATIAL_CHANNELS = 7
IS_SPLIT_SIZE = 5000
PR_NEIGHBOURS = 3
#: torch-fidelity's weights-inception-2015-12-05-6726825d.pth (the TensorFlow graph's weights).
STANDARD_WEIGHTS_SHA256_PREFIX = "6726825d"


# ------------------------------------------------------------------------- Inception
def _fidelity_inception_class() -> Any:
    """torch-fidelity's FeatureExtractorInceptionV3.

    torch-fidelity's package __init__ imports its CLIP and VGG extractors, which need torchvision;
    the Inception module itself needs only torch. Where torchvision is missing or broken (e.g. a
    CUDA build next to a CPU torch), the Inception module is imported on its own, under a bare
    package object that is removed again afterwards."""
    name = "torch_fidelity.feature_extractor_inceptionv3"
    try:
        return importlib.import_module(name).FeatureExtractorInceptionV3
    except (ImportError, RuntimeError, OSError) as exc:
        spec = importlib.util.find_spec("torch_fidelity")
        if spec is None:
            raise ImportError(f"deco fid needs torch-fidelity: {install_command('metrics')}",
                              name="torch_fidelity") from exc
        error = exc
    if name in sys.modules:  # imported fine before the package __init__ failed
        return sys.modules[name].FeatureExtractorInceptionV3
    package = importlib.util.module_from_spec(spec)
    sys.modules["torch_fidelity"] = package
    try:
        return importlib.import_module(name).FeatureExtractorInceptionV3
    except ImportError:
        raise ImportError(f"torch-fidelity's Inception cannot be imported: {error}") from error
    finally:
        if sys.modules.get("torch_fidelity") is package:
            del sys.modules["torch_fidelity"]


@dataclass
class InceptionFeatures:
    """Per-image features: pool (N, 2048), spatial (N, 2023), logits (N, 1008), float64."""

    pool: Array
    spatial: Array
    logits: Array


class Inception(nn.Module):
    """torch-fidelity's Inception-v3 returning ADM's three feature sets for uint8 images."""

    def __init__(self, extractor: nn.Module, sha256: str = "") -> None:
        super().__init__()
        self.extractor = extractor
        self.sha256 = sha256  # of the weights file
        self._spatial: list[Tensor] = []
        # mixed_6/conv of the TensorFlow graph = Mixed_6d.branch1x1 (conv, batch norm, ReLU).
        branch = extractor.get_submodule("Mixed_6d.branch1x1")
        branch.register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module: nn.Module, args: Any, output: Tensor) -> None:
        self._spatial.append(output[:, :SPATIAL_CHANNELS].flatten(1).float())  # (B, 7·17·17)

    @torch.no_grad()
    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """uint8 (B, 3, H, W) -> pool (B, 2048), spatial (B, 2023), unbiased logits (B, 1008)."""
        self._spatial.clear()
        pool, logits = self.extractor(images)
        spatial = self._spatial.pop()
        return pool, spatial, logits


def load_inception(weights: str | Path, device: str | torch.device = "cpu") -> Inception:
    """Inception-v3 from a local torch-fidelity weights file (weights-inception-2015-12-05-6726825d.pth).

    The file is read once with weights_only=True (a plain state dict of tensors, nothing else is
    unpickled); torch-fidelity then builds the network from those same bytes. Its SHA-256 is kept
    (`Inception.sha256`): published FIDs need the standard file, whose SHA-256 begins with
    STANDARD_WEIGHTS_SHA256_PREFIX (the hash suffix of its name, torch.hub's convention)."""
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"inception_weights: no such file: {path}")
    data = path.read_bytes()

    try:
        state = load_weights_only(data, name=str(path))
    except ValueError as exc:
        raise ValueError(f"inception_weights: {exc}") from None
    if not isinstance(state, dict) or "Mixed_6d.branch1x1.conv.weight" not in state:
        raise ValueError(f"inception_weights: {path} is not torch-fidelity's Inception-v3 state dict")
    cls = _fidelity_inception_class()
    try:
        extractor = cls("inception-v3-compat", ["2048", "logits_unbiased"],
                        feature_extractor_weights_path=io.BytesIO(data))
    except RuntimeError as exc:  # load_state_dict: missing keys or wrong shapes
        raise ValueError(f"inception_weights: {path} does not fit Inception-v3: {first_line(exc)}") from exc
    inception = Inception(extractor, hashlib.sha256(data).hexdigest())
    return inception.to(torch.device(device))


def inception_features(inception: Inception, batches: Iterator[NDArray[np.uint8]],
                       device: str | torch.device = "cpu") -> InceptionFeatures:
    """Features of NHWC uint8 batches (ADM's layout)."""
    pools, spatials, logits = [], [], []
    for batch in batches:
        x = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).to(device)  # (B, 3, H, W)
        pool, spatial, logit = inception(x)
        pools.append(pool.double().cpu().numpy())
        spatials.append(spatial.double().cpu().numpy())
        logits.append(logit.double().cpu().numpy())
    if not pools:
        raise ValueError("images: expected at least one image, got none")
    return InceptionFeatures(np.concatenate(pools), np.concatenate(spatials), np.concatenate(logits))


# ------------------------------------------------------------------------- scores
def inception_score(logits: Any, split_size: int = IS_SPLIT_SIZE) -> float:
    """exp(E_x KL(p(y|x) || p(y))) per split of `split_size` consecutive rows, averaged (ADM)."""
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2 or z.shape[0] < 1:
        raise ValueError(f"logits: expected an (N >= 1, classes) array, got shape {z.shape}")
    z = z - z.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))  # log softmax, stable
    scores = []
    for start in range(0, len(log_p), split_size):
        part = log_p[start:start + split_size]
        log_marginal = np.log(np.exp(part).mean(axis=0, keepdims=True))
        kl = (np.exp(part) * (part - log_marginal)).sum(axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores))


def _squared_distances(a: Array, b: Array) -> Array:
    """(len(a), len(b)) squared Euclidean distances, |a|² - 2ab + |b|², clipped at 0."""
    d: Array = (a * a).sum(1)[:, None] - 2.0 * (a @ b.T) + (b * b).sum(1)[None, :]
    return np.maximum(d, 0.0)


def manifold_radii(features: Any, k: int = PR_NEIGHBOURS, block: int = 1024) -> Array:
    """Squared distance of each row to its k-th nearest other row (index k of the sorted row,
    whose index 0 is the point itself)."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] <= k:
        raise ValueError(f"features: expected (N > {k}, D) features for k = {k}, got shape {f.shape}")
    radii = np.empty(len(f))
    for start in range(0, len(f), block):
        d = _squared_distances(f[start:start + block], f)
        radii[start:start + block] = np.partition(d, k, axis=1)[:, k]
    return radii


def _inside(points: Array, centres: Array, radii: Array, block: int) -> NDArray[np.bool_]:
    """For each point: within radius of at least one centre (distance² ≤ radius²)."""
    out = np.zeros(len(points), dtype=bool)
    for start in range(0, len(points), block):
        d = _squared_distances(points[start:start + block], centres)
        out[start:start + block] = (d <= radii[None, :]).any(axis=1)
    return out


def precision_recall(reference: Any, samples: Any, k: int = PR_NEIGHBOURS,
                     block: int = 1024) -> tuple[float, float]:
    """(precision, recall) of samples against reference features (Kynkäänniemi et al., k-NN)."""
    ref = np.asarray(reference, dtype=np.float64)
    gen = np.asarray(samples, dtype=np.float64)
    if ref.ndim != 2 or gen.ndim != 2 or ref.shape[1] != gen.shape[1]:
        raise ValueError(f"samples: expected (N, D) features like reference {ref.shape}, got {gen.shape}")
    ref_radii = manifold_radii(ref, k, block)
    gen_radii = manifold_radii(gen, k, block)
    precision = float(_inside(gen, ref, ref_radii, block).mean())
    recall = float(_inside(ref, gen, gen_radii, block).mean())
    return precision, recall


# ------------------------------------------------------------------------- ADM batches
def _open_npy_member(stack: ExitStack, path: Path,
                     name: str) -> tuple[IO[bytes], tuple[int, ...], np.dtype[Any]]:
    """Open `name`.npy inside the .npz `path` for streaming: (file, shape, dtype)."""
    try:
        archive = stack.enter_context(zipfile.ZipFile(path))
        member = stack.enter_context(archive.open(f"{name}.npy"))
        version = np.lib.format.read_magic(member)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(member)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(member)
        else:
            raise ValueError(f"unsupported .npy format version {version}")
    except KeyError as exc:
        raise ValueError(f"{path}: no array {name!r} in this .npz") from exc
    except (OSError, ValueError, zipfile.BadZipFile, NotImplementedError) as exc:
        raise ValueError(f"{path}: not a readable .npz: {exc}") from exc
    if fortran:
        raise ValueError(f"{path}: {name} is stored in Fortran order; expected C order")
    return member, tuple(shape), np.dtype(dtype)


def npz_keys(path: str | Path) -> list[str]:
    """Array names in an .npz file (without reading them)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return [n[:-4] for n in archive.namelist() if n.endswith(".npy")]
    except (OSError, zipfile.BadZipFile, NotImplementedError) as exc:
        raise ValueError(f"{path}: not a readable .npz: {exc}") from exc


def image_batches(path: str | Path, batch_size: int) -> tuple[int, Iterator[NDArray[np.uint8]]]:
    """(N, iterator over (≤ batch_size, H, W, 3) uint8 batches of `arr_0`), read incrementally."""
    path = Path(path)
    with ExitStack() as probe:
        _, shape, dtype = _open_npy_member(probe, path, "arr_0")
    if dtype != np.uint8 or len(shape) != 4 or shape[3] != 3:
        raise ValueError(f"{path}: arr_0 must be uint8 images (N, H, W, 3), got {dtype} {shape}")

    def batches() -> Iterator[NDArray[np.uint8]]:
        with ExitStack() as stack:
            member, _, _ = _open_npy_member(stack, path, "arr_0")
            per_image = int(np.prod(shape[1:]))
            for start in range(0, shape[0], batch_size):
                n = min(batch_size, shape[0] - start)
                data = member.read(n * per_image)
                if len(data) != n * per_image:
                    raise ValueError(f"{path}: arr_0 is truncated")
                # bytearray: a writable buffer, which torch.from_numpy wants
                yield np.frombuffer(bytearray(data), np.uint8).reshape(n, *shape[1:])

    return shape[0], batches()


@dataclass
class Metrics:
    """The ADM suite's five numbers (precision/recall None without reference images)."""

    inception_score: float
    fid: float
    sfid: float
    precision: float | None
    recall: float | None
    num_samples: int
    num_reference: int | None
    reference_stats: str  # "precomputed" or "computed"
    inception_sha256: str  # of the weights file: comparable to published numbers if standard

    @property
    def standard_inception(self) -> bool:
        return self.inception_sha256.startswith(STANDARD_WEIGHTS_SHA256_PREFIX)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _stored_stats(path: Path) -> dict[str, Array] | None:
    keys = set(npz_keys(path))
    if "mu" not in keys:
        return None
    needed = {"mu", "sigma", "mu_s", "sigma_s"}
    if not needed <= keys:
        raise ValueError(f"{path}: has 'mu' but not all of {sorted(needed)}")
    arrays = read_npz(path, tuple(sorted(needed)))  # headers checked before allocating
    return {k: np.asarray(v, dtype=np.float64) for k, v in arrays.items()}


def evaluate_sample_batches(samples: str | Path, reference: str | Path, inception: Inception, *,
                            batch_size: int = 100, device: str | torch.device = "cpu",
                            ignore_reference_stats: bool = False) -> Metrics:
    """The ADM evaluation of a sample batch against a reference batch (see the module docstring)."""
    samples, reference = Path(samples), Path(reference)
    for name, path in (("samples", samples), ("reference", reference)):
        if not path.is_file():
            raise FileNotFoundError(f"{name}: no such file: {path}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    # Check both files before the (long) feature extraction.
    n_gen, gen_batches = image_batches(samples, batch_size)
    if n_gen < 2:
        raise ValueError(f"samples: expected at least 2 images in {samples}, got {n_gen}")
    stats = None if ignore_reference_stats else _stored_stats(reference)
    stats_source = "computed" if stats is None else "precomputed"
    has_images = "arr_0" in npz_keys(reference)
    if not has_images and stats is None:
        wanted = "images (arr_0), as --ignore-reference-stats asks" if ignore_reference_stats else \
            "images (arr_0) or statistics (mu, sigma, mu_s, sigma_s)"
        raise ValueError(f"reference: {reference} has no {wanted}")
    n_ref: int | None = None
    ref_batches: Iterator[NDArray[np.uint8]] | None = None
    if has_images:
        n_ref, ref_batches = image_batches(reference, batch_size)

    gen = inception_features(inception, gen_batches, device)
    ref = None if ref_batches is None else inception_features(inception, ref_batches, device)
    if stats is None:
        assert ref is not None
        mu, sigma = gaussian_stats(ref.pool)
        mu_s, sigma_s = gaussian_stats(ref.spatial)
        stats = {"mu": mu, "sigma": sigma, "mu_s": mu_s, "sigma_s": sigma_s}

    fid = frechet_distance(*gaussian_stats(gen.pool), stats["mu"], stats["sigma"])
    sfid = frechet_distance(*gaussian_stats(gen.spatial), stats["mu_s"], stats["sigma_s"])
    precision = recall = None
    if ref is not None:
        precision, recall = precision_recall(ref.pool, gen.pool)
    return Metrics(
        inception_score=inception_score(gen.logits), fid=fid, sfid=sfid, precision=precision,
        recall=recall, num_samples=n_gen, num_reference=n_ref,
        reference_stats=stats_source, inception_sha256=inception.sha256,
    )
