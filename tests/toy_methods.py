"""Methods the tests register themselves, as a user adding a method would: one package's worth, one call each.

- ``HalfStep``: AlphaEdit's solve, of which half is written (a method that differs only in ``combine``);
- ``FlakyAlphaEdit``, ``FlakyMEMIT`` (with MEMIT's variants, e.g. ``FlakyMEMIT+P``) and ``FlakyPRUNE``: the
  real methods, whose edit raises at the ``Flaky.fail_at``-th call (counted in ``Flaky.calls``), to test
  what the benchmark runner does with a failed batch.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

from alphaedit_plugin.hparams import EditHyperParams, _help, _require
from alphaedit_plugin.methods.alphaedit import AlphaEdit, AlphaEditHyperParams
from alphaedit_plugin.methods.memit import MEMIT, MEMITHyperParams, memit_family_variants
from alphaedit_plugin.methods.prune import PRUNE, PRUNEHyperParams
from alphaedit_plugin.registry import register_method, unregister_method


@dataclass
class HalfStepHyperParams(EditHyperParams):
    ALG_NAME: ClassVar[str] = "HalfStep"
    alg_name: str = _help("Must be HalfStep.", default="HalfStep")
    step_fraction: float = _help("Share of AlphaEdit's update that is written.", default=0.5)

    def validate(self) -> None:
        super().validate()
        _require(self, "step_fraction", float, lambda v: 0 < v <= 1, "a number in (0, 1]")


class HalfStep(AlphaEdit):
    """AlphaEdit's solve; only ``step_fraction`` of each layer's update is written."""

    def combine(self, deltas, weights, state):
        return {layer: self.hparams.step_fraction * delta for layer, delta in deltas.items()}, {}


class Flaky:
    """Counts the edits of the flaky methods; the ``fail_at``-th one raises."""

    calls = 0
    fail_at = None

    @classmethod
    def reset(cls, fail_at=None):
        cls.calls, cls.fail_at = 0, fail_at

    def combine(self, deltas, weights, state):
        Flaky.calls += 1
        if Flaky.calls == Flaky.fail_at:
            raise RuntimeError("simulated crash")
        return super().combine(deltas, weights, state)


@dataclass
class FlakyAlphaEditHyperParams(AlphaEditHyperParams):
    ALG_NAME: ClassVar[str] = "FlakyAlphaEdit"
    alg_name: str = _help("Must be FlakyAlphaEdit.", default="FlakyAlphaEdit")


@dataclass
class FlakyMEMITHyperParams(MEMITHyperParams):
    ALG_NAME: ClassVar[str] = "FlakyMEMIT"
    alg_name: str = _help("Must be FlakyMEMIT.", default="FlakyMEMIT")


@dataclass
class FlakyPRUNEHyperParams(PRUNEHyperParams):
    ALG_NAME: ClassVar[str] = "FlakyPRUNE"
    alg_name: str = _help("Must be FlakyPRUNE.", default="FlakyPRUNE")


class FlakyAlphaEditMethod(Flaky, AlphaEdit):
    pass


class FlakyMEMITMethod(Flaky, MEMIT):
    pass


class FlakyPRUNEMethod(Flaky, PRUNE):
    pass


TOYS = {
    "HalfStep": (HalfStepHyperParams, HalfStep, None),
    "FlakyAlphaEdit": (FlakyAlphaEditHyperParams, FlakyAlphaEditMethod, None),
    "FlakyMEMIT": (FlakyMEMITHyperParams, FlakyMEMITMethod, memit_family_variants()),
    "FlakyPRUNE": (FlakyPRUNEHyperParams, FlakyPRUNEMethod, memit_family_variants()),
}


@contextmanager
def registered(name: str):
    """The toy method ``name`` registered for the block, then unregistered again."""
    hparams_class, method_class, variants = TOYS[name]
    if variants is None:
        register_method(name, hparams_class, method_class)
    else:
        register_method(name, hparams_class, method_class, variants)
    try:
        yield hparams_class
    finally:
        unregister_method(name)


def as_toy(hparams, toy_class, **overrides):
    """The same settings in the toy's hparams class (fields the toy does not have are left out)."""
    names = {spec.name for spec in dataclasses.fields(toy_class)} - {"alg_name"}
    fields = {name: getattr(hparams, name) for name in names if hasattr(hparams, name)}
    fields.update(overrides)
    return toy_class(**fields)
