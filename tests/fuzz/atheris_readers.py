"""Coverage-guided fuzzing of deco's readers of outside files with atheris (libFuzzer), run by
`nox -s fuzz` (issue 28). The targets and their contract are tests/fuzz_targets.py's: a valid
result or a one-line error, bounded memory, nothing written outside the scratch folder; a
violation is an uncaught AssertionError, which atheris reports and saves as `crash-*`.

    python tests/fuzz/atheris_readers.py TARGET [libFuzzer options, e.g. -max_total_time=60]

TARGET is one of fuzz_targets.TARGETS. The seed corpus (valid inputs from deco's own writers)
is written to a temporary folder first and passed to libFuzzer, so mutations start from files
that get past the first checks; keep a crashing input as tests/fuzz_corpus/TARGET/NAME."""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/: fuzz_targets, helpers

with atheris.instrument_imports(include=["deco"]):
    import deco.checkpoint
    import deco.untrusted  # noqa: F401

from fuzz_targets import TARGETS, run_target, seeds


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: atheris_readers.py TARGET [libFuzzer options]; TARGET one of {sorted(TARGETS)}")
    name, options = sys.argv[1], sys.argv[2:]
    work = Path(tempfile.mkdtemp(prefix="deco-atheris-"))
    corpus, scratch = work / "corpus", work / "scratch"
    corpus.mkdir()
    scratch.mkdir()
    (corpus / "seed").write_bytes(seeds(work)[name])
    for kept in sorted((Path(__file__).parent.parent / "fuzz_corpus" / name).glob("*")):
        shutil.copy(kept, corpus / kept.name)

    def one(data: bytes) -> None:
        for stale in scratch.iterdir():
            stale.unlink() if stale.is_file() else shutil.rmtree(stale)
        run_target(name, data, scratch)

    atheris.Setup([sys.argv[0], *options, str(corpus)], one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
