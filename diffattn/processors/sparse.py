"""``SparseAttnProcessor``: replace only the core attention of a Diffusers attention module.

The processor wraps the module's own processor, so projections, qk-norm and RoPE stay the model's.
It runs a copy of the wrapped processor's ``__call__`` whose globals route its attention call —
diffusers' ``dispatch_attention_fn`` (Wan, HunyuanVideo, LTX, Flux) or
``F.scaled_dot_product_attention`` (CogVideoX, UNets) — to diffattn, which hands ``q, k, v`` with an
:class:`AttnContext` to the method. Calls diffattn does not take go to the function the processor
called, with the backend it asked for. A wrapped processor that reaches SDPA some other way runs
eagerly under a ``TorchFunctionMode`` that catches the SDPA call.

``torch.compile``: Dynamo traces the processor and the routed call, which only look at shapes and
flags; the method runs behind the opaque operator ``diffattn::attend`` (see :mod:`.ops`) with the
model state's handle and the layer index as static ints, and the denoiser's traced pre-hook calls
``diffattn::begin_forward``, which advances the schedule at run time. Nothing step-dependent is
read while tracing, so it never becomes a guard: one graph serves every step, search and
calibration. Eager calls run the same function without the operator.

Two ways in, one mechanism:

* ``diffattn.apply(pipe, "radial", ...)`` wraps each self-attention module's processor and hooks the
  denoiser's forward to publish step, branch and grid.
* ``pipe.transformer.set_attn_processor(SparseAttnProcessor(RadialConfig(...)))`` sets one shared
  processor everywhere; it recreates each module's default processor to wrap, and adopts the model
  (installs the same hooks) at its first forward. The shared processor is a weightless module, so it
  becomes a child of the attention modules and hears the cache context the pipeline opens around
  that first forward: the first step already knows the run's step count.

Either way the state lives on the model (``model._diffattn_state``, the hooks are objects pointing to
it), so ``copy.deepcopy`` gives an independent patched copy. Calls diffattn does not take run on the
user's diffusers attention backend. Under diffusers context parallelism the layer re-shards by heads
(see :mod:`.parallel`), so each rank runs the method on the whole sequence for its heads.

>>> import diffattn  # doctest: +SKIP
>>> pipe.transformer.set_attn_processor(diffattn.SparseAttnProcessor(diffattn.DenseConfig()))  # doctest: +SKIP
"""

from __future__ import annotations

import inspect
import logging
import sys
import threading
import types
import weakref
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..kernels.api import log_once
from ..methods import AttentionMethod, AttnContext, MethodConfig, get_method_class, make_config
from .blocks import block_input_of, unwatch_block_inputs, watch_block_inputs
from .models import ModelSpec, default_processor, layer_grid, spec_for
from .ops import attend as _attend_op
from .ops import begin_forward as _begin_op
from .ops import set_impl, unregister_state
from .parallel import attend_sharded, check_parallel, context_config, head_gatherer, joint_order, mode_name
from .state import ModelState, _timestep_value

__all__ = ["SparseAttnProcessor", "adopt", "release", "state_of"]

logger = logging.getLogger("diffattn")

DEFAULT_MIN_TOKENS = 1024



# ----------------------------------------------------------------------------------- model adoption
def _attention_modules(model: torch.nn.Module):
    for name, module in model.named_modules():
        if hasattr(module, "processor") and hasattr(module, "set_processor"):
            yield name, module


class _BeginForward:
    """Forward pre-hook of a patched denoiser. A callable object (not a closure), so that
    ``copy.deepcopy(model)`` copies it together with the state it points to."""

    def __init__(self, state: ModelState) -> None:
        self.state = state

    def __call__(self, module, args, kwargs):
        if torch.compiler.is_compiling():
            # Traced: only shapes are read here; the schedule advances in the operator, at run time.
            state = self.state
            inputs = dict(zip(state.forward_params, args))
            inputs.update(kwargs)
            grid = state.shape_of(module, inputs)
            like = next(v for v in inputs.values() if isinstance(v, torch.Tensor))
            timestep = inputs.get(state.spec.timestep_arg)
            if not isinstance(timestep, torch.Tensor):
                timestep = None if timestep is None else torch.tensor(float(timestep))
            state.token = _begin_op(like, timestep, state.handle, list(grid or ()))
            return
        self.state.begin_forward(module, args, kwargs)


class _EndForward:
    def __init__(self, state: ModelState) -> None:
        self.state = state

    def __call__(self, module, args, output):
        self.state.end_forward()


