"""The catalogue of convention points and the differential diagnosis (deco.conformance.catalogue,
.differential, .audit): every variant planted in the reference port is named by the diagnosis on
every vector it fails, through the Python protocol and through the file protocol; the audit's
matrix is the committed spec/vectors/AUDIT.md; a hint never widens the tolerance of a wrong
port; combinations are found; locations name the region an error is confined to.

The independent checks of the catalogue itself are the defects of test_conformance.py (written
without it, and named by it) and the third-party port of the report (PixelHDM)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import REPO_ROOT
from safetensors.numpy import save_file

from deco.cli import main
from deco.conformance import kit
from deco.conformance.audit import audit, passed
from deco.conformance.catalogue import PlantedPort, Variant, planted
from deco.conformance.diagnose import FLOAT32_WINDOW
from deco.conformance.differential import BY_NAME, CATALOGUE
from deco.conformance.outputs import run_outputs
from deco.conformance.report import junit_xml

VECTORS = REPO_ROOT / "spec" / "vectors"
AUDIT = VECTORS / "AUDIT.md"
#: Variants no committed vector catches; the audit lists exactly these as blind (none since the
#: vectors cover the spec's domain: guidance 0 and 0 < g < 1 catch guidance_only_above_one).
KNOWN_BLIND: set[str] = set()


@pytest.fixture(scope="module")
def vectors() -> list[kit.Vector]:
    return kit.load_vectors(VECTORS)


def of(variant: Variant, vectors: list[kit.Vector]) -> list[kit.Vector]:
    """The vectors of the components the variant affects, with the velocity models they need."""
    chosen = [v for v in vectors if v.component in variant.components]
    models = {v.velocity_model for v in chosen}
    return [v for v in vectors if v in chosen or v.name in models]


def names(result: kit.Result) -> list[set[str]]:
    assert result.diagnosis is not None
    return [set(e.names) for e in result.diagnosis.explanations]


def test_the_audit_is_the_committed_matrix(vectors: list[kit.Vector],
                                           capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["conformance", "--audit"])
    out = capsys.readouterr().out
    assert out == AUDIT.read_text(encoding="utf-8"), "regenerate: deco conformance --audit " \
        "spec/vectors/AUDIT.md"
    rows = audit(vectors)  # cached by the run above
    assert {r.variant.name for r in rows if not r.caught} == KNOWN_BLIND
    assert all(r.ok for r in rows if r.caught), [r.variant.name for r in rows if not r.ok]
    assert status == (0 if passed(rows) else 1) and passed(rows) == (not KNOWN_BLIND)


def test_catalogue_names_are_unique_and_cite_the_spec() -> None:
    assert len(BY_NAME) == len(CATALOGUE) >= 90
    for v in CATALOGUE:
        assert v.components and set(v.components) <= set(kit.COMPONENTS) | {
            "interpolate", "target_velocity", "time_shift"}, v.name
        chapter = v.section.split()[0]
        assert any(p.name.startswith(chapter) for p in (REPO_ROOT / "spec").glob("0*.md")), v.name


@pytest.fixture(scope="module")
def caught(vectors: list[kit.Vector]) -> dict[str, list[str]]:
    """variant -> the vectors the audit says it fails (named there), from the cached audit."""
    return {r.variant.name: [v.name for v, c in zip(vectors, r.cells, strict=True) if c == "N"]
            for r in audit(vectors)}


@pytest.mark.parametrize("variant", [v for v in CATALOGUE if v.name not in KNOWN_BLIND],
                         ids=lambda v: v.name)
def test_each_variant_planted_in_a_python_port_is_named(
        variant: Variant, vectors: list[kit.Vector], caught: dict[str, list[str]]) -> None:
    """The variant planted around every call of a Python port (PlantedPort), on the first three
    vectors the audit says it fails (all of them run in the file-protocol test below)."""
    first = set(caught[variant.name][:3])
    chosen = [v for v in vectors if v.name in first]
    chosen += [v for v in vectors if v.name in {c.velocity_model for c in chosen}]
    results = kit.run_port(PlantedPort([variant]), chosen)
    failed = [r for r in results if r.status != "pass"]
    assert {r.vector for r in failed} == first
    for r in failed:
        assert r.status == "FAIL" and {variant.name} in names(r), (r.vector, names(r))
        assert r.diagnosis is not None and r.diagnosis.hint is not None
        assert r.diagnosis.hint.slip != "float32"


def test_each_variant_in_output_files_is_named(vectors: list[kit.Vector], tmp_path: Path) -> None:
    """The file protocol: each variant's outputs written as a port in any language writes them
    (`out`, float64), read back and judged by `--outputs`."""
    for variant in (v for v in CATALOGUE if v.name not in KNOWN_BLIND):
        folder = tmp_path / variant.name
        folder.mkdir()
        by_name = {v.name: v for v in vectors}
        for vector in of(variant, vectors):
            out = kit.reference_with([variant], vector, by_name)
            if out is not None:
                save_file({"out": np.ascontiguousarray(out)}, str(folder / f"{vector.name}.safetensors"))
        results = run_outputs(folder, vectors, "float64")
        failed = [r for r in results if r.status == "FAIL"]
        assert failed, variant.name
        assert all({variant.name} in names(r) for r in failed), (variant.name, [
            (r.vector, names(r)) for r in failed])


def test_a_wrong_epsilon_is_named_not_taken_for_float32(vectors: list[kit.Vector]) -> None:
    """The issue's case: LayerNorm eps 1e-5 leaves the baseline's forward pass 4e-6 away, where
    the kit used to say "declare float32" (and the wrong port then passed that vector)."""
    port = PlantedPort([BY_NAME["layernorm_eps_1e-5"]])
    (result,) = kit.run_port(port, [v for v in vectors if v.name == "forward_baseline"])
    assert result.status == "FAIL" and FLOAT32_WINDOW[0] < result.max_rel <= FLOAT32_WINDOW[1]
    assert result.diagnosis is not None and result.diagnosis.hint is not None
    assert result.diagnosis.hint.slip == "layernorm_eps_1e-5"
    assert "float32" not in result.diagnosis.hint.text


def test_a_wrong_epsilon_in_float32_arithmetic_is_still_named(vectors: list[kit.Vector]) -> None:
    """Both at once (eps 1e-5 and float32 rounding, declared float64): the variant explains most
    of the error, so it is named, and float32 is not offered."""
    class Rounded(PlantedPort):
        def __getattr__(self, name: str) -> object:
            fn = super().__getattr__(name)
            return lambda *a: np.asarray(fn(*a)).astype(np.float32) if callable(fn) else fn

    port = Rounded([BY_NAME["layernorm_eps_1e-5"]])
    (result,) = kit.run_port(port, [v for v in vectors if v.name == "forward_deco"])
    assert result.diagnosis is not None and result.diagnosis.hint is not None
    assert result.diagnosis.hint.slip == "layernorm_eps_1e-5"
    assert result.diagnosis.explanations[0].exact is False  # float32 rounding remains


def test_a_float32_port_declared_float64_still_gets_the_float32_hint(vectors: list[kit.Vector]) -> None:
    class Rounded:
        precision = "float64"

        def forward(self, *args: object) -> np.ndarray:
            return np.asarray(kit.ReferencePort.forward(*args)).astype(np.float32)  # type: ignore[arg-type]

    forward = [v for v in vectors if v.component == "forward"]
    results = [r for r in kit.run_port(Rounded(), forward) if r.status == "FAIL"]
    assert results and all(r.diagnosis and r.diagnosis.hint and r.diagnosis.hint.slip == "float32"
                           for r in results)


@pytest.mark.parametrize("combo, vector", [
    (("pad_edge", "weights_transposed"), "loss_q85"),
    (("timeshift_ignored", "interval_ignored"), "euler_timeshift"),
    # PixelHDM's RoPE: integer positions, the y angles in the first half (two wrappers whose
    # order matters: swapped pairs, then split halves)
    (("rope_integer_positions", "rope_xy_swapped", "rope_x_then_y"), "rope_angles")])
def test_combinations_are_named_together(combo: tuple[str, ...], vector: str,
                                         vectors: list[kit.Vector]) -> None:
    chosen = [v for v in vectors if v.name in (vector, "forward_deco")]
    results = {r.vector: r for r in kit.run_port(PlantedPort([BY_NAME[n] for n in combo]), chosen)}
    found = results[vector].diagnosis
    assert found is not None and found.explanations and found.explanations[0].exact
    # (on a loss, transposed weights and transposed coefficients are the same: both named)
    assert set(combo) in names(results[vector]), names(results[vector])


def test_the_runs_findings_decompose_a_composite(vectors: list[kit.Vector]) -> None:
    """A port whose loss differs by what its block DCT showed: the loss (a scalar, which alone
    says little) is explained by the DCT's variants, found first on the block_dct vector."""
    variants = [BY_NAME["dct_width_inverse"], BY_NAME["coefficients_cropped"]]
    chosen = [v for v in vectors if v.component in ("block_dct", "frequency_aware_loss")]
    results = {r.vector: r for r in kit.run_port(PlantedPort(variants), chosen)}
    expected = {"dct_width_inverse", "coefficients_cropped"}
    assert expected in names(results["block_dct"]) and expected in names(results["loss_q85"])


