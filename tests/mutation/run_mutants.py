"""Run mutants of `deco.optimized` against their tests (tests/MUTATION.md); a tool, not a test module.

    python tests/mutation/run_mutants.py --cap 35 --seed 20 --out results.tsv
    python tests/mutation/run_mutants.py --only survivors.tsv --pins --out after.tsv

In --only files, index -1 runs the module's tests on the unmutated code (a baseline: it must
survive, or every "killed" means nothing).

The checkout's tracked files are copied to a scratch folder with a `deco` package overlay (the
folders mapped as pyproject.toml maps them), so the mutants never touch the checkout and the
installed editable `deco` is shadowed. The heavy imports happen once; each mutant runs pytest in
a fork()ed child (no shrinking, no Hypothesis database, derandomized), `-x`, without the
torch.compile tests. Results: one row per mutant, module, index, killed/survived/timeout/error,
seconds, description. POSIX only (fork).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))

from mutate import mutant, sites  # noqa: E402

MODULES = ["frequency", "flow", "sampling", "model", "layers", "text_to_image", "trainer"]
COMMON = ["tests/test_optimized_defaults.py"]
FIRST = {  # the first selection: each module's own test file (+ sampling for flow)
    "frequency": ["tests/test_optimized_frequency.py"],
    "flow": ["tests/test_optimized_flow.py", "tests/test_optimized_sampling.py"],
    "sampling": ["tests/test_optimized_sampling.py"],
    "model": ["tests/test_optimized_model.py"],
    "layers": ["tests/test_optimized_model.py"],
    "text_to_image": ["tests/test_optimized_text_to_image.py"],
    "trainer": ["tests/test_optimized_trainer.py"],
}
WIDER = {  # --pins: existing tests outside the first selection, then the mutation pins
    "frequency": ["tests/test_spec_tables.py", "tests/test_optimized_frequency_pins.py"],
    "flow": ["tests/test_spec_tables.py", "tests/test_optimized_flow_pins.py"],
    "sampling": ["tests/test_spec_tables.py", "tests/test_optimized_sampling_pins.py"],
    "model": ["tests/test_spec_tables.py", "tests/test_optimized_text_to_image.py",
              "tests/test_optimized_model_pins.py"],
    "layers": ["tests/test_spec_tables.py", "tests/test_optimized_text_to_image.py",
               "tests/test_optimized_model_pins.py"],
    "text_to_image": ["tests/test_spec_tables.py", "tests/test_optimized_model_pins.py"],
    "trainer": ["tests/test_spec_tables.py", "tests/test_optimized_trainer_pins.py"],
}
OVERLAY = {"": "core", "reference": "reference", "optimized": "optimized", "vectors": "spec/vectors"}


def plan(cap: int, seed: int) -> list[tuple[str, int]]:
    """Every mutant of each module, or a seeded sample of `cap` where a module has more."""
    rng = random.Random(seed)
    rows = []
    for module in MODULES:
        n = len(sites((ROOT / "optimized" / f"{module}.py").read_text()))
        indices = sorted(rng.sample(range(n), cap)) if n > cap else list(range(n))
        rows += [(module, i) for i in indices]
    return rows


def scratch_copy(folder: Path) -> Path:
    """Copy the tracked files to folder/tree and build folder/site/deco; returns the tree."""
    tree = folder / "tree"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in files.decode().split("\0"):
        if name and (ROOT / name).is_file():
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, tree / name)
    package = folder / "site" / "deco"
    package.mkdir(parents=True)
    for entry in (tree / "core").iterdir():
        (package / entry.name).symlink_to(entry)
    for name, source in OVERLAY.items():
        if name:
            (package / name).symlink_to(tree / source)
    sys.path.insert(0, str(folder / "site"))
    return tree


def run_tests(files: list[str], tree: Path, log: Path, timeout: float) -> str:
    import hypothesis
    import pytest

    pid = os.fork()
    if pid == 0:
        rc = 99
        try:
            os.chdir(tree)
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            hypothesis.settings.register_profile(
                "mutation", database=None, derandomize=True,
                phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate])
            hypothesis.settings.load_profile("mutation")
            rc = int(pytest.main(["-x", "-q", "-p", "no:cacheprovider", "-k", "not compile", *files]))
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(rc)
    start = time.time()
    while time.time() - start < timeout:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            rc = os.waitstatus_to_exitcode(status)
            return "survived" if rc == 0 else "killed" if rc == 1 else f"error{rc}"
        time.sleep(0.2)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    return "timeout"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cap", type=int, default=35, help="mutants sampled per module at most")
    parser.add_argument("--seed", type=int, default=20)
    parser.add_argument("--only", type=Path, help="rows 'module index' to run instead of a sample")
    parser.add_argument("--pins", action="store_true", help="add the wider tests and the pins")
    parser.add_argument("--timeout", type=float, default=400.0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    os.environ.update(OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1", CI="1")
    os.environ.setdefault("DECO_FIXTURES", str(ROOT.parent / "shared" / "fixtures"))
    sys.dont_write_bytecode = True
    import torch  # noqa: F401  (once, before forking)

    rows = ([(m, int(i)) for m, i in (line.split()[:2] for line in args.only.read_text().splitlines()
                                      if line.strip())] if args.only else plan(args.cap, args.seed))
    with tempfile.TemporaryDirectory(prefix="deco-mutants-") as scratch:
        tree = scratch_copy(Path(scratch))
        logs = Path(scratch) / "logs"
        logs.mkdir()
        with args.out.open("a") as out:
            for module, index in rows:
                path = tree / "optimized" / f"{module}.py"
                original = path.read_text()
                code, description = mutant(original, index) if index >= 0 else (original, "baseline")
                path.write_text(code)
                files = [*FIRST[module], *COMMON, *(WIDER[module] if args.pins else [])]
                start = time.time()
                try:
                    status = run_tests(files, tree, logs / f"{module}-{index}.txt", args.timeout)
                finally:
                    path.write_text(original)
                log = (logs / f"{module}-{index}.txt").read_text().splitlines()
                failed = [line.split()[1] for line in log if line.startswith("FAILED ")][:1]
                out.write(f"{module}\t{index}\t{status}\t{time.time() - start:.1f}\t{description}\t"
                          f"{failed[0] if failed else ''}\n")
                out.flush()


if __name__ == "__main__":
    main()