def _context_listener(target: Any) -> torch.nn.Module | None:
    """A parameter-free child module whose diffusers ``HookRegistry`` holds a stateful hook, so that
    ``model.cache_context(name, ...)`` hands its ``CacheContext`` to ``target.context`` (a model state,
    or a shared processor not yet adopted) and the pipeline's ``_reset_stateful_cache()`` ends the
    generation. It lives on a child that is never called because a hook registered on the denoiser
    itself would wrap its ``forward`` in a closure that a deep copy cannot follow."""
    try:
        from diffusers.hooks.hooks import BaseState, HookRegistry, ModelHook, StateManager
    except ImportError:  # pragma: no cover - diffusers without hooks publishes no context
        return None

    class _Listener(StateManager):
        def __init__(self, target: Any) -> None:
            super().__init__(BaseState)
            self.target = target

        def set_context(self, context) -> None:
            super().set_context(context)
            self.target.context = context

    class _ContextHook(ModelHook):
        _is_stateful = True

        def __init__(self, target: Any) -> None:
            super().__init__()
            self.listener = _Listener(target)

        def reset_state(self, module):
            tracker = getattr(self.listener.target, "tracker", None)
            if tracker is not None:
                tracker.reset()
            return module

    holder = _ContextHolder()
    HookRegistry.check_if_exists_or_initialize(holder).register_hook(_ContextHook(target), _CONTEXT_HOOK)
    return holder


_CONTEXT_HOOK = "diffattn_context"
_HOLDER = "_diffattn_context"


class _ContextHolder(torch.nn.Module):
    """Carries diffattn's context hook (see ``_context_listener``); never called, holds no weights."""

    def forward(self, *args, **kwargs):  # pragma: no cover - never called
        raise RuntimeError("diffattn's context holder is not a layer")


def _invalidate_registries(model: torch.nn.Module) -> None:
    reg = getattr(model, "_diffusers_hook", None)
    if reg is not None and hasattr(reg, "invalidate_child_registries_cache"):
        reg.invalidate_child_registries_cache()


def adopt(
    model: torch.nn.Module,
    spec: ModelSpec,
    scheduler: Any = None,
    num_steps: int | None = None,
    sync_timing: bool = False,
    capture_layouts: bool = False,
) -> ModelState:
    """Install diffattn's forward hooks and state on ``model`` (idempotent) and return its state."""
    state = state_of(model)
    if state is not None:
        if scheduler is not None:
            state.tracker.scheduler = scheduler
        if num_steps is not None:
            state.tracker.default_num_steps = num_steps
        state.sync_timing = sync_timing
        state.capture_layouts = capture_layouts
        return state
    state = ModelState(spec=spec, sync_timing=sync_timing, capture_layouts=capture_layouts)
    state.tracker.scheduler = scheduler
    state.tracker.default_num_steps = num_steps
    targets = [(n, m) for n, m in _attention_modules(model) if spec.is_target(n)]
    state.num_layers = len(targets)
    state.forward_params = tuple(inspect.signature(model.forward).parameters)
    parallel = getattr(model, "_parallel_config", None)
    if context_config(parallel) is not None:
        state.parallel = parallel
        for proc in {m.processor for _, m in _attention_modules(model) if isinstance(m.processor, SparseAttnProcessor)}:
            check_parallel(proc.config, context_config(parallel))
    for _, module in _attention_modules(model):
        module._diffattn_state = state
        module._diffattn_layer = None
    for index, (name, module) in enumerate(targets):
        module._diffattn_layer = (name, index)
        state.layers.append(module)
    for _, module in _attention_modules(model):
        if isinstance(module.processor, SparseAttnProcessor):
            # A shared processor's per-module inner processor is made here, on the host, so that a
            # compiled first forward does not have to trace its construction.
            module.processor._inner_for(module, state)
    pre = model.register_forward_pre_hook(_BeginForward(state), with_kwargs=True)
    post = model.register_forward_hook(_EndForward(state))
    state.hook_ids = (pre.id, post.id)  # type: ignore[attr-defined]
    holder = _context_listener(state)
    if holder is not None:
        model.add_module(_HOLDER, holder)
        _invalidate_registries(model)
    watch_block_inputs(model, lambda attn: attn.__dict__.get("_diffattn_layer") is not None)
    model._diffattn_state = state
    return state


