"""``SparseAttnProcessor``: replace only the core attention of a Diffusers attention module.

The processor wraps the module's own processor, so projections, qk-norm and RoPE stay the model's.
While the wrapped processor runs, a ``TorchFunctionMode`` catches its call to
``F.scaled_dot_product_attention`` — made directly (CogVideoX, UNets) or through diffusers'
``dispatch_attention_fn`` (Wan, HunyuanVideo, LTX, Flux; forced to the native backend for the
duration of the call) — and hands ``q, k, v`` with an :class:`AttnContext` to the method.

Two ways in, one mechanism:

* ``diffattn.apply(pipe, "radial", ...)`` wraps each self-attention module's processor and hooks the
  denoiser's forward to publish step, branch and grid.
* ``pipe.transformer.set_attn_processor(SparseAttnProcessor(RadialConfig(...)))`` sets one shared
  processor everywhere; it recreates each module's default processor to wrap, and adopts the model
  (installs the same hooks) at its first forward.

Either way the state lives on the model (``model._diffattn_state``, the hooks are objects pointing to
it), so ``copy.deepcopy`` gives an independent patched copy. Calls diffattn does not take run on the
user's diffusers attention backend. Context parallelism is refused (it would shard the sequence the
methods plan on).

>>> import diffattn  # doctest: +SKIP
>>> pipe.transformer.set_attn_processor(diffattn.SparseAttnProcessor(diffattn.DenseConfig()))  # doctest: +SKIP
"""

from __future__ import annotations

import inspect
import logging
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
        self.state.begin_forward(module, args, kwargs)


class _EndForward:
    def __init__(self, state: ModelState) -> None:
        self.state = state

    def __call__(self, module, args, output):
        self.state.end_forward()


def _context_listener(state: ModelState) -> torch.nn.Module | None:
    """A parameter-free child module whose diffusers ``HookRegistry`` holds a stateful hook, so that
    ``model.cache_context(name, ...)`` hands its ``CacheContext`` to ``state`` and the pipeline's
    ``_reset_stateful_cache()`` ends the generation. It lives on a child that is never called because
    a hook registered on the denoiser itself would wrap its ``forward`` in a closure that a deep copy
    cannot follow."""
    try:
        from diffusers.hooks.hooks import BaseState, HookRegistry, ModelHook, StateManager
    except ImportError:  # pragma: no cover - diffusers without hooks publishes no context
        return None

    class _Listener(StateManager):
        def __init__(self, state: ModelState) -> None:
            super().__init__(BaseState)
            self.state = state

        def set_context(self, context) -> None:
            super().set_context(context)
            self.state.context = context

    class _ContextHook(ModelHook):
        _is_stateful = True

        def __init__(self, state: ModelState) -> None:
            super().__init__()
            self.listener = _Listener(state)

        def reset_state(self, module):
            self.listener.state.tracker.reset()
            return module

    holder = _ContextHolder()
    HookRegistry.check_if_exists_or_initialize(holder).register_hook(_ContextHook(state), _CONTEXT_HOOK)
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
    for _, module in _attention_modules(model):
        module._diffattn_state = state
        module._diffattn_layer = None
    for index, (name, module) in enumerate(targets):
        module._diffattn_layer = (name, index)
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


