"""The Gradio page around a :class:`~diffattn.apps.demo.runner.DemoRunner`."""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import threading
from typing import Any

from .controls import FieldSpec, demo_methods, method_fields
from .limits import Limits
from .runner import DEFAULT_PROMPT, Cancelled, DemoRunner, RunResult, render_mask

__all__ = ["build_app", "TINY_PRESETS"]

# Settings offered for the embedded tiny model. "CPU speed-up" is the measured setting where attention
# dominates the run on a CPU (16,384 video tokens), so the sparse video comes out faster than dense
# there too (README, "Demo").
TINY_PRESETS: dict[str, dict[str, Any]] = {
    "quick look": {"method": "radial", "frames": 9, "height": 64, "width": 64, "steps": 10},
    "CPU speed-up": {"method": "gna", "frames": 32, "height": 64, "width": 128, "steps": 10},
}
_GENERAL = ("prompt", "method", "seed", "frames", "height", "width", "steps")


def build_app(
    pipe: Any,
    model_name: str = "tiny",
    *,
    concurrency: int = 1,
    max_queue: int = 16,
    limits: Limits | None = None,
    min_tokens: int | None = None,
    default_method: str = "adaspa",
    defaults: dict[str, Any] | None = None,
    result_ttl: int = 1800,
):
    """The Gradio app around a :class:`DemoRunner` on ``pipe``.

    A session's last result (its videos, kept for the mask views) and Gradio's copies of the files it
    served are removed ``result_ttl`` seconds after they were made, also for clients that never close
    their session (API callers send no heartbeat).

    Returns:
        ``gr.Blocks`` with ``app.diffattn_runner`` (the runner; call ``close()`` after the server stops).
        The generation is also an API endpoint ``/generate`` (inputs: prompt, method, seed, frames,
        height, width, steps, then every method's fields; outputs: dense video, sparse video, summary,
        metrics JSON, per-layer table, mask controls, mask image).
    """
    from ..._extras import need

    gr = need("gradio", "demo")

    runner = DemoRunner(pipe, model_name, limits=limits, min_tokens=min_tokens)
    lim = runner.limits
    methods = demo_methods()
    if default_method not in methods:
        raise ValueError(f"default_method={default_method!r}: choose one of {methods}")
    d = {"frames": 9, "height": 64, "width": 64, "steps": 10, "seed": 0, "prompt": DEFAULT_PROMPT}
    if not runner.is_tiny:
        d.update(frames=1 + 4 * lim.frame_step, height=480, width=832, steps=30, prompt="a cat walking on grass")
    d.update(defaults or {})

    controls: list[tuple[str, FieldSpec, Any]] = []
    groups = {}
    if result_ttl < 1:
        raise ValueError(f"result_ttl={result_ttl} must be at least 1 second")
    cache_sweep = (max(1, min(60, result_ttl // 2)), result_ttl)  # (every, older than) in seconds
    with gr.Blocks(title="diffattn demo", analytics_enabled=False, delete_cache=cache_sweep) as app:
        gr.Markdown(
            f"# diffattn: dense vs sparse attention\nModel: `{model_name}` · the same prompt and seed are "
            "generated with the model's own attention and with the chosen method."
        )
        with gr.Row():
            with gr.Column(scale=1, min_width=320):
                prompt = gr.Textbox(label="prompt", value=d["prompt"], lines=2, max_length=1000, elem_id="prompt")
                presets = {k: p for k, p in TINY_PRESETS.items() if p["method"] in methods} if runner.is_tiny else {}
                preset = gr.Dropdown(list(presets), value=None, label="preset", elem_id="preset",
                                     visible=bool(presets), info="CPU speed-up: where attention dominates on a CPU")
                method = gr.Dropdown(methods, value=default_method, label="method", elem_id="method")
                for m in methods:
                    specs, hidden = method_fields(m)
                    with gr.Accordion(f"{m} settings", open=False, visible=(m == default_method)) as group:
                        for s in specs:
                            controls.append((m, s, _control(gr, s)))
                        if hidden:
                            gr.Markdown(f"Not settable here (defaults kept): {', '.join(hidden)}")
                    groups[m] = group
                seed = gr.Number(label="seed", value=d["seed"], precision=0, minimum=0, elem_id="seed")
                frames = gr.Slider(1, lim.max_frames, value=d["frames"], step=lim.frame_step, label="frames",
                                   elem_id="frames")
                with gr.Row():
                    height = gr.Slider(lim.min_size, lim.max_size, value=d["height"], step=lim.size_multiple,
                                       label="height", elem_id="height")
                    width = gr.Slider(lim.min_size, lim.max_size, value=d["width"], step=lim.size_multiple,
                                      label="width", elem_id="width")
                steps = gr.Slider(1, lim.max_steps, value=d["steps"], step=1, label="steps", elem_id="steps")
                with gr.Row():
                    run_btn = gr.Button("Generate", variant="primary", elem_id="generate")
                    stop_btn = gr.Button("Stop", variant="stop", elem_id="stop")
            with gr.Column(scale=2):
                with gr.Row():
                    dense_out = gr.Video(label="dense", format="mp4", autoplay=True, loop=True,
                                         elem_id="dense-video", interactive=False)
                    sparse_out = gr.Video(label="sparse", format="mp4", autoplay=True, loop=True,
                                          elem_id="sparse-video", interactive=False)
                summary_md = gr.Markdown(elem_id="summary")
                metrics_json = gr.JSON(label="metrics", visible=False)
                table = gr.Dataframe(
                    headers=["layer", "calls", "density", "recall", "searches", "cache hits", "attention ms"],
                    label="per layer (sparse run)", interactive=False, wrap=True,
                )
                with gr.Row():
                    layer_dd = gr.Dropdown([], label="layer", interactive=True)
                    head_dd = gr.Dropdown([], label="head", interactive=True)
                    step_dd = gr.Dropdown([], label="step", interactive=True)
                mask_img = gr.Image(label="block mask", type="numpy", format="png", interactive=False,
                                    elem_id="mask-image")
        state = gr.State(None, delete_callback=runner.discard, time_to_live=result_ttl)

        def show_fields(selected: str):
            return [gr.Accordion(visible=(m == selected)) for m in methods]

        method.change(show_fields, method, [groups[m] for m in methods], api_visibility="private")

        def apply_preset(name: str | None):
            if name not in presets:
                return [gr.update()] * 5
            p = presets[name]
            return [gr.update(value=p[key]) for key in ("method", "frames", "height", "width", "steps")]

        preset.input(apply_preset, preset, [method, frames, height, width, steps], api_visibility="private")

        n_general = len(_GENERAL)

        async def on_generate(previous, *values, progress=gr.Progress()):
            general = dict(zip(_GENERAL, values[:n_general]))
            chosen = general["method"]
            fields = {s.name: v for (m, s, _), v in zip(controls, values[n_general:]) if m == chosen}
            try:
                req = runner.request(general["prompt"], chosen, fields, general["seed"], general["frames"],
                                     general["height"], general["width"], general["steps"])
            except ValueError as e:
                raise gr.Error(str(e), print_exception=False) from None
            cancel = threading.Event()
            progress(0.0, desc="starting")
            # Gradio finds the event a progress update belongs to through context variables, which an
            # executor thread does not inherit: run the work inside a copy of this context.
            context = contextvars.copy_context()
            work = asyncio.get_running_loop().run_in_executor(
                None, context.run, lambda: runner.generate(req, lambda f, text: progress(f, desc=text), cancel)
            )
            try:
                result = await asyncio.shield(work)
            except asyncio.CancelledError:
                # The worker stops at its next step and removes its files; wait for that so the next run
                # finds the pipeline restored.
                cancel.set()
                await asyncio.wait([work])
                if not work.cancelled() and work.exception() is None:
                    runner.discard(work.result())  # finished just before the cancel: nobody will show it
                raise
            except Cancelled:
                raise gr.Error("cancelled", print_exception=False) from None
            except ValueError as e:
                raise gr.Error(str(e), print_exception=False) from None
            runner.discard(previous)
            # a session keeps its result for the mask views; the decoded frames are not needed any more
            result.dense_frames = result.sparse_frames = None
            return _outputs(gr, runner, result)

        # Named API parameters (``method_field``) instead of positional ones, for gradio_client users.
        params = [inspect.Parameter("previous", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        params += [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in _GENERAL]
        params += [inspect.Parameter(f"{m}_{s.name}", inspect.Parameter.POSITIONAL_OR_KEYWORD) for m, s, _ in controls]
        params.append(inspect.Parameter("progress", inspect.Parameter.KEYWORD_ONLY, default=gr.Progress()))
        on_generate.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]

        outputs = [dense_out, sparse_out, summary_md, metrics_json, table, layer_dd, head_dd, step_dd, mask_img,
                   state]
        gen = run_btn.click(
            on_generate, [state, prompt, method, seed, frames, height, width, steps, *(c for _, _, c in controls)],
            outputs, api_name="generate", concurrency_limit=concurrency, concurrency_id="generate",
        )
        stop_btn.click(None, None, None, cancels=[gen])

        def on_mask(result, layer, head, step):
            if result is None or layer is None or head is None or step is None:
                return None
            try:
                return render_mask(result, layer, int(head), int(step), runner.root)
            except ValueError as e:
                raise gr.Error(str(e), print_exception=False) from None

        for dd in (layer_dd, head_dd, step_dd):
            dd.input(on_mask, [state, layer_dd, head_dd, step_dd], mask_img, api_visibility="private")

    # Gradio copies every returned file into its cache; keep that cache inside the runner's folder so
    # closing the runner removes it too.
    cache = str(runner.root / "gradio")
    for block in (app, *app.blocks.values()):
        block.GRADIO_CACHE = cache
    app.queue(max_size=max_queue, default_concurrency_limit=concurrency)
    app.diffattn_runner = runner  # type: ignore[attr-defined]
    return app


def _control(gr, s: FieldSpec):
    info = s.info or None
    if s.kind == "bool":
        return gr.Checkbox(value=s.default, label=s.name, info=info)
    if s.kind == "choice":
        return gr.Dropdown(list(s.choices), value=s.default, label=s.name, info=info)
    if s.kind == "int":
        return gr.Number(value=s.default, label=s.name, info=info, precision=0)
    if s.kind == "float":
        return gr.Number(value=s.default, label=s.name, info=info)
    placeholder = "empty = None" if s.kind == "optional_int" else "comma-separated"
    return gr.Textbox(value=s.default, label=s.name, info=info, placeholder=placeholder)


def _outputs(gr, runner: DemoRunner, result: RunResult) -> list[Any]:
    mask_steps = result.mask_steps()
    masked_layers = [l for l in result.layers if any((l, s) in result.masks for s in mask_steps)]
    layer = masked_layers[0] if masked_layers else (result.layers[0] if result.layers else None)
    step = mask_steps[-1] if mask_steps else (result.steps[-1] if result.steps else None)
    image = render_mask(result, layer, 0, step, runner.root) if layer is not None and step is not None else None
    return [
        str(result.dense_video),
        str(result.sparse_video),
        result.markdown(),
        result.metrics(),
        result.table(),
        gr.Dropdown(choices=result.layers, value=layer),
        gr.Dropdown(choices=list(range(result.num_heads)), value=0),
        gr.Dropdown(choices=result.steps, value=step),
        image,
        result,
    ]