def release(model: torch.nn.Module) -> None:
    """Remove the hooks and state ``adopt`` installed (no-op if none)."""
    state = state_of(model)
    if state is None:
        return
    pre_id, post_id = state.hook_ids  # type: ignore[attr-defined]
    model._forward_pre_hooks.pop(pre_id, None)
    model._forward_pre_hooks_with_kwargs.pop(pre_id, None)
    model._forward_hooks.pop(post_id, None)
    unwatch_block_inputs(model)
    if _HOLDER in model._modules:
        del model._modules[_HOLDER]
        _invalidate_registries(model)
    for _, module in _attention_modules(model):
        if getattr(module, "_diffattn_state", None) is state:
            del module._diffattn_state
            del module._diffattn_layer
    state.layers.clear()
    unregister_state(state.handle)
    del model._diffattn_state


def state_of(model: torch.nn.Module) -> ModelState | None:
    return getattr(model, "__dict__", {}).get("_diffattn_state")


# A processor set with `set_attn_processor` cannot see its model. Between constructing such a
# processor and the first forward of a model carrying it, a process-wide pre-hook watches module
# calls; it adopts the model and goes away once no processor waits. Global pre-hooks see no keyword
# arguments, so the grid (and timestep) of that first call are read from the positional inputs of
# the model's embedding layers (``ModelSpec.first_call_probes``); later calls use the model's hook.
_global_hook = None
_waiting: "weakref.WeakSet[SparseAttnProcessor]" = weakref.WeakSet()


def _wait_for_model(proc: "SparseAttnProcessor") -> None:
    global _global_hook
    _waiting.add(proc)
    if _global_hook is None:
        _global_hook = torch.nn.modules.module.register_module_forward_pre_hook(_global_pre_hook)


def _stop_waiting() -> None:
    global _global_hook
    if _global_hook is not None and not len(_waiting):
        _global_hook.remove()
        _global_hook = None


@torch._dynamo.disable
def _global_pre_hook(module: torch.nn.Module, args: tuple):
    if not len(_waiting):  # every waiting processor was garbage-collected
        _stop_waiting()
        return None
    # ``torch.compile(model)`` is called before the model: adopting it here, eagerly, lets the model's
    # own pre-hook (traced with the forward) see this first call, so it needs no probes.
    compiled = isinstance(module, torch._dynamo.eval_frame.OptimizedModule)
    if compiled:
        module = module._orig_mod
    spec = spec_for(module)
    if spec is None:
        return None
    found = {m.processor for _, m in _attention_modules(module) if isinstance(m.processor, SparseAttnProcessor)}
    if not found:
        return None
    if "_diffattn_state" not in module.__dict__:
        state = adopt(module, spec)
        # The pipeline opened this forward's cache context before the model was known; the shared
        # processor, a child of the model's attention modules, heard it.
        state.context = next((p.context for p in found if p.__dict__.get("context") is not None), None)
        if not compiled:
            _install_first_call_probes(module, state)
        log_once(
            f"adopt-{spec.name}",
            f"diffattn: found SparseAttnProcessor in a {type(module).__name__}; tracking its steps and grid",
        )
    for proc in found:
        _waiting.discard(proc)
    _stop_waiting()
    return None


def _install_first_call_probes(model: torch.nn.Module, state: ModelState) -> None:
    """One-shot hooks that publish the current (first) forward's grid and timestep from submodule
    inputs, for a model adopted after its forward started."""
    probes = state.spec.first_call_probes
    if not probes:
        log_once(
            f"probe-{state.spec.name}",
            f"diffattn: the first forward of this {state.spec.name} model runs its own attention "
            "(its grid is known from the second call on)",
            logging.WARNING,
        )
        return
    modules = dict(model.named_modules())
    seen: dict[str, Any] = {}

    def install(module: torch.nn.Module, names: tuple[str | None, ...], is_grid: bool) -> None:
        def hook(mod, args):
            handle.remove()
            for name, value in zip(names, args):
                if name is not None:
                    seen.setdefault(name, value)
            if is_grid and state.info is None:
                state.begin(model, dict(seen))
            elif not is_grid and state.info is not None and state.tracker.last_t is None:
                state.tracker.last_t = _timestep_value(seen.get(state.spec.timestep_arg))

        handle = module.register_forward_pre_hook(hook)

    for sub, names, is_grid in probes:
        if sub in modules:
            install(modules[sub], names, is_grid)