def test_planting_restores_the_reference(vectors: list[kit.Vector]) -> None:
    from deco.conformance.stage_ports import ReferenceStages
    from deco.reference import model, sampling

    def state() -> tuple[object, ...]:
        return (model.rms_norm, model.TIME_MAX_PERIOD, sampling.heun, sampling.guided_velocity,
                vars(ReferenceStages)["weighted_error"])
    before = state()
    with pytest.raises(RuntimeError), planted([BY_NAME["rmsnorm_eps_1e-5"],
                                               BY_NAME["time_max_period_10000"],
                                               BY_NAME["heun_last_step_corrected"],
                                               BY_NAME["loss_sum"]]):
        assert model.rms_norm is not before[0] and model.TIME_MAX_PERIOD == 10000.0
        raise RuntimeError
    assert state() == before
    assert kit.passed(kit.run_port(kit.ReferencePort(), vectors))


def test_location_names_the_padded_border_and_the_junit_report_the_variant(
        vectors: list[kit.Vector]) -> None:
    dct = [v for v in vectors if v.name == "block_dct"]
    (r,) = kit.run_port(PlantedPort([BY_NAME["pad_symmetric"]]), dct)
    assert r.diagnosis is not None and r.diagnosis.location is not None
    assert r.diagnosis.location.kind == "region"
    assert "blocks touching the padded border" in r.diagnosis.location.text
    xml = junit_xml([r]).decode()
    assert "your output equals the reference with the padding repeats the edge sample" in xml
