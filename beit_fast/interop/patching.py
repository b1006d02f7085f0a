"""Instance patching shared by :mod:`beit_fast.interop.hf` and :mod:`beit_fast.interop.timm`: the per-instance
patch state, :func:`revert_beit_fast` and :func:`beit_fast_patch_info`."""
from __future__ import annotations

import functools
import inspect
from typing import Any

import torch.nn as nn

# --------------------------------------------------------------------------------------------------
# Instance patching (shared by the HF and timm patches)
# --------------------------------------------------------------------------------------------------
_STATE_ATTR = "_beit_fast_patch_state"


class _AbsentType:
    """Marks "no instance attribute before the patch"; one object, kept by copy/deepcopy/pickle."""

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        return "_ABSENT"

    def __repr__(self) -> str:
        return "<absent>"


_ABSENT = _AbsentType()


class _PatchState:
    """What one ``apply_*`` call changed on one model instance, so that it can be undone exactly."""

    def __init__(self, library: str, options: dict[str, Any]) -> None:
        self.library = library
        self.options = dict(options)
        self.records: list[tuple[object, str, object]] = []  # (object, attribute, previous instance value)
        self.replaced: dict[str, list[str]] = {}  # human-readable summary: what -> [module paths]

    def set(self, obj: object, name: str, value: object, what: str | None = None, path: str | None = None) -> None:
        previous = obj.__dict__.get(name, _ABSENT)
        self.records.append((obj, name, previous))
        object.__setattr__(obj, name, value)
        if what is not None:
            self.replaced.setdefault(what, []).append(path or type(obj).__name__)

    def set_method(self, module: nn.Module, func, what: str, path: str, name: str = "forward") -> None:
        """Shadow ``module.<name>`` with ``func(module, ...)`` (a :class:`_PatchedMethod`)."""
        self.set(module, name, _PatchedMethod.bind(func, module, name), what, path)

    def undo(self) -> None:
        for obj, name, previous in reversed(self.records):
            if previous is _ABSENT:
                obj.__dict__.pop(name, None)
            else:
                object.__setattr__(obj, name, previous)
        self.records.clear()


class _PatchedMethod(functools.partial):
    # ``functools.partial(func, module)`` standing in for ``module.<name>`` as an instance attribute that
    # shadows the class's method. To introspection it is the method it replaces (what functools.wraps would
    # give, computed on access so that nothing extra is pickled): ``inspect.signature`` returns the class
    # method's signature, parameters and annotations included (HF reads ``forward``'s parameters and the
    # ``**kwargs`` annotation to decide what a model supports), ``__wrapped__`` / ``__name__`` / ``__doc__``
    # are the class's bound method's. It pickles and deep-copies as a partial (the copy is bound to the copied
    # module), and torch.compile traces it as a partial.

    @classmethod
    def bind(cls, func, module: nn.Module, name: str = "forward") -> "_PatchedMethod":
        method = cls(func, module)
        method.__dict__["_method_name"] = name
        return method

    @property
    def __wrapped__(self):
        module = self.args[0]
        return getattr(type(module), self.__dict__.get("_method_name", "forward")).__get__(module, type(module))

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(self.__wrapped__)

    @property
    def __name__(self) -> str:
        return self.__dict__.get("_method_name", "forward")

    @property
    def __doc__(self):  # noqa: D401 - the replaced method's docstring
        return self.__wrapped__.__doc__


def _begin_patch(model: nn.Module, library: str, options: dict[str, Any]) -> _PatchState:
    revert_beit_fast(model)  # re-applying replaces the previous patch, it does not stack
    state = _PatchState(library, options)
    object.__setattr__(model, _STATE_ATTR, state)
    return state


def revert_beit_fast(model: nn.Module) -> nn.Module:
    """Undo ``apply_beit_fast_to_hf`` / ``apply_beit_fast_to_timm`` on ``model`` (in place); returns it.

    Every instance attribute the patch set is removed (or restored to the value it had before), so the
    model runs its class's own methods again, bit for bit as before the patch. No-op on an unpatched model.
    """
    state = model.__dict__.get(_STATE_ATTR)
    if state is not None:
        state.undo()
        model.__dict__.pop(_STATE_ATTR, None)
    return model


def beit_fast_patch_info(model: nn.Module) -> dict[str, Any] | None:
    """What the current patch of ``model`` replaced: ``{"library", "options", "replaced"}`` or None."""
    state = model.__dict__.get(_STATE_ATTR)
    if state is None:
        return None
    return {"library": state.library, "options": dict(state.options),
            "replaced": {k: list(v) for k, v in state.replaced.items()}}
