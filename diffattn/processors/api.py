"""``diffattn.apply / remove / stats``: one call to put a method into a pipeline, one to take it out."""

from __future__ import annotations

import re
from typing import Any, Callable, Iterable

import torch

from ..methods import MethodConfig, get_method_class, make_config
from .models import ModelSpec, spec_for, supported_models
from .sparse import DEFAULT_MIN_TOKENS, SparseAttnProcessor, _parallel_message, adopt, release, state_of
from .state import Stats

__all__ = ["apply", "remove", "stats", "denoisers", "method_of"]

_DENOISER_ATTRS = ("transformer", "transformer_2", "unet")


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
            (n, _unwrap(getattr(target, n))) for n in _DENOISER_ATTRS if getattr(target, n, None) is not None
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
        parallel = getattr(model, "_parallel_config", None)
        if getattr(parallel, "context_parallel_config", None) is not None:
            raise NotImplementedError(_parallel_message(parallel.context_parallel_config))
        plans.append((comp, model, model_spec))
    for _, model, _ in plans:
        _remove_model(model)
    for comp, model, model_spec in plans:
        originals = dict(model.attn_processors)
        method_obj = get_method_class(cfg.method)(cfg)
        new = {}
        chosen = 0
        for key, proc in originals.items():
            name = key[: -len(".processor")]
            if model_spec.is_target(name) and keep(name):
                new[key] = SparseAttnProcessor(inner=proc, min_tokens=min_tokens, method=method_obj)
                chosen += 1
            else:
                new[key] = proc
        if chosen == 0:
            raise ValueError(
                f"no self-attention layer of {type(model).__name__} matched (layers={layers!r}); "
                f"the {model_spec.name} layers match /{model_spec.self_attention}/"
            )
        model.set_attn_processor(new)
        state = adopt(
            model, model_spec, scheduler=scheduler, num_steps=num_steps, sync_timing=sync_timing,
            capture_layouts=capture_layouts,
        )
        state.methods.append(method_obj)
        state.originals = originals  # type: ignore[attr-defined]
        state.component = comp  # type: ignore[attr-defined]
    return cfg


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
