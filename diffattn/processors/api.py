"""``diffattn.apply / remove / stats``: one call to put a method into a pipeline, one to take it out."""

from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Any, Callable, Iterable

import torch

from ..methods import MethodConfig, get_method_class, make_config
from .models import ModelSpec, spec_for, supported_models
from .parallel import check_parallel, context_config
from .sparse import DEFAULT_MIN_TOKENS, SparseAttnProcessor, adopt, release, state_of
from .state import ModelState, Stats

__all__ = [
    "apply",
    "remove",
    "stats",
    "denoisers",
    "method_of",
    "install_processors",
    "restore_processors",
    "denoising_step",
]

DENOISER_ATTRS = ("transformer", "transformer_2", "unet")


def _is_pipeline(obj: Any) -> bool:
    return hasattr(obj, "components") and isinstance(getattr(obj, "components", None), dict)


def _unwrap(model: Any) -> Any:
    """The model inside ``torch.compile(model)``: diffattn patches it, and the compiled wrapper (which
    calls it) picks the patch up."""
    while isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        model = model._orig_mod
    return model


def denoisers(target: Any) -> list[tuple[str, torch.nn.Module]]:
    """The attention-bearing denoiser models of a pipeline, or ``[("model", target)]`` for a model."""
    if _is_pipeline(target):
        found = [
            (n, _unwrap(getattr(target, n))) for n in DENOISER_ATTRS if getattr(target, n, None) is not None
        ]
        if not found:
            raise ValueError(
                f"{type(target).__name__} has no transformer/transformer_2/unet component to patch"
            )
        return found
    target = _unwrap(target)
    if isinstance(target, torch.nn.Module) and hasattr(target, "set_attn_processor"):
        return [("model", target)]
    raise TypeError(
        "diffattn needs a Diffusers pipeline (with a transformer or unet) or a Diffusers denoiser model "
        f"(a ModelMixin with attention processors), got {type(target).__name__}"
    )


def _layer_filter(layers: Any) -> Callable[[str], bool]:
    if layers is None:
        return lambda name: True
    if isinstance(layers, str):
        pattern = re.compile(layers)
        return lambda name: pattern.search(name) is not None
    if callable(layers):
        return layers
    if isinstance(layers, Iterable):
        wanted = set(layers)
        return lambda name: name in wanted
    raise TypeError(f"layers must be None, a regex, a list of module names or a callable, got {layers!r}")


def apply(
    target: Any,
    method: str | MethodConfig = "dense",
    config: MethodConfig | dict | None = None,
    *,
    layers: Any = None,
    min_tokens: int = DEFAULT_MIN_TOKENS,
    spec: ModelSpec | None = None,
    num_steps: int | None = None,
    sync_timing: bool = False,
    capture_layouts: bool = False,
    **fields: Any,
) -> MethodConfig:
    """Install ``method`` on every self-attention layer of a pipeline's denoiser(s).

    Args:
        target: a Diffusers pipeline or denoiser model (Wan, HunyuanVideo, CogVideoX, LTX-Video, Flux,
            UNet2DConditionModel; others with ``spec=``).
        method: a method name from ``diffattn.methods()`` or a config object.
        config: the method's config object or a dict of its fields; ``**fields`` override fields.
        layers: restrict to some self-attention modules (regex, list of names, or predicate).
        min_tokens: shorter sequences keep the model's attention.
        spec: a :class:`~diffattn.processors.models.ModelSpec` for a model outside the table.
        num_steps: steps per generation when no pipeline scheduler tells (default 50).
        sync_timing: time each attention on the host between two CUDA synchronisations (its host
            work included, at the price of a stall per call). By default a GPU call is timed by CUDA
            events (its device time, read when ``stats`` is read) and a CPU call by the host clock.
        capture_layouts: keep each sparse call's block mask (bool ``[B|1, H|1, Mq, Mk]``, CPU) in its
            ``stats`` row under ``"block_mask"`` — for plots; costs host memory.

    Returns:
        The method's config. Applying again replaces the previous method cleanly.

    >>> import diffattn  # doctest: +SKIP
    >>> diffattn.apply(pipe, "radial", decay_factor=0.2)  # doctest: +SKIP
    """
    if isinstance(method, MethodConfig):
        if config is not None:
            raise TypeError("pass either a config object as `method` or `config=`, not both")
        config, method = method, method.method
    cfg = make_config(method, config, **fields)
    keep = _layer_filter(layers)
    models = denoisers(target)
    scheduler = getattr(target, "scheduler", None) if _is_pipeline(target) else None
    plans = []
    for comp, model in models:
        model_spec = spec if spec is not None else spec_for(model)
        if model_spec is None:
            raise ValueError(
                f"{type(model).__name__} is not a supported model; supported: {supported_models()}. "
                "To run anyway, describe it with spec=diffattn.ModelSpec(...) (which modules are "
                "self-attention, where text sits, how the grid follows from the inputs)."
            )
        check_parallel(cfg, context_config(getattr(model, "_parallel_config", None)))
        plans.append((comp, model, model_spec))
    for _, model, _ in plans:
        _remove_model(model)
    for comp, model, model_spec in plans:
        method_obj = get_method_class(cfg.method)(cfg)
        new = {
            key: SparseAttnProcessor(inner=proc, min_tokens=min_tokens, method=method_obj)
            for key, proc in model.attn_processors.items()
            if model_spec.is_target(key[: -len(".processor")]) and keep(key[: -len(".processor")])
        }
        if not new:
            raise ValueError(
                f"no self-attention layer of {type(model).__name__} matched (layers={layers!r}); "
                f"the {model_spec.name} layers match /{model_spec.self_attention}/"
            )
        state = install_processors(
            model, new, model_spec, scheduler=scheduler, num_steps=num_steps, sync_timing=sync_timing,
            capture_layouts=capture_layouts,
        )
        state.methods.append(method_obj)
        state.component = comp  # type: ignore[attr-defined]
    return cfg


