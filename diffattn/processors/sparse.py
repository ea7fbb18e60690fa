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
  processor everywhere; it recreates each module's default processor to wrap, and a process-wide
  forward pre-hook adopts the model (installs the same hooks) at its first forward.

>>> import diffattn  # doctest: +SKIP
>>> pipe.transformer.set_attn_processor(diffattn.SparseAttnProcessor(diffattn.DenseConfig()))  # doctest: +SKIP
"""

from __future__ import annotations

import inspect
import itertools
import logging
import sys
import weakref
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..kernels.api import log_once
from ..methods import AttentionMethod, AttnContext, MethodConfig, get_method_class, make_config
from .blocks import watch_block_inputs
from .models import ModelSpec, default_processor, layer_grid, spec_for
from .state import ModelState

__all__ = ["SparseAttnProcessor", "adopt", "release", "state_of"]

logger = logging.getLogger("diffattn")

DEFAULT_MIN_TOKENS = 1024

_MODEL_STATE: "weakref.WeakKeyDictionary[torch.nn.Module, ModelState]" = weakref.WeakKeyDictionary()
_MODULE_STATE: "weakref.WeakKeyDictionary[torch.nn.Module, ModelState]" = weakref.WeakKeyDictionary()


# ----------------------------------------------------------------------------------- model adoption
def _attention_modules(model: torch.nn.Module):
    for name, module in model.named_modules():
        if hasattr(module, "processor") and hasattr(module, "set_processor"):
            yield name, module


def adopt(
    model: torch.nn.Module,
    spec: ModelSpec,
    scheduler: Any = None,
    num_steps: int | None = None,
    sync_timing: bool = False,
    capture_layouts: bool = False,
) -> ModelState:
    """Install diffattn's forward hooks on ``model`` (idempotent) and return its state."""
    state = _MODEL_STATE.get(model)
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
    for index, (name, module) in enumerate(targets):
        state.names[id(module)] = (name, index)
    state.num_layers = len(targets)  # type: ignore[attr-defined]
    for _, module in _attention_modules(model):
        _MODULE_STATE[module] = state

    def pre_hook(mod, args, kwargs):
        state.begin_forward(mod, args, kwargs)

    def post_hook(mod, args, output):
        state.end_forward()

    state.handles = [  # type: ignore[attr-defined]
        model.register_forward_pre_hook(pre_hook, with_kwargs=True),
        model.register_forward_hook(post_hook),
    ]
    state.block_inputs = {}  # type: ignore[attr-defined]
    state.handles += watch_block_inputs(model, state.names, state.block_inputs)  # type: ignore[attr-defined]
    _MODEL_STATE[model] = state
    return state


def release(model: torch.nn.Module) -> None:
    """Remove the hooks and state ``adopt`` installed (no-op if none)."""
    state = _MODEL_STATE.pop(model, None)
    if state is None:
        return
    for h in getattr(state, "handles", []):
        h.remove()
    for _, module in _attention_modules(model):
        if _MODULE_STATE.get(module) is state:
            del _MODULE_STATE[module]


def state_of(model: torch.nn.Module) -> ModelState | None:
    return _MODEL_STATE.get(model)


# A process-wide pre-hook lets a processor set with `set_attn_processor` find its model: at a
# supported model's first forward it adopts the model. Global pre-hooks get no kwargs, so the
# current call's kwargs are read from torch's calling frame; later calls use the model's own hook.
_global_hook = None
_generation = itertools.count()
_processor_version = 0
_checked: "weakref.WeakKeyDictionary[torch.nn.Module, int]" = weakref.WeakKeyDictionary()


def _ensure_global_hook() -> None:
    global _global_hook, _processor_version
    _processor_version = next(_generation)
    if _global_hook is None:
        _global_hook = torch.nn.modules.module.register_module_forward_pre_hook(_global_pre_hook)


