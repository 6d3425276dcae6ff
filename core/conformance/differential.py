"""The differential diagnosis of a failed vector (deco.conformance): rerun the reference with each
catalogued convention point done differently (`CATALOGUE`: catalogue_frequency, catalogue_model,
catalogue_sampling), alone and in pairs, and report the variants that reproduce the port's output.

`explain` returns `Explanation`s, best first: those that reproduce the output within the run's
tolerance ("your output equals the reference with ..."), the most specific (fewest components
affected) first; failing that, those that leave at most a tenth of the port's error ("most of the
error goes away with ..."). Pairs are tried among the variants that each reduce the error, when no
single one reproduces the output. Variant outputs are cached per vector (catalogue.variant_output),
so the audit and repeated runs pay once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import combinations, permutations
from typing import Any

import numpy as np
from numpy.typing import NDArray

from deco.conformance.catalogue import ANY_MODEL, Variant, compatible
from deco.conformance.catalogue_frequency import VARIANTS as FREQUENCY
from deco.conformance.catalogue_model import VARIANTS as MODEL
from deco.conformance.catalogue_sampling import VARIANTS as SAMPLING
from deco.conformance.fixtures import error_measure

Array = NDArray[Any]
CATALOGUE: tuple[Variant, ...] = (*FREQUENCY, *MODEL, *SAMPLING)
BY_NAME = {v.name: v for v in CATALOGUE}
assert len(BY_NAME) == len(CATALOGUE), "catalogue names must be unique"
#: A variant "explains most of the error" when the port's error without it is this many times
#: the error that remains with it.
MOST = 10.0
#: Pairs and triples are tried among this many variants (those that leave the least RMS error).
PAIR_POOL = 6
#: All pairs among this many variants for a scalar output (the losses).
CHEAP_POOL = 40
SHOWN = 3
#: How many of the run's latest findings are tried first (deco.conformance.kit keeps them).
PRIOR = 6

Compute = Callable[[Sequence[Variant]], "Array | None"]


@dataclass(frozen=True)
class Explanation:
    """Variants planted together in the reference; `residual`: the error measure between the
    port's output and the reference's with them; `exact`: within the run's tolerance."""

    variants: tuple[Variant, ...]
    residual: float
    exact: bool

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(v.name for v in self.variants)

    @property
    def summary(self) -> str:
        return " and ".join(f"{v.summary} (spec {v.section})" for v in self.variants)

    def sentence(self, port_error: float) -> str:
        if self.exact:
            return f"your output equals the reference with {self.summary}"
        return (f"most of the error goes away with {self.summary}: the error drops from "
                f"{port_error:.2e} to {self.residual:.2e}")

    def record(self) -> dict[str, Any]:
        return {"variants": list(self.names), "sections": [v.section for v in self.variants],
                "summary": self.summary, "residual": self.residual, "exact": self.exact}


def relevant(component: str) -> list[Variant]:
    """The catalogue's variants that can change an output of `component`."""
    return [v for v in CATALOGUE if component in v.components]


def _residual(got: Array, candidate: Array | None, compare: Callable[[Array], Array]) -> float | None:
    if candidate is None or candidate.shape != got.shape or not np.all(np.isfinite(candidate)):
        return None
    return error_measure(compare(got), compare(candidate))[1]