def install_processors(
    model: torch.nn.Module, replace: dict[str, Any], spec: ModelSpec | None = None, **adopt_args: Any
) -> ModelState:
    """Set ``replace`` (processor key -> processor; other modules keep theirs) on ``model`` and adopt
    it: the way every diffattn processor goes in (``apply``, FateZero, IR-Diffusion).

    On a model without diffattn, :func:`remove` (or :func:`restore_processors`) later restores the
    processors found here. On a model that already carries diffattn, the new processors share its
    state and schedule, and :func:`restore_processors` puts back the ones they covered; ``adopt_args``
    (``scheduler``, ``num_steps``, ``sync_timing``, ``capture_layouts``) apply to a new state only.

    Returns:
        The model's :class:`~diffattn.processors.state.ModelState`.
    """
    spec = spec if spec is not None else spec_for(model)
    if spec is None:
        raise ValueError(
            f"{type(model).__name__} is not a supported model; supported: {supported_models()}. "
            "Describe it with spec=diffattn.ModelSpec(...)"
        )
    current = dict(model.attn_processors)
    unknown = sorted(set(replace) - set(current))
    if unknown:
        raise ValueError(
            f"replace names {unknown}, which are no processor keys of {type(model).__name__}; "
            "use keys of model.attn_processors"
        )
    state = state_of(model)
    if state is not None:
        state.covered.append(current)
    model.set_attn_processor({**current, **replace})
    if state is None:
        state = adopt(model, spec, **adopt_args)
        state.originals = current
    return state


def restore_processors(model: torch.nn.Module) -> None:
    """Undo the latest :func:`install_processors` on ``model``: the processors it covered come back,
    and after the first one diffattn leaves the model as :func:`remove` does (no-op without diffattn)."""
    state = state_of(model)
    if state is None:
        return
    if state.covered:
        model.set_attn_processor(state.covered.pop())
    else:
        _remove_model(model)


@contextmanager
def denoising_step(model: torch.nn.Module, step_index: int, num_inference_steps: int, name: str = "cond"):
    """diffusers' ``cache_context`` for a denoising loop of diffattn's own: the calls inside are step
    ``step_index`` of ``num_inference_steps``, branch ``name`` (``"cond_uncond"`` for a batched CFG
    call). Denoisers without ``cache_context`` (UNets) get the same context on their diffattn state."""
    if hasattr(model, "cache_context"):
        with model.cache_context(name, step_index=step_index, num_inference_steps=num_inference_steps):
            yield
        return
    from diffusers.hooks.hooks import CacheContext

    state = state_of(model)
    if state is None:
        raise RuntimeError(f"{type(model).__name__} carries no diffattn processors; install them first")
    state.context = CacheContext(name, step_index=step_index, num_inference_steps=num_inference_steps)
    try:
        yield
    finally:
        state.context = None


def _remove_model(model: torch.nn.Module) -> None:
    state = state_of(model)
    originals = getattr(state, "originals", None) if state is not None else None
    if originals is not None:
        model.set_attn_processor(originals)
    else:
        procs = dict(model.attn_processors)
        if any(isinstance(p, SparseAttnProcessor) for p in procs.values()):
            restored = {}
            modules = dict(model.named_modules())
            for key, proc in procs.items():
                if isinstance(proc, SparseAttnProcessor):
                    module = modules[key[: -len(".processor")]]
                    proc = proc._inner_for(module, state) if proc.inner is None else proc.inner
                    module.__dict__.pop("_diffattn_inner", None)
                    module.__dict__.pop("_diffattn_prepared", None)
                restored[key] = proc
            model.set_attn_processor(restored)
    release(model)


def remove(target: Any) -> None:
    """Restore the processors that were in place before ``apply`` (the same objects) and drop hooks."""
    for _, model in denoisers(target):
        _remove_model(model)


def stats(target: Any) -> Stats:
    """Per-call statistics (layer, step, branch, density, time, searches, cache hits, fallbacks).

    ``stats(pipe).summary()`` aggregates per layer; ``stats(pipe).reset()`` clears. For pipelines with
    two denoisers (Wan 2.2) the rows of both are returned, each tagged with its ``component``.
    """
    found = [(comp, state_of(model)) for comp, model in denoisers(target)]
    found = [(c, s) for c, s in found if s is not None]
    if not found:
        raise ValueError("no diffattn method is installed on this object; call diffattn.apply first")
    if len(found) == 1:
        return found[0][1].stats
    merged = Stats()
    for comp, s in found:
        for row in s.stats.rows:
            merged.add({"component": comp, **row})
    return merged


def method_of(target: Any, component: str | None = None) -> Any:
    """The method object ``apply`` installed (e.g. to call ``save_calibration`` on PARO).

    For pipelines with two denoisers (Wan 2.2) name the ``component`` ("transformer", "transformer_2").
    """
    found = [(comp, state_of(model)) for comp, model in denoisers(target)]
    found = [(c, s) for c, s in found if s is not None and s.methods]
    if component is not None:
        found = [(c, s) for c, s in found if c == component]
    if not found:
        raise ValueError("no diffattn method is installed on this object; call diffattn.apply first")
    if len(found) > 1:
        raise ValueError(
            f"several denoisers carry a method ({[c for c, _ in found]}); pass component= to choose one"
        )
    return found[0][1].methods[-1]