# ------------------------------------------------------------------------------------- interception
# The wrapped processor runs with its attention call substituted: a copy of its ``__call__`` whose
# globals map ``dispatch_attention_fn`` and ``F`` (for ``F.scaled_dot_product_attention``) to
# diffattn's hooks. Dynamo traces that copy like the original (a TorchFunctionMode around it would
# intercept every tensor method and break the graph). The hooks find the layer's handler in
# ``_current``, which the processor sets for the duration of the wrapped call. A processor whose
# ``__call__`` reaches SDPA some other way runs eagerly under ``_SDPAIntercept`` instead.
class _Current(threading.local):
    """Per thread, as two pipelines may run in two threads."""

    handler: "_Handler | None" = None


_current = _Current()


def _dispatch_hook(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
    attention_kwargs=None, *, backend=None, parallel_config=None,
):
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    handler = _current.handler
    out = None
    cp = context_config(parallel_config)
    if handler is not None and not attention_kwargs and cp is not None:
        out = attend_sharded(handler, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, cp)
        if out is not None:
            return out
    elif handler is not None and not attention_kwargs and parallel_config is None:
        b, nk = query.shape[0], key.shape[1]
        mask = handler.state.per_forward(attn_mask, ("view", b, nk), lambda m: _key_mask_view(m, b, nk))
        q, k, v = (x.transpose(1, 2) for x in (query, key, value))
        out = handler.attend(q, k, v, mask, dropout_p, is_causal, scale, enable_gqa)
    if out is None:  # not diffattn's call: the backend the processor asked for runs it
        return dispatch_attention_fn(
            query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
            enable_gqa=enable_gqa, attention_kwargs=attention_kwargs, backend=backend,
            parallel_config=parallel_config,
        )
    return out.transpose(1, 2)


def _key_mask_view(mask: torch.Tensor | None, b: int, nk: int):
    """A ``[B, Nk]`` key mask as ``[B, 1, 1, Nk]``, as diffusers' native backend reads it (else as given)."""
    if mask is not None and mask.ndim == 2 and mask.shape[0] == b and mask.shape[1] == nk:
        return mask[:, None, None]
    return mask