def explain(component: str, got: Array, expected: Array, compute: Compute,
            compare: Callable[[Array], Array], tol: float,
            prior: Sequence[Variant] = ()) -> list[Explanation]:
    """The variants that explain `got` (the port's raw output, float64) where the reference gave
    `expected`, best first (module docstring); [] when none does. `prior`: variants that explained
    the same port's other vectors in this run (its stages: the DCT and weights before the loss),
    tried first in combinations, so that a composite is decomposed into what its stages showed."""
    port_error = _residual(got, expected, compare)
    if port_error is None:  # another shape: only a variant with that shape can explain it
        port_error = float("inf")
    known = _from_prior(component, got, compute, compare, tol, prior)
    if known:
        return known
    singles: list[Explanation] = []
    for v in relevant(component):
        out = compute([v])
        r = _residual(got, out, compare)
        if r is None or (out is not None and out.shape == expected.shape
                         and error_measure(compare(out), compare(expected))[1] <= tol):
            continue  # not this output's shape, or the variant changes nothing on this vector
        singles.append(Explanation((v,), r, r <= tol))
    exact = [e for e in singles if e.exact]
    if exact:
        return sorted(exact, key=lambda e: (len(e.variants[0].components), e.residual))[:SHOWN]
    first = [e for e in singles if e.variants[0] in prior][-PRIOR:]
    ranked = first + sorted((e for e in singles if e not in first),
                            key=lambda e: _rms(got, compute(e.variants), compare))
    # Every pair for a scalar (a loss: the RMS ranking says little about one number, and each
    # evaluation costs milliseconds); otherwise pairs and triples among the best few.
    cheap = got.size == 1 and component not in ANY_MODEL
    tried: list[Explanation] = []
    for size in (2, 3):
        found = []
        pool = ranked[:CHEAP_POOL if cheap and size == 2 else PAIR_POOL + len(first)]
        for combo in combinations([e.variants[0] for e in pool], size):
            if not compatible(combo):
                continue
            for order in _orders(combo):
                r = _residual(got, compute(list(order)), compare)
                if r is not None:
                    found.append(Explanation(tuple(order), r, r <= tol))
        exact = [e for e in found if e.exact]
        if exact:
            return _distinct(sorted(exact, key=lambda e: e.residual))
        tried += found
    if got.size == 1:
        return []  # one number is near many combinations: only an exact match says something
    most = [e for e in singles + tried if e.residual * MOST <= port_error]
    return _distinct(sorted(most, key=lambda e: (e.residual, len(e.variants))))


def _distinct(explanations: list[Explanation]) -> list[Explanation]:
    """The first SHOWN explanations with distinct sets of variants (orders of one set count once)."""
    out: list[Explanation] = []
    for e in explanations:
        if all(set(e.names) != set(o.names) for o in out):
            out.append(e)
    return out[:SHOWN]


def _from_prior(component: str, got: Array, compute: Compute, compare: Callable[[Array], Array],
                tol: float, prior: Sequence[Variant]) -> list[Explanation]:
    """What the run's earlier findings explain exactly, alone or combined (up to three of the
    last PRIOR found): a port's slip shows on every vector that reaches it, and a forward slip on
    every sampler vector, so each needs one or a few evaluations instead of the whole search."""
    chosen = [v for v in prior if component in v.components][-PRIOR:]
    found = []
    for size in range(1, min(3, len(chosen)) + 1):
        for combo in combinations(chosen, size):
            if not compatible(combo):
                continue
            for order in _orders(combo):
                r = _residual(got, compute(list(order)), compare)
                if r is not None and r <= tol:
                    found.append(Explanation(tuple(order), r, True))
        if found:
            return _distinct(sorted(found, key=lambda e: e.residual))
    return []


def _orders(combo: Sequence[Variant]) -> list[tuple[Variant, ...]]:
    """The orders worth planting `combo` in: every permutation when two of them wrap the same
    function (wrappers do not commute: swapping pairs then splitting halves is not splitting
    then swapping), else the one order."""
    wrapped = [(p[0], p[1]) for v in combo for p in v.patches if not p[3]]
    if len(wrapped) == len(set(wrapped)):
        return [tuple(combo)]
    return list(permutations(combo))


def _rms(got: Array, other: Array | None, compare: Callable[[Array], Array]) -> float:
    """The root-mean-square difference (inf for another shape): ranks partial explanations,
    where the max-norm residual of one fix among several hardly moves."""
    if other is None or other.shape != got.shape:
        return float("inf")
    return float(np.sqrt(np.mean((compare(got) - compare(other)) ** 2)))
