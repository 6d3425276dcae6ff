"""onnxruntime-web (WebAssembly) in a real headless Chromium: the graphs of both model kinds
agree with torch to 1e-4 (float16 graphs: deco.deploy.export's float16 bound), and the digits demo
(examples/web/index.html) draws, for Python's noise, the image that onnxruntime's Python binding
and torch give, to at most 1/255 per pixel.

The pixel bound: the page draws the graph's own uint8 `image` output, which is
round((clip(sample) + 1) 127.5) of a float sample that differs from torch's by ~1e-6 (relative);
a value that lands within that distance of a rounding boundary (k + 0.5) / 127.5 - 1 rounds the
other way, so one level (1/255) is the smallest bound that holds for every pixel, and anything
more would be a real disagreement.

examples/ is served on 127.0.0.1 (a free port, Python's http.server in a thread), the test
graphs under /models/; onnxruntime-web's wasm files come from examples/node_modules, so nothing
is fetched from outside. One Chromium launch (examples/web/drive.mjs) does every browser check.
Needs node, `npm ci --ignore-scripts` in examples/ and Debian's chromium: skipped without them,
failed under CI. About 30 s (the exports are shared with the other runtime tests).
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnx
import pytest
from helpers import REPO_ROOT, missing_extra, rel_err
from runtime_graphs import (
    GENERATOR_CASES,
    VELOCITY_CASES,
    Case,
    TinyModel,
    check_outputs,
    feed_for,
    generator_case,
    runtime_cases,
    session_folder,
)
from safetensors.numpy import load_file, save_file

pytestmark = pytest.mark.slow

EXAMPLES = REPO_ROOT / "examples"
CHROMIUM = os.environ.get("DECO_CHROMIUM", "/usr/bin/chromium")
CASES, GENERATORS = VELOCITY_CASES, GENERATOR_CASES
DIGIT, SIZE = 7, 32  # the demo's digit and image size (the built-in digits' 32x32)


class Handler(http.server.SimpleHTTPRequestHandler):
    """examples/ at /, the test's graphs at /models/; JavaScript modules and wasm with their
    MIME types (browsers refuse a module served as text/plain)."""

    models: Path = Path()
    extensions_map: ClassVar[dict[str, str]] = {
        ".mjs": "text/javascript", ".js": "text/javascript", ".wasm": "application/wasm",
        ".onnx": "application/octet-stream", ".html": "text/html"}

    def translate_path(self, path: str) -> str:
        if path.startswith("/models/"):
            return str(self.models / Path(path.split("?")[0]).name)
        return super().translate_path(path)

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    models = session_folder(tmp_path_factory)
    handler = type("ModelsHandler", (Handler,), {"models": models})
    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(handler, directory=str(EXAMPLES)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def tools() -> str:
    node = shutil.which("node")
    if node is None:
        missing_extra("node is not installed (Node.js 20 or later)")
    for package in ("onnxruntime-web", "playwright-core"):
        if not (EXAMPLES / "node_modules" / package).is_dir():
            missing_extra(f"examples/node_modules/{package} is missing: "
                          "run `npm ci --ignore-scripts` in examples/")
    if not Path(CHROMIUM).is_file():
        missing_extra(f"{CHROMIUM} is missing: `apt-get install -y chromium` (or set DECO_CHROMIUM)")
    return str(node)


class Browser:
    """Every browser check, run by one Chromium launch when the fixture is built."""

    def __init__(self, node: str, base: str, folder: Path, factory: pytest.TempPathFactory) -> None:
        self.cases, self.missing = runtime_cases(folder)
        self.demo_case = None
        work = factory.mktemp("web")
        runs = []
        for case in self.cases:
            inputs = work / f"{case.name}.in.safetensors"
            names = [i.name for i in onnx.load(str(case.model), load_external_data=False).graph.input]
            save_file(feed_for(case, names), str(inputs))
            runs.append({"name": case.name, "model": f"/models/{case.model.name}", "inputs": str(inputs),
                         "out": str(work / f"{case.name}.out.safetensors")})
        demos: list[dict[str, Any]] = [
            {"name": "missing", "url": "/web/index.html?model=/models/absent.onnx", "digit": None,
             "noise": None, "screenshot": str(work / "missing.png")}]
        if not self.missing:
            model = TinyModel("class", folder)  # the same weights (seeded) as the case's
            self.demo_case = generator_case(model, folder, SIZE, SIZE, np.array([DIGIT]), seed=5)
            url = f"/web/index.html?model=/models/{self.demo_case.model.name}"
            demos.append({"name": "digit", "url": url,
                          "digit": DIGIT, "noise": self.demo_case.inputs["noise"].ravel().tolist(),
                          "screenshot": str(work / "demo.png")})
            demos.append({"name": "bad size", "url": f"{url}&size=30", "digit": DIGIT, "noise": None,
                          "screenshot": None})
        jobs = {"base": base, "chromium": CHROMIUM, "tmp": str(work), "runs": runs, "demos": demos}
        (work / "jobs.json").write_text(json.dumps(jobs))
        result = subprocess.run([node, str(EXAMPLES / "web" / "drive.mjs"), str(work / "jobs.json"),
                                 str(work / "results.json")], capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        self.results = json.loads((work / "results.json").read_text())
        self.outputs = {job["name"]: Path(job["out"]) for job in runs}
        self.work = work


@pytest.fixture(scope="module")
def browser(server: str, tmp_path_factory: pytest.TempPathFactory) -> Browser:
    node = tools()
    return Browser(node, server, session_folder(tmp_path_factory), tmp_path_factory)


def check_run(browser: Browser, case: Case) -> None:
    outcome = browser.results["runs"][case.name]
    assert "error" not in outcome, outcome
    got = load_file(str(browser.outputs[case.name]))
    check_outputs("web", case, got)


@pytest.mark.parametrize("name", CASES)
def test_web_matches_torch(browser: Browser, name: str) -> None:
    check_run(browser, next(c for c in browser.cases if c.name == name))


@pytest.mark.parametrize("name", GENERATORS)
def test_web_generator_matches_torch(browser: Browser, name: str) -> None:
    if browser.missing:
        missing_extra(browser.missing)
    check_run(browser, next(c for c in browser.cases if c.name == name))


def test_demo_page_draws_the_generators_image(browser: Browser) -> None:
    """Pick a digit, press Generate: one session.run, and the canvas holds the image that
    onnxruntime (Python) and torch make from the same noise and digit."""
    if browser.missing:
        missing_extra(browser.missing)
    import onnxruntime as ort

    case = browser.demo_case
    assert case is not None
    page = browser.results["demos"]["digit"]
    assert page["state"] == "done", page["status"]
    assert page["status"].startswith(f"Digit {DIGIT}: generated") and page["runs"] == 1
    assert (page["height"], page["width"]) == (SIZE, SIZE)
    canvas = np.array(page["rgba"], dtype=np.uint8).reshape(SIZE, SIZE, 4)
    assert np.all(canvas[..., 3] == 255)
    session = ort.InferenceSession(str(case.model), providers=["CPUExecutionProvider"])
    feed = feed_for(case, [i.name for i in session.get_inputs()])
    python_image = dict(zip([o.name for o in session.get_outputs()], session.run(None, feed), strict=True))
    for reference in (python_image["image"][0], case.expected["image"][0]):
        assert int(np.max(np.abs(canvas[..., :3].astype(int) - reference))) <= 1
    if page["sample"] is not None:
        sample = np.array(page["sample"], dtype=np.float32).reshape(case.expected["sample"].shape)
        assert rel_err(sample, case.expected["sample"]) <= case.rtol
    assert (browser.work / "demo.png").stat().st_size > 0  # the screenshot (of a random model: noise)


def test_demo_page_says_when_the_model_file_is_missing(browser: Browser) -> None:
    page = browser.results["demos"]["missing"]
    assert page["state"] == "error"
    assert page["status"].startswith("model: /models/absent.onnx not found (HTTP 404)")
    assert "deco export-onnx" in page["status"]


def test_demo_page_says_when_the_size_does_not_fit_the_model(browser: Browser) -> None:
    if browser.missing:
        missing_extra(browser.missing)
    page = browser.results["demos"]["bad size"]
    assert page["state"] == "error" and page["runs"] == 0
    assert page["status"] == "noise: height and width must be multiples of the patch size 4, got 30x30"


def test_no_page_error_besides_the_missing_model(browser: Browser) -> None:
    others = [m for m in browser.results["console"] if "404" not in m]
    assert others == []
