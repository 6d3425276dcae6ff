"""nox sessions: tests, typecheck, lint, bench, vectors, train (the README's main job).

Every session installs torch first, pinned by $DECO_TORCH (default `torch==2.13.0`): on a CPU
machine that pin resolves to the local CPU wheel, whereas an unpinned `torch` requirement would
download a multi-GB CUDA build. On a GPU machine set DECO_TORCH to the build you want.
"""

from __future__ import annotations

import os

import nox

nox.options.sessions = ["lint", "typecheck", "tests"]
nox.options.reuse_existing_virtualenvs = True

TORCH = os.environ.get("DECO_TORCH", "torch==2.13.0")
PYTHON = os.environ.get("DECO_PYTHON", None)
#: The ruff of `nox -s lint`, pinned so that CI and the pre-commit hook (.pre-commit-config.yaml,
#: the same version; tests/test_repo_habits.py checks it) report the same findings.
RUFF = "ruff==0.17.6"


def install(session: nox.Session, extras: str) -> None:
    session.install(TORCH)
    # Non-editable on purpose: the tests exercise what `pip install .` ships.
    session.install(f".[{extras}]")


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """The test-suite (pytest + hypothesis), against the installed package."""
    install(session, "test,onnx,text,repa,diffusers,deploy")
    # deco fid's Inception without torchvision (see the `metrics` extra in pyproject.toml)
    session.install("--no-deps", "torch-fidelity==0.4.0")
    # bench/ runs once as a smoke test (tiny sizes, no timing): every benchmark's code path works.
    default = ["tests", "bench", "--benchmark-disable"]
    session.run("pytest", "-p", "no:cacheprovider", *(session.posargs or default))


@nox.session(python=PYTHON)
def typecheck(session: nox.Session) -> None:
    """mypy --strict over deco, deco.reference and deco.optimized (the installed package)."""
    install(session, "test,onnx,text,repa")
    session.install("mypy>=1.10")
    config = os.path.abspath("pyproject.toml")
    # Check the installed package (the folders are mapped onto `deco.*` only at install time), from
    # outside the checkout so that nothing there is mistaken for a top-level module.
    session.chdir(session.create_tmp())
    session.run("mypy", "--strict", "-p", "deco", "--config-file", config)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff over the whole tree."""
    session.install(RUFF)
    session.run("ruff", "check", ".")


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """pytest-benchmark sessions in bench/, saved under .benchmarks/ (see bench/README.md).

    `-- --compare` compares with the latest saved run (any other arguments go to pytest);
    set DECO_RELEASE_SRC to the release's folder to benchmark it side by side."""
    install(session, "test,onnx")
    args = ["--benchmark-compare" if a == "--compare" else a for a in session.posargs]
    session.run("pytest", "-p", "no:cacheprovider", "bench", "--benchmark-only",
                "--benchmark-autosave", *args)


@nox.session(python=PYTHON)
def vectors(session: nox.Session) -> None:
    """Regenerate the conformance vectors in spec/vectors from the reference, and the kit's
    audit over them (spec/vectors/AUDIT.md; fails when a catalogued variant goes uncaught)."""
    install(session, "test")
    session.run("deco", "conformance", "--write", "spec/vectors", "--force")
    session.run("deco", "conformance", "--audit", "spec/vectors/AUDIT.md")


@nox.session(python=PYTHON)
def train(session: nox.Session) -> None:
    """The main job: `deco train` with the session's arguments (none: the built-in digits run,
    CPU, under 10 minutes; then `deco evaluate runs/<timestamp>` scores its samples)."""
    install(session, "test")
    session.run("deco", "train", *session.posargs)


@nox.session(python=False)
def gpu(session: nox.Session) -> None:
    """The one-command GPU check (bench/gpu_check.py) on the machine's own Python and CUDA torch.

    Nothing is installed: a GPU machine's torch is its own CUDA build, which a fresh virtual
    environment would replace, and the script runs from the checkout. $DECO_GPU_PYTHON chooses
    the interpreter (default `python3`); `-- --dry-run` runs the code paths on the CPU; results go
    to gpu-check/ unless `-- --out DIR`."""
    args = list(session.posargs)
    if "--out" not in args:
        args = ["--out", "gpu-check", *args]
    python = os.environ.get("DECO_GPU_PYTHON", "python3")
    session.run(python, "bench/gpu_check.py", *args, external=True)


# ---------------------------------------------------------------------- fuzzing (issue 28)
#: Seconds of coverage-guided fuzzing per reader in `nox -s fuzz` (`-- SECONDS` overrides).
FUZZ_SECONDS = 60


@nox.session(python=PYTHON)
def fuzz(session: nox.Session) -> None:
    """The readers of outside files fuzzed longer than CI does: the hypothesis targets with
    2000 examples each (DECO_FUZZ_EXAMPLES), then atheris on every target for FUZZ_SECONDS
    (`nox -s fuzz -- 600` for ten minutes each). A crash stops the session; its input is saved
    as crash-* in the working folder: keep it in tests/fuzz_corpus/TARGET/ as a regression case."""
    install(session, "test,onnx,text,fuzz")
    seconds = int(session.posargs[0]) if session.posargs else FUZZ_SECONDS
    session.run("pytest", "-p", "no:cacheprovider", "tests/test_fuzz_readers.py",
                env={"DECO_FUZZ_EXAMPLES": "2000"})
    targets = session.run("python", "-c", "import sys; sys.path.insert(0, 'tests'); "
                          "from fuzz_targets import TARGETS; print(' '.join(sorted(TARGETS)))", silent=True)
    for target in str(targets).split():
        session.run("python", "tests/fuzz/atheris_readers.py", target, f"-max_total_time={seconds}",
                    "-rss_limit_mb=4096", "-timeout=60")