def _sdpa_hook(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    handler = _current.handler
    out = None
    if handler is not None:
        out = handler.attend(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    if out is None:
        args = (query, key, value)
        kwargs = dict(attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
        return handler.passthrough(F.scaled_dot_product_attention, args, kwargs) if handler is not None else (
            F.scaled_dot_product_attention(*args, **kwargs)
        )
    return out


def _module_like(name: str, source: dict) -> types.ModuleType:
    """A module (in ``sys.modules``, as Dynamo looks globals up by module name) holding a copy of
    ``source``'s globals."""
    module = types.ModuleType(name)
    module.__dict__.update({k: v for k, v in source.items() if k not in ("__name__", "__spec__", "__loader__")})
    module.__name__ = name
    sys.modules[name] = module
    return module


_functional = _module_like(f"{__name__}._functional", vars(F))
_functional.scaled_dot_product_attention = _sdpa_hook
_substituted: dict[Any, Any] = {}


def _substitute(fn: Any) -> Any:
    """``fn`` with its attention call routed to diffattn's hooks, or None if it has no such call."""
    if fn in _substituted:
        return _substituted[fn]
    code = getattr(fn, "__code__", None)
    new = None
    if code is not None and (
        "dispatch_attention_fn" in code.co_names or "scaled_dot_product_attention" in code.co_names
    ):
        scope = _rerouted_globals(fn.__globals__)
        if scope is not None:
            new = types.FunctionType(code, scope, fn.__name__, fn.__defaults__, fn.__closure__)
            new.__kwdefaults__ = fn.__kwdefaults__
            new.__qualname__ = fn.__qualname__
    _substituted[fn] = new
    return new


def _rerouted_globals(source: dict) -> dict | None:
    """One copy per module of its globals with the attention entry points replaced (None: it has none)."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    name = f"{__name__}._via.{source.get('__name__', 'unknown')}"
    if name in _rerouted:
        return _rerouted[name]
    scope = dict(source)
    changed = False
    if scope.get("dispatch_attention_fn") is dispatch_attention_fn:
        scope["dispatch_attention_fn"] = _dispatch_hook
        changed = True
    if scope.get("F") is F:
        scope["F"] = _functional
        changed = True
    _rerouted[name] = _module_like(name, scope).__dict__ if changed else None
    return _rerouted[name]


_rerouted: dict[str, dict | None] = {}


class _Prepared:
    """What calling an inner processor needs, worked out once on the host: its ``__call__`` with the
    substituted attention (None: intercept with the mode) and the keyword arguments it takes."""

    def __init__(self, inner: Any) -> None:
        self.call = _substitute(type(inner).__call__)
        self.accepts = _accepted_kwargs(inner)

    def __deepcopy__(self, memo: dict) -> "_Prepared":
        return self  # immutable: functions and names


class _SDPAIntercept(TorchFunctionMode):
    def __init__(self, handler) -> None:
        super().__init__()
        self.handler = handler

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            a = _sdpa_args(args, kwargs)
            out = self.handler.attend(
                a["query"], a["key"], a["value"], a.get("attn_mask"), a.get("dropout_p", 0.0),
                a.get("is_causal", False), a.get("scale"), a.get("enable_gqa", False),
            )
            return self.handler.passthrough(func, args, kwargs) if out is None else out
        return func(*args, **kwargs)


_SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def _sdpa_args(args: tuple, kwargs: dict) -> dict[str, Any]:
    out = dict(zip(_SDPA_PARAMS, args))
    out.update(kwargs)
    return out


def _key_padding(mask: torch.Tensor | None, b: int, n: int) -> tuple[bool, torch.Tensor | None]:
    """Turn an SDPA mask into a key-padding mask ``[B, N]``; (False, None) if it is something else."""
    if mask is None:
        return True, None
    if mask.ndim < 2 or mask.shape[-1] != n or (mask.ndim >= 2 and mask.shape[-2] != 1):
        return False, None
    if mask.ndim == 4 and mask.shape[1] != 1:
        return False, None
    flat = mask.reshape(-1, n)
    if flat.shape[0] not in (1, b):
        return False, None
    if mask.dtype == torch.bool:
        keep = flat
    else:
        finite = torch.isfinite(flat)
        # Additive masks: 0 keeps a key; -inf (or a huge negative) drops it. Anything else is a bias.
        keep = flat == 0
        dropped = (~finite) | (flat < -1e4)
        # Both facts in one read of the device.
        padding, full = torch.stack([(keep | dropped).all(), keep.all()]).tolist()
        if not padding:
            return False, None
        return True, (None if full else keep.expand(b, n))
    if bool(keep.all()):
        return True, None
    return True, keep.expand(b, n)


class SparseAttnProcessor:
    """Diffusers attention processor running a diffattn method on the core attention.

    Args:
        config: a method config (e.g. ``RadialConfig()``) or a method name.
        inner: the processor to wrap; ``None`` recreates each module's default processor.
        min_tokens: sequences shorter than this pass through to the original attention.
        method: an existing method object to share (``diffattn.apply`` shares one per model).
    """

    def __init__(
        self,
        config: MethodConfig | str | None = None,
        inner: Any = None,
        min_tokens: int = DEFAULT_MIN_TOKENS,
        method: AttentionMethod | None = None,
    ) -> None:
        if method is None:
            if config is None:
                config = "dense"
            if isinstance(config, str):
                config = make_config(config)
            if not isinstance(config, MethodConfig):
                raise TypeError(
                    f"config must be a method config (e.g. diffattn.RadialConfig()) or a method name, "
                    f"got {type(config).__name__}"
                )
            method = get_method_class(config.method)(config)
        if not isinstance(min_tokens, int) or min_tokens < 0:
            raise ValueError(f"min_tokens must be an int >= 0, got {min_tokens!r}")
        self.method = method
        self.config = method.config
        self.inner = inner
        self.min_tokens = min_tokens
        self._backend = None
        self._parallel = None
        # diffusers filters the keyword arguments of Attention.forward by the processor's __call__
        # signature: expose the wrapped processor's (or the union of the known ones).
        self.__class__ = _class_with_signature(inner)
        self._prepared = _Prepared(inner) if inner is not None else None
        if inner is None:
            # A shared processor is a (weightless) module, so that setting it makes it a child of the
            # model's attention modules: its context hook then hears the pipeline's cache context
            # before the first forward, which adopts the model.
            torch.nn.Module.__init__(self)
            self.context = None
            holder = _context_listener(self)
            if holder is not None:
                self.add_module(_HOLDER, holder)
            _wait_for_model(self)

    def __setstate__(self, state: dict) -> None:
        # A copied (or unpickled) shared processor waits for its model like a new one.
        self.__dict__.update(state)
        if self.inner is None:
            _wait_for_model(self)

    # diffusers' set_attention_backend / enable_parallelism set these on every processor.
    @property
    def _attention_backend(self):
        return self._backend

    @_attention_backend.setter
    def _attention_backend(self, value):
        self._backend = value
        if hasattr(self.inner, "_attention_backend"):
            self.inner._attention_backend = value

    @property
    def _parallel_config(self):
        return self._parallel

    @_parallel_config.setter
    def _parallel_config(self, value):
        check_parallel(self.config, context_config(value))
        self._parallel = value
        if hasattr(self.inner, "_parallel_config"):
            self.inner._parallel_config = value

    def _inner_for(self, attn: torch.nn.Module, state: ModelState | None) -> Any:
        """The processor this one wraps for ``attn``: the given one, or (shared processor) the module's
        default processor, created once and kept on the module so copies of the model carry it."""
        if self.inner is not None:
            return self.inner
        inner = attn.__dict__.get("_diffattn_inner")
        if inner is None:
            layer = getattr(attn, "_diffattn_layer", None)
            name = layer[0] if layer is not None else ""
            inner = default_processor(state.spec if state is not None else None, name, attn)
            attn._diffattn_inner = inner
            attn._diffattn_prepared = _Prepared(inner)
        if hasattr(inner, "_attention_backend"):
            inner._attention_backend = self._backend
        if self.inner is None and hasattr(inner, "_parallel_config"):
            # A default processor made here must shard like the model (enable_parallelism before or after).
            inner._parallel_config = self._parallel if self._parallel is not None else (
                state.parallel if state is not None else None
            )
        return inner

    def __repr__(self) -> str:
        inner = type(self.inner).__name__ if self.inner is not None else "default"
        return f"SparseAttnProcessor({self.config!r}, inner={inner})"

    # ------------------------------------------------------------------------------------ the call
    def __call__(self, attn: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        state = attn.__dict__.get("_diffattn_state")
        inner = self._inner_for(attn, state)
        prepared = self._prepared if self.inner is not None else attn.__dict__["_diffattn_prepared"]
        if kwargs and prepared.accepts is not None:
            kwargs = {k: v for k, v in kwargs.items() if k in prepared.accepts}
        entry = attn.__dict__.get("_diffattn_layer")
        compiling = torch.compiler.is_compiling()
        # Compiled code cannot look at the forward's state (a guard on the step); the operator does.
        if entry is None or state is None or (not compiling and state.info is None):
            return inner(attn, *args, **kwargs)
        handler = _Handler(self, state, entry, attn)
        if prepared.call is None:
            if compiling:
                raise NotImplementedError(
                    f"diffattn cannot compile around {type(inner).__name__}: its __call__ reaches "
                    "scaled_dot_product_attention other than through dispatch_attention_fn or "
                    "F.scaled_dot_product_attention. Run this model eagerly, or wrap a processor that "
                    "calls one of them."
                )
            return self._call_intercepted(inner, handler, attn, args, kwargs)
        previous = _current.handler
        _current.handler = handler
        try:
            return prepared.call(inner, attn, *args, **kwargs)
        finally:
            _current.handler = previous

    def _call_intercepted(self, inner, handler, attn, args, kwargs):
        saved = getattr(inner, "_attention_backend", None)
        if hasattr(inner, "_attention_backend"):
            inner._attention_backend = None
        try:
            with _native_backend(), _SDPAIntercept(handler):
                return inner(attn, *args, **kwargs)
        finally:
            if hasattr(inner, "_attention_backend"):
                inner._attention_backend = saved


def _user_backend(processor_backend: Any) -> Any:
    """The diffusers attention backend the user chose: the module's (``set_attention_backend``) or the
    active ``attention_backend(...)`` context's; None for the native default."""
    if processor_backend is not None:
        return processor_backend
    try:
        from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry
    except ImportError:  # pragma: no cover
        return None
    name = _AttentionBackendRegistry.get_active_backend()[0]
    return None if name == AttentionBackendName.NATIVE else name


class _Handler:
    """Takes (or declines) the attention calls of one processor call."""

    def __init__(self, proc: SparseAttnProcessor, state: ModelState, entry, attn) -> None:
        self.proc, self.state, self.entry, self.attn = proc, state, entry, attn

    def passthrough(self, func, args, kwargs):
        return _passthrough(self.proc, func, args, kwargs)

    def takes(self, n: int, dropout_p: Any, is_causal: bool) -> bool:
        """Whether diffattn runs a self-attention call over ``n`` tokens with these flags."""
        return not is_causal and float(dropout_p or 0.0) == 0.0 and n >= self.proc.min_tokens

    def attend(self, q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, heads=None):
        """The method's output for SDPA-layout ``q, k, v``, or None for a call diffattn does not take.

        ``heads`` = (start, stop, total, real) when ``q`` holds only those heads of a context-parallel
        layer (over a head axis padded to ``total``, of which the first ``real`` are the model's).
        Only shapes and flags are read here (static under compile); everything that depends on the
        step or on tensor values happens in :func:`_attend`, behind ``diffattn::attend`` when compiling.
        """
        n = q.shape[-2]
        if k.shape[-2] != n or not self.takes(n, dropout_p, is_causal):
            return None
        block_input = block_input_of(self.attn)
        if torch.compiler.is_compiling():
            return _attend_op(
                q, k, v, attn_mask, block_input, scale, bool(enable_gqa), self.state.handle, self.entry[1],
                self.state.__dict__.get("token"), None if heads is None else list(heads),
            )
        return _attend(
            self.state, self.attn, self.proc, q, k, v, attn_mask, block_input, scale, enable_gqa, heads
        )


def _passthrough(proc: SparseAttnProcessor, func, args, kwargs):
    """A call diffattn does not take: the user's diffusers backend runs it, or SDPA by default."""
    backend = _user_backend(proc._backend)
    if backend is None:
        return func(*args, **kwargs)
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    a = _sdpa_args(args, kwargs)
    q, k, v = (a[n].transpose(1, 2) for n in ("query", "key", "value"))
    out = dispatch_attention_fn(
        q, k, v, attn_mask=a.get("attn_mask"), dropout_p=a.get("dropout_p", 0.0) or 0.0,
        is_causal=a.get("is_causal", False), scale=a.get("scale"), enable_gqa=a.get("enable_gqa", False),
        backend=backend,
    )
    return out.transpose(1, 2)


def _attend(
    state: ModelState, attn, proc: SparseAttnProcessor, q, k, v, attn_mask, block_input, scale, enable_gqa,
    heads=None,
):
    """Run the layer's method on one attention call, with the current forward's step and grid
    (``heads``: this rank's (start, stop, total, real) heads under context parallelism)."""
    b, h, n, _ = q.shape
    name, index = attn.__dict__["_diffattn_layer"]
    info = state.info

    def passthrough():
        kwargs = dict(attn_mask=attn_mask, scale=scale, enable_gqa=enable_gqa)
        return _passthrough(proc, F.scaled_dot_product_attention, (q, k, v), kwargs)

    if q.device.type == "meta":
        # Shape inference (e.g. building a model on the meta device): no values to plan from.
        return q.new_empty(b, h, n, v.shape[-1])
    if info is None:  # a compiled layer called outside its model's forward
        return passthrough()
    ok, key_padding = state.key_padding(attn_mask, b, n, _key_padding)
    if not ok:
        _record(state, info, proc, name, fallback="attention mask is not a key-padding mask; ran the model's attention")
        return passthrough()
    if k.shape[1] != h:
        rep = h // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    spec = state.spec
    grid = layer_grid(info.grid, n, spec.multi_resolution)
    text_len = 0
    if grid is not None:
        text_len = n - grid[0] * grid[1] * grid[2]
        if text_len < 0:
            grid, text_len = None, 0
    row: dict[str, Any] = {}
    gather_heads, where, order = None, {}, None
    if heads is not None:
        *heads, real = (int(x) for x in heads)
        heads = tuple(heads)
        cp = context_config(proc._inner_for(attn, state)._parallel_config)
        gather_heads = head_gatherer(cp)
        start, stop = heads[0], heads[1]
        where = {"parallel": mode_name(cp), "heads": (min(start, real), min(stop, real))}
        if stop > real:
            where["padded_heads"] = stop - max(start, real)
        if heads[2] > real:  # logged here, outside any compiled graph (this runs behind diffattn::attend)
            log_once(
                f"cp-pad-{real}-{heads[2]}",
                f"diffattn: context parallelism pads the {real} attention heads to {heads[2]} with zero heads "
                f"({(heads[2] - real) / real:.0%} more attention work); a degree that divides {real} needs none",
                logging.WARNING,
            )
        if text_len:
            order, inverse = joint_order(n, text_len, cp, spec.text_first, q.device)
            q, k, v = (x[:, :, order] for x in (q, k, v))
            if key_padding is not None:
                key_padding = key_padding[:, order]
    ctx = AttnContext(
        layer=name,
        layer_index=index,
        num_layers=state.num_layers,
        grid=grid,
        text_len=text_len,
        text_first=spec.text_first,
        key_padding=key_padding,
        step=info.step,
        num_steps=info.num_steps,
        branch=info.branch,
        scale=scale,
        model=spec.name,
        capture_layouts=state.capture_layouts,
        block_input=block_input,
        latent_grid=info.grid,
        heads=heads,
        gather_heads=gather_heads,
        padded_heads=where.get("padded_heads", 0),
        record=row.update,
    )
    with state.timer(q.device) as t:
        out = proc.method.attend(q, k, v, ctx)
    if order is not None:
        out = out[:, :, inverse]
    _record(state, info, proc, name, time_ms=t, grid=grid, text_len=text_len, **where, **row)
    return out.to(q.dtype)


set_impl(_attend)


def _record(state: ModelState, info, proc: SparseAttnProcessor, name: str, **fields: Any) -> None:
    state.stats.add(
        {
            "layer": name,
            "step": info.step,
            "branch": info.branch,
            "generation": info.generation,
            "method": proc.method.name,
            **fields,
        }
    )


def _native_backend():
    try:
        from diffusers.models.attention_dispatch import AttentionBackendName, attention_backend
    except ImportError:  # pragma: no cover - older diffusers call SDPA directly
        return nullcontext()
    return attention_backend(AttentionBackendName.NATIVE)


# ------------------------------------------------------------------------------------- signatures
_KNOWN_PROCESSORS = (
    "diffusers.models.transformers.transformer_wan:WanAttnProcessor",
    "diffusers.models.transformers.transformer_hunyuan_video:HunyuanVideoAttnProcessor2_0",
    "diffusers.models.attention_processor:CogVideoXAttnProcessor2_0",
    "diffusers.models.transformers.transformer_ltx:LTXVideoAttnProcessor",
    "diffusers.models.transformers.transformer_flux:FluxAttnProcessor",
    "diffusers.models.attention_processor:AttnProcessor2_0",
)
_union_signature: inspect.Signature | None = None


def _known_union_signature() -> inspect.Signature:
    global _union_signature
    if _union_signature is None:
        import importlib

        params: dict[str, inspect.Parameter] = {}
        for path in _KNOWN_PROCESSORS:
            mod, cls = path.split(":")
            try:
                klass = getattr(importlib.import_module(mod), cls)
            except (ImportError, AttributeError):
                continue
            for p in list(inspect.signature(klass.__call__).parameters.values())[1:]:
                if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name in params:
                    continue
                if p.name == "attn":
                    params[p.name] = p.replace(kind=p.POSITIONAL_OR_KEYWORD, default=p.empty)
                else:
                    params[p.name] = p.replace(kind=p.POSITIONAL_OR_KEYWORD, default=None)
        ordered = [params.pop("attn")] + [params.pop("hidden_states")] + list(params.values())
        fixed = [p if p.default is not p.empty or i < 2 else p.replace(default=None) for i, p in enumerate(ordered)]
        _union_signature = inspect.Signature(fixed)
    return _union_signature


_signed_classes: dict[Any, type] = {}


def _class_with_signature(inner: Any) -> type:
    """A subclass of :class:`SparseAttnProcessor` (one per wrapped processor class) whose ``__call__``
    shows the wrapped processor's parameters to ``inspect.signature``. A class attribute rather than
    one on the instance: Dynamo only traces ``__call__`` found on the class."""
    key = None if inner is None else type(inner)
    cls = _signed_classes.get(key)
    if cls is None:
        base = SparseAttnProcessor.__call__
        call = types.FunctionType(base.__code__, base.__globals__, "__call__", base.__defaults__, base.__closure__)
        call.__qualname__ = base.__qualname__
        call.__signature__ = _self_first(_known_union_signature() if inner is None else inspect.signature(inner.__call__))
        bases = (SparseAttnProcessor,) if inner is not None else (SparseAttnProcessor, torch.nn.Module)
        cls = type(SparseAttnProcessor.__name__, bases, {"__call__": call, "__module__": __name__})
        _signed_classes[key] = cls
    return cls


def _self_first(sig: inspect.Signature) -> inspect.Signature:
    this = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sig.replace(parameters=[this, *sig.parameters.values()])


def _accepted_kwargs(inner: Any) -> frozenset[str] | None:
    """The keyword arguments the wrapped processor takes (None: any), as diffusers would filter them."""
    params = inspect.signature(inner.__call__).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return None
    return frozenset(params)
