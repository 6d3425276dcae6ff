"""The catalogue of convention points (deco.conformance): the places where the spec makes a choice
that a porter could make differently, each as a small named float64 *variant of the reference*.

A `Variant` is a list of patches of `deco.reference`: a constant replaced, or a function wrapped or
replaced. `planted(variants)` applies them for the length of a `with` block (a function is replaced
in every module of `deco.reference` that holds it, so `from .model import rms_norm` sees it too),
and `variant_output` runs a vector's calling code on `LIVE_PORT`, the reference port that looks
its functions up at call time, with the variants planted: the output a port with that convention
would give. The variants themselves live in `catalogue_frequency` (spec/01, 02),
`catalogue_model` (03, 06) and `catalogue_sampling` (04); `differential` searches them.

Planting mutates module attributes: the kit is single-threaded, and `planted` always restores.
"""

from __future__ import annotations

import hashlib
import importlib
import sys
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
from numpy.typing import NDArray

from deco.conformance.ports import ReferencePort

Array = NDArray[Any]
#: (module, attribute, make, replaces): the attribute becomes make(its current value);
#: `replaces` when the new value ignores the current one (two such patches of one attribute
#: cannot be combined: the later would undo the earlier).
Patch = tuple[str, str, Callable[[Any], Any], bool]

SAMPLERS = ("euler", "heun", "adams")
#: The components whose vectors run the class model / the text model (directly or as the
#: samplers' velocity model, which a port in another language computes itself).
CLASS_MODEL = ("forward", *SAMPLERS, "guided_velocity", "euler_step", "heun_step")
TEXT_MODEL = ("t2i_forward", "adams", "guided_velocity")
#: The sampler stages that evaluate the model (spec/vectors: guided velocity, one update).
MODEL_STAGES = ("guided_velocity", "euler_step", "heun_step")
ANY_MODEL = ("forward", "t2i_forward", *SAMPLERS, *MODEL_STAGES)


@dataclass(frozen=True)
class Variant:
    """One convention point done differently: `name` (stable identifier), `section` (the spec's
    chapter and section), `summary` (what the variant does, completing "the reference with ..."),
    `components` (the kit components whose outputs it can change) and its `patches`."""

    name: str
    section: str
    summary: str
    components: tuple[str, ...]
    patches: tuple[Patch, ...]


def variant(name: str, section: str, summary: str, components: Sequence[str],
            *patches: Patch) -> Variant:
    return Variant(name, section, summary, tuple(dict.fromkeys(components)), patches)


def constant(module: str, attribute: str, value: Any) -> Patch:
    """A patch setting a module constant."""
    return (module, attribute, lambda _old: value, True)


def wrap(module: str, attribute: str, make: Callable[[Any], Any]) -> Patch:
    """A patch replacing a function by make(the current function): it composes with others."""
    return (module, attribute, make, False)


def replace(module: str, attribute: str, new: Callable[..., Any]) -> Patch:
    """A patch replacing a function outright."""
    return (module, attribute, lambda _old: new, True)


def compatible(variants: Sequence[Variant]) -> bool:
    """Whether the variants can be planted together: no two replace the same attribute."""
    seen: set[tuple[str, str]] = set()
    for v in variants:
        for module, attribute, _, replaces in v.patches:
            if replaces and (module, attribute) in seen:
                return False
            if replaces:
                seen.add((module, attribute))
    return True


def _reference_modules() -> list[ModuleType]:
    return [m for name, m in list(sys.modules.items())
            if m is not None and (name == "deco.reference" or name.startswith("deco.reference."))]


@contextmanager
def planted(variants: Sequence[Variant]) -> Iterator[None]:
    """Apply the variants' patches, every outright replacement first and then every wrapper (so
    that a wrapper wraps a replacement instead of being undone by it); restore on exit."""
    patches = [p for v in variants for p in v.patches]
    undo: list[tuple[Any, str, Any]] = []
    try:
        for module_name, attribute, make, _ in sorted(patches, key=lambda p: not p[3]):
            module: Any = importlib.import_module(module_name)
            if "." in attribute:  # a class attribute "Class.name", read raw (a staticmethod)
                owner, attribute = attribute.split(".")
                module = getattr(module, owner)
            old = vars(module)[attribute]
            new = make(old)
            holders = [module]
            if callable(old) and isinstance(module, ModuleType):  # every module that imported it
                holders += [m for m in _reference_modules()
                            if m is not module and getattr(m, attribute, None) is old]
            for holder in holders:
                undo.append((holder, attribute, vars(holder)[attribute]))
                setattr(holder, attribute, new)
        yield
    finally:
        for holder, attribute, value in reversed(undo):
            setattr(holder, attribute, value)


def _live(module: str, name: str) -> staticmethod[..., Any]:
    return staticmethod(lambda *args: getattr(importlib.import_module(module), name)(*args))


class LivePort(ReferencePort):
    """`ReferencePort` whose functions taken from `deco.reference` are looked up when called, so
    that a planted variant reaches them (the class's own methods already look them up)."""


for _cls in reversed(ReferencePort.__mro__):  # the stage components' mixin too (stage_ports)
    for _name, _value in list(vars(_cls).items()):
        if isinstance(_value, staticmethod) and _value.__func__.__module__.startswith("deco.reference"):
            setattr(LivePort, _name, _live(_value.__func__.__module__, _value.__func__.__name__))

LIVE_PORT = LivePort()

# ------------------------------------------------------------------------ outputs, cached
_CACHE: OrderedDict[tuple[str, ...], Array | None] = OrderedDict()
CACHE_SIZE = 4096


def vector_key(name: str, expected: Array) -> str:
    """A vector's identity for the cache: its name and a digest of its expected output."""
    return name + ":" + hashlib.blake2b(np.ascontiguousarray(expected).tobytes(),
                                        digest_size=8).hexdigest()


def variant_output(variants: Sequence[Variant], key: str,
                   call: Callable[[Any], Any]) -> Array | None:
    """`call(LIVE_PORT)` (a vector's calling code) with `variants` planted, as float64; None when
    the variant makes the reference raise or return NaN / inf (it explains no output then).
    Cached per (variants, vector key)."""
    cache_key = (key, *(v.name for v in variants))
    if cache_key in _CACHE:
        _CACHE.move_to_end(cache_key)
        return _CACHE[cache_key]
    try:
        with planted(variants), np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # e.g. the mean of nothing
            out: Array | None = np.asarray(call(LIVE_PORT), dtype=np.float64)
    except Exception:  # a variant the vector's inputs cannot take (e.g. a padding it refuses)
        out = None
    if out is not None and not np.all(np.isfinite(out)):
        out = None  # nor one that leaves nothing to compute (a loss over an image cropped away)
    _CACHE[cache_key] = out
    while len(_CACHE) > CACHE_SIZE:
        _CACHE.popitem(last=False)
    return out


def clear_cache() -> None:
    _CACHE.clear()


class PlantedPort:
    """A port: the reference with `variants` planted around each of its calls (a port with
    known slips, for the tests and for trying the diagnosis by hand)."""

    precision = "float64"

    def __init__(self, variants: Sequence[Variant]) -> None:
        self.variants = list(variants)

    def __getattr__(self, name: str) -> Any:
        fn = getattr(LIVE_PORT, name)
        if name.startswith("_") or not callable(fn):
            return fn

        def call(*args: Any) -> Any:
            with planted(self.variants):
                return fn(*args)
        return call