def _global_pre_hook(module: torch.nn.Module, args: tuple):
    if not len(_waiting):  # every waiting processor was garbage-collected
        _stop_waiting()
        return None
    spec = spec_for(module)
    if spec is None:
        return None
    found = {m.processor for _, m in _attention_modules(module) if isinstance(m.processor, SparseAttnProcessor)}
    if not found:
        return None
    if "_diffattn_state" not in module.__dict__:
        state = adopt(module, spec)
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
class _SDPAIntercept(TorchFunctionMode):
    def __init__(self, handler) -> None:
        super().__init__()
        self.handler = handler

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return self.handler(func, args, kwargs)
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
        if not bool((keep | dropped).all()):
            return False, None
    keep = keep.expand(b, n)
    if bool(keep.all()):
        return True, None
    return True, keep


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
        self.__call__ = _signature_proxy(self, inner)
        if inner is None:
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
        if value is not None:
            raise NotImplementedError(_parallel_message(value))
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
        if hasattr(inner, "_attention_backend"):
            inner._attention_backend = self._backend
        return inner

    def __repr__(self) -> str:
        inner = type(self.inner).__name__ if self.inner is not None else "default"
        return f"SparseAttnProcessor({self.config!r}, inner={inner})"

    # ------------------------------------------------------------------------------------ the call
    def __call__(self, attn: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        state = attn.__dict__.get("_diffattn_state")
        inner = self._inner_for(attn, state)
        kwargs = _filter_kwargs(inner, kwargs)
        entry = attn.__dict__.get("_diffattn_layer")
        info = None if state is None else state.info
        if entry is None or info is None:
            return inner(attn, *args, **kwargs)
        handler = _Handler(self, state, entry, info, _user_backend(self._backend), attn)
        saved = getattr(inner, "_attention_backend", None)
        if hasattr(inner, "_attention_backend"):
            inner._attention_backend = None
        try:
            with _native_backend(), _SDPAIntercept(handler):
                return inner(attn, *args, **kwargs)
        finally:
            if hasattr(inner, "_attention_backend"):
                inner._attention_backend = saved


def _parallel_message(config: Any) -> str:
    return (
        "diffattn does not run under diffusers context parallelism yet "
        f"({type(config).__name__}); its sparse attention would be skipped or wrong on the sharded "
        "sequence. Call diffattn.remove(...) before enable_parallelism(...), or run diffattn on one device."
    )


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
    """Handles the intercepted SDPA calls of one processor call."""

    def __init__(self, proc: SparseAttnProcessor, state: ModelState, entry, info, backend, attn) -> None:
        self.proc, self.state, self.entry, self.info, self.attn = proc, state, entry, info, attn
        self.backend = backend

    def passthrough(self, func, args, kwargs):
        """A call diffattn does not take: the user's diffusers backend runs it, or SDPA by default."""
        if self.backend is None:
            return func(*args, **kwargs)
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        a = _sdpa_args(args, kwargs)
        q, k, v = (a[n].transpose(1, 2) for n in ("query", "key", "value"))
        out = dispatch_attention_fn(
            q, k, v, attn_mask=a.get("attn_mask"), dropout_p=a.get("dropout_p", 0.0) or 0.0,
            is_causal=a.get("is_causal", False), scale=a.get("scale"), enable_gqa=a.get("enable_gqa", False),
            backend=self.backend,
        )
        return out.transpose(1, 2)

    def __call__(self, func, args, kwargs):
        a = _sdpa_args(args, kwargs)
        q, k, v = a["query"], a["key"], a["value"]
        b, h, n, _ = q.shape
        name, index = self.entry
        if (
            a.get("is_causal", False)
            or float(a.get("dropout_p", 0.0) or 0.0) > 0.0
            or k.shape[-2] != n
            or n < self.proc.min_tokens
        ):
            return self.passthrough(func, args, kwargs)
        if q.device.type == "meta":
            # Shape inference (e.g. building a model on the meta device): no values to plan from.
            return q.new_empty(b, h, n, v.shape[-1])
        ok, key_padding = self.state.key_padding(a.get("attn_mask"), b, n, _key_padding)
        if not ok:
            self._record(name, fallback="attention mask is not a key-padding mask; ran the model's attention")
            return self.passthrough(func, args, kwargs)
        if k.shape[1] != h:
            rep = h // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        spec = self.state.spec
        grid = layer_grid(self.info.grid, n, spec.multi_resolution)
        text_len = 0
        if grid is not None:
            text_len = n - grid[0] * grid[1] * grid[2]
            if text_len < 0:
                grid, text_len = None, 0
        row: dict[str, Any] = {}
        ctx = AttnContext(
            layer=name,
            layer_index=index,
            num_layers=self.state.num_layers,
            is_self=True,
            grid=grid,
            text_len=text_len,
            text_first=spec.text_first,
            key_padding=key_padding,
            step=self.info.step,
            num_steps=self.info.num_steps,
            branch=self.info.branch,
            scale=a.get("scale"),
            model=spec.name,
            capture_layouts=self.state.capture_layouts,
            block_input=block_input_of(self.attn),
            latent_grid=self.info.grid,
            record=row.update,
        )
        with self.state.timer() as t:
            out = self.proc.method.attend(q, k, v, ctx)
        self._record(name, time_ms=t.ms, grid=grid, text_len=text_len, **row)
        return out.to(q.dtype)

    def _record(self, name: str, **fields: Any) -> None:
        self.state.stats.add(
            {
                "layer": name,
                "step": self.info.step,
                "branch": self.info.branch,
                "generation": self.info.generation,
                "method": self.proc.method.name,
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


def _signature_proxy(proc: SparseAttnProcessor, inner: Any):
    """A callable stored on the instance as ``__call__`` so ``inspect.signature(p.__call__)`` shows the
    wrapped processor's parameters; calling it runs the processor."""

    def call(*args, **kwargs):
        return type(proc).__call__(proc, *args, **kwargs)

    call.__signature__ = inspect.signature(inner.__call__) if inner is not None else _known_union_signature()
    return call


_accepted: dict[type, frozenset[str] | None] = {}


def _filter_kwargs(inner: Any, kwargs: dict) -> dict:
    """Drop keyword arguments the wrapped processor does not take (as diffusers would have)."""
    if not kwargs:
        return kwargs
    kind = type(inner)
    if kind not in _accepted:
        params = inspect.signature(inner.__call__).parameters
        var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
        _accepted[kind] = None if var_kw else frozenset(params)
    names = _accepted[kind]
    if names is None:
        return kwargs
    return {k: v for k, v in kwargs.items() if k in names}
