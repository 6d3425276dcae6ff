"""Fuzzing every reader of an outside file (issue 28): hypothesis mutates a valid input of each
reader (tests/fuzz_targets.py: deco's own writers made it) and checks the readers' contract: a
valid result or a one-line error of a type `deco` reports with exit status 2, Python memory
under 40x the input plus 16 MiB, and nothing written outside the example's folder.

The mutations are those that broke the readers before issue 28: numbers replaced by huge,
negative or non-finite ones (shapes, offsets, header lengths, config fields), brackets repeated
(nesting), bytes flipped, cut or spliced. CI runs 20 examples per target (about 30 s in all on
2 cores); `nox -s fuzz` sets DECO_FUZZ_EXAMPLES for a long run, and runs the atheris targets
(tests/fuzz/atheris_readers.py). Inputs that once broke a reader are kept in tests/fuzz_corpus/
and replayed here first (`test_corpus`)."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from fuzz_targets import TARGETS, run_target, seeds
from helpers import fixtures_folder
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

pytest.importorskip("webdataset")  # the tar-shard target's reader (the text extra)

#: Examples per target: a few in CI, many in `nox -s fuzz`.
EXAMPLES = int(os.environ.get("DECO_FUZZ_EXAMPLES", "20"))
CORPUS = Path(__file__).parent / "fuzz_corpus"
#: What a mutation may put in place of a number or a token: the values that broke readers.
HOSTILE = [b"1e400", b"-1", b"NaN", b"Infinity", b"18446744073709551615", b"1000000000",
           b"4294967296", b"0", b"[" * 5000, b'{"a":' * 3000, b"null", b"true", b'""', b"\xff\xfe"]
NUMBER = re.compile(rb"\d+(?:\.\d+)?(?:e[+-]?\d+)?")


@pytest.fixture(scope="module")
def seed_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    return seeds(tmp_path_factory.mktemp("seeds"))


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A fresh empty folder per example (hypothesis reuses a test's fixtures across examples)."""
    folder = Path(tempfile.mkdtemp(prefix="deco-fuzz-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@st.composite
def mutated(draw: st.DrawFn, seed: bytes) -> bytes:
    """`seed` after one to four mutations."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["number", "token", "flip", "cut", "splice", "repeat"]))
        numbers = list(NUMBER.finditer(bytes(data[:4096])))  # the header's numbers come first
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "number" and numbers:
            match = draw(st.sampled_from(numbers))
            value = draw(st.sampled_from(HOSTILE[:9]) | st.integers(-(2**70), 2**70).map(_text))
            data[match.start():match.end()] = value
        elif kind == "token":
            data[at:at] = draw(st.sampled_from(HOSTILE))
        elif kind == "flip" and data:
            data[at] = draw(st.integers(0, 255))
        elif kind == "cut":
            data = data[:at] if draw(st.booleans()) else data[:at] + data[at + draw(st.integers(1, 64)):]
        elif kind == "splice":
            data[at:at] = draw(st.binary(max_size=32))
        elif kind == "repeat":
            end = min(at + draw(st.integers(1, 16)), len(data))
            data[at:at] = bytes(data[at:end]) * draw(st.integers(2, 64))
    return bytes(data)


def _text(number: int) -> bytes:
    return str(number).encode()


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_reader_contract(name: str, seed_files: dict[str, bytes], scratch: Path) -> None:
    """Each reader on mutations of its valid input, and on random bytes."""
    if name != "release_ckpt" or (fixtures_folder() / "A.ckpt").is_file():
        assert run_target(name, seed_files[name], scratch) == "ok", "the seed itself must be valid"

    long_run = "DECO_FUZZ_EXAMPLES" in os.environ  # CI: the same examples on every run
    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=not long_run,
              suppress_health_check=list(HealthCheck))
    @given(data=mutated(seed_files[name]) | st.binary(max_size=512))
    def check(data: bytes) -> None:
        for stale in scratch.iterdir():
            stale.unlink() if stale.is_file() else shutil.rmtree(stale)
        run_target(name, data, scratch)

    for case in explicit_cases(seed_files[name]):  # every run: the mutations that broke readers
        check = example(data=case)(check)
    check()


def explicit_cases(seed: bytes) -> list[bytes]:
    """The seed nested 5000 deep at its first bracket, its first numbers replaced by 1e400, -1 and
    2**64, and cut in half: each broke a reader before issue 28."""
    at = min((i for i in (seed.find(b"{"), seed.find(b"[")) if i >= 0), default=0)
    cases = [seed[:at] + b"[" * 5000 + seed[at:], seed[: len(seed) // 2]]
    first = NUMBER.search(seed, at)
    for value in (b"1e400", b"-1", b"18446744073709551616"):
        if first:
            cases.append(seed[: first.start()] + value + seed[first.end():])
    return cases


def corpus_cases() -> list[tuple[str, Path]]:
    return [(p.parent.name, p) for p in sorted(CORPUS.glob("*/*")) if p.is_file()]


@pytest.mark.parametrize(("name", "path"), corpus_cases(), ids=lambda v: v.name if isinstance(v, Path) else v)
def test_corpus(name: str, path: Path, scratch: Path) -> None:
    """Inputs that broke a reader before issue 28 (a traceback, or gigabytes allocated), kept:
    each must now give a one-line error within the memory bound."""
    assert run_target(name, path.read_bytes(), scratch) != "ok"