def _global_pre_hook(module: torch.nn.Module, args: tuple):
    if module in _MODEL_STATE or _checked.get(module) == _processor_version:
        return None
    spec = spec_for(module)
    if spec is None:
        return None
    _checked[module] = _processor_version
    if not any(isinstance(m.processor, SparseAttnProcessor) for _, m in _attention_modules(module)):
        return None
    state = adopt(module, spec)
    frame = sys._getframe(1)
    kwargs = frame.f_locals.get("kwargs")
    state.begin_forward(module, args, kwargs if isinstance(kwargs, dict) else {})
    log_once(
        f"adopt-{spec.name}",
        f"diffattn: found SparseAttnProcessor in a {type(module).__name__}; tracking its steps and grid",
    )
    return None


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
        self._inners: "weakref.WeakKeyDictionary[torch.nn.Module, Any]" = weakref.WeakKeyDictionary()
        self._backend = None
        self._parallel = None
        # diffusers filters the keyword arguments of Attention.forward by the processor's __call__
        # signature: expose the wrapped processor's (or the union of the known ones).
        self.__call__ = _signature_proxy(self, inner)
        if inner is None:
            _ensure_global_hook()

    # diffusers' set_attention_backend / enable_parallelism set these on every processor.
    @property
    def _attention_backend(self):
        return self._backend

    @_attention_backend.setter
    def _attention_backend(self, value):
        self._backend = value
        for inner in self._all_inners():
            if hasattr(inner, "_attention_backend"):
                inner._attention_backend = value

    @property
    def _parallel_config(self):
        return self._parallel

    @_parallel_config.setter
    def _parallel_config(self, value):
        self._parallel = value
        for inner in self._all_inners():
            if hasattr(inner, "_parallel_config"):
                inner._parallel_config = value

    def _all_inners(self):
        if self.inner is not None:
            yield self.inner
        yield from list(self._inners.values())

    def _inner_for(self, attn: torch.nn.Module, state: ModelState | None) -> Any:
        if self.inner is not None:
            return self.inner
        inner = self._inners.get(attn)
        if inner is None:
            name = state.names.get(id(attn), ("", 0))[0] if state is not None else ""
            inner = default_processor(state.spec if state is not None else None, name, attn)
            if hasattr(inner, "_attention_backend"):
                inner._attention_backend = self._backend
            if hasattr(inner, "_parallel_config"):
                inner._parallel_config = self._parallel
            self._inners[attn] = inner
        return inner

    def __repr__(self) -> str:
        inner = type(self.inner).__name__ if self.inner is not None else "default"
        return f"SparseAttnProcessor({self.config!r}, inner={inner})"

    # ------------------------------------------------------------------------------------ the call
    def __call__(self, attn: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        state = _MODULE_STATE.get(attn)
        inner = self._inner_for(attn, state)
        kwargs = _filter_kwargs(inner, kwargs)
        entry = None if state is None else state.names.get(id(attn))
        info = None if state is None else state.info
        if entry is None or info is None:
            return inner(attn, *args, **kwargs)
        if self._parallel is not None:
            log_once(
                "parallel",
                "diffattn: context parallelism is active; sparse attention is skipped and the model's "
                "own attention runs",
                logging.WARNING,
            )
            return inner(attn, *args, **kwargs)
        handler = _Handler(self, state, entry, info)
        saved = getattr(inner, "_attention_backend", None)
        if hasattr(inner, "_attention_backend"):
            inner._attention_backend = None
        try:
            with _native_backend(), _SDPAIntercept(handler):
                return inner(attn, *args, **kwargs)
        finally:
            if hasattr(inner, "_attention_backend"):
                inner._attention_backend = saved


class _Handler:
    """Handles the intercepted SDPA calls of one processor call."""

    def __init__(self, proc: SparseAttnProcessor, state: ModelState, entry, info) -> None:
        self.proc, self.state, self.entry, self.info = proc, state, entry, info

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
            return func(*args, **kwargs)
        ok, key_padding = _key_padding(a.get("attn_mask"), b, n)
        if not ok:
            self._record(name, fallback="attention mask is not a key-padding mask; ran the model's attention")
            return func(*args, **kwargs)
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
            num_layers=getattr(self.state, "num_layers", 1),
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
            block_input=getattr(self.state, "block_inputs", {}).get(name),
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
