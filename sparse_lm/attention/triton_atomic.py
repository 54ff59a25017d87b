"""A float atomic add for Pallas-on-Triton kernels with relaxed memory ordering.

``jax.experimental.pallas.triton.atomic_add`` lowers to ``tt.atomic_rmw`` with
acquire-release semantics, which on NVIDIA GPUs puts memory fences around every atomic.
An accumulation whose old value is never read (the v2 ``atomic_dq`` path adding each key
tile's dq share into a float32 buffer) needs only atomicity: the launch boundary orders
it against any later reader. With relaxed ordering the add becomes a plain ``red``
reduction; Triton users report about 2x on flash-attention backward kernels for exactly
this change (flash-attention issue #1031).

JAX 0.11 exposes no ordering argument, so this module defines its own primitive that
shares the public primitive's abstract evaluation (shape checks, write effect) and its
discharge rule (the interpreter on CPU), and lowers through the public lowering rule.
That rule emits its op through the module function ``_atomic_rmw``; a wrapper installed
once around it asks for ``RELAXED`` ordering while, and only while, this thread lowers
one of our adds (a thread-local flag), and otherwise passes every call through
unchanged, so no other atomic in the process is affected. It relies on JAX internals of
the pinned version (see requirements.txt); ``available()`` says whether they are present
and ``add`` falls back, with a warning, to the public acquire-release op when they are not.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
import warnings
from typing import Any

import jax

_lowering_relaxed = threading.local()  # .active: this thread is lowering one of our adds

try:  # JAX internals of the pinned version; absent elsewhere -> public fallback
    from jax._src import core as _core
    from jax._src import tree_util as _tree_util
    from jax._src.lib.triton import dialect as _tt
    from jax._src.pallas.triton import lowering as _lowering
    from jax._src.pallas.triton import primitives as _primitives
    from jax._src.state import discharge as _discharge
    from jax._src.state import primitives as _state_primitives

    _ADD = _primitives.AtomicOpType.ADD
    _RELAXED = _tt.MemSemantic.RELAXED
    if "semantic" not in inspect.signature(_lowering._atomic_rmw).parameters:
        raise AttributeError("jax._src.pallas.triton.lowering._atomic_rmw takes no 'semantic'")

    def _install_ordering_hook() -> None:
        public = _lowering._atomic_rmw
        if getattr(public, "_sparse_lm_hook", False):  # module reloaded: already wrapped
            return

        def atomic_rmw(*args, **kwargs):
            if getattr(_lowering_relaxed, "active", False):
                kwargs["semantic"] = _RELAXED
            return public(*args, **kwargs)

        atomic_rmw._sparse_lm_hook = True
        _lowering._atomic_rmw = atomic_rmw

    _install_ordering_hook()
    relaxed_atomic_add_p = _core.Primitive("sparse_lm_relaxed_atomic_add")
    relaxed_atomic_add_p.def_effectful_abstract_eval(_primitives._atomic_abstract_eval)
    _discharge.register_discharge_rule(relaxed_atomic_add_p)(_primitives._atomic_rmw_discharge_rule)

    @contextlib.contextmanager
    def _relaxed_ordering():
        _lowering_relaxed.active = True
        try:
            yield
        finally:
            _lowering_relaxed.active = False

    @_lowering.register_lowering(relaxed_atomic_add_p)
    def _relaxed_lowering(ctx, *args_flat, args_tree, atomic_type):
        with _relaxed_ordering():
            return _primitives._atomic_lowering_rule(ctx, *args_flat, args_tree=args_tree,
                                                     atomic_type=atomic_type)

    _INTERNALS_ERROR: Exception | None = None
except (ImportError, AttributeError, ValueError) as e:  # pragma: no cover - other JAX versions
    relaxed_atomic_add_p = None
    _INTERNALS_ERROR = e


def available() -> bool:
    """Whether the relaxed primitive could be built on this JAX version."""
    return relaxed_atomic_add_p is not None


def add(ref: Any, idx: Any, val: jax.Array) -> None:
    """``ref[idx] += val`` atomically, relaxed ordering (the old value is not returned)."""
    if relaxed_atomic_add_p is None:
        from jax.experimental.pallas import triton as pltriton

        warnings.warn(f"relaxed float atomics unavailable on jax {jax.__version__} "
                      f"({_INTERNALS_ERROR}): using the fenced public atomic_add, which "
                      "measured ~2x slower; pin the JAX of requirements.txt.", stacklevel=2)
        pltriton.atomic_add(ref, idx, val)
        return
    ref, transforms = _state_primitives.get_ref_and_transforms(ref, idx, "atomic_rmw")
    args_flat, args_tree = _tree_util.tree_flatten((ref, transforms, val, None))
    relaxed_atomic_add_p.bind(*args_flat, args_tree=args_tree, atomic_type=_ADD)
