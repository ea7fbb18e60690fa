"""PAROAttention as a method: online per-head reordering calibration, static block masks, optional
INT8/INT4 quantized attention, and calibration files that let a second run skip calibration.

Schedule (steps of a 50-step run, scaled to the run's ``num_steps``): dense before
``calibration_steps[0]``; at each calibration step, one dense pass (this step's output) gives the LSE
and :func:`diffattn.patterns.paro.calibrate_paro` picks every head's axis order and block mask; until
the next calibration step those are used. The default ``(5, 25)`` gives the first and second halves
of the run separate masks, as the paper does. Video tokens are permuted per head into the chosen
order, attended block-sparsely (quantized when ``qk_bits``/``pv_bits`` are
set), and permuted back — exactly. Text tokens are handled by :class:`VideoSparseMethod`.

Calibration is keyed by (layer, branch, phase) and depends only on the latent grid, head count and
token count — not on batch size or text length — so one calibration serves any batch. Online
calibrations are per-run state: ``reset()`` (called at every new generation) forgets them, so save
them after the run that made them; a method built with ``PAROConfig(calibration=path)`` reloads the
file on every reset instead. After :func:`diffattn.apply` the method object is
``diffattn.method_of(model)``.

>>> import torch, tempfile, os
>>> from diffattn.methods import AttnContext
>>> cfg = PAROConfig(block_size=16, density=0.5, calibration_steps=(0,), backend="torch")
>>> method = PAROMethod(cfg)
>>> q = k = v = torch.randn(1, 2, 2 * 4 * 8, 16)
>>> _ = method.attend(q, k, v, AttnContext(layer="l0", grid=(2, 4, 8), step=0, num_steps=4))
>>> path = os.path.join(tempfile.mkdtemp(), "paro.pt")
>>> method.save_calibration(path)
>>> again = PAROMethod(cfg.replace(calibration=path))
>>> again.state.orders(("l0", 0, 0)) == method.state.orders(("l0", 0, 0))
True
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

from ..kernels import BlockSparseLayout, block_sparse_attention
from ..patterns import check_block_size
from ..patterns.paro import AXIS_ORDERS, calibrate_paro, head_permutations, inverse_permutation, permute_heads
from .base import AttnContext, Drawing, MethodConfig, Variant, register_method
from .sparse import Backend, VideoSparseMethod, kernel_attention

__all__ = ["PAROConfig", "PAROMethod", "PAROState"]

_FORMAT = "diffattn-paro-calibration"
_VERSION = 1
# Config fields a calibration depends on; a file made with other values is refused.
_CALIBRATION_FIELDS = ("density", "block_size", "orders", "order_recall", "calibration_steps")


@dataclass(frozen=True)
class PAROConfig(MethodConfig):
    """PAROAttention. Defaults follow the paper where it has one.

    Attributes:
        density: fraction of ``block x block`` tiles each head keeps (after reordering). Paper: 0.2–0.5;
            0.5 here (its near-lossless setting).
        calibration_steps: steps (of 50, scaled to the run) at which orders and masks are calibrated
            online; dense before the first; each calibration is used until the next. Paper: offline
            calibration, first half of the steps with its own masks and the second half sharing one —
            (5, 25) here, one calibration in each half.
        order_recall: mass level at which the 6 axis orders are compared (the order needing the fewest
            tiles to hold this much of the head's mass wins). Not in the paper; 0.9.
        orders: candidate axis orders of (F, H, W); ``("FHW",)`` disables reordering. Paper: all 6.
        qk_bits: 8 (or 4) for integer Q·Kᵀ with per-block scales, None for the input precision.
            Paper: 8.
        pv_bits: 8 or 4 for P quantized in ``block x block`` tiles for P·V, None for the input
            precision. Paper: 8 (INT4 as the aggressive setting). With ``qk_bits`` set, the Triton
            backend rounds P online against the running row max
            (``naive_quant.online_quantized_attention``), the others against the final row max;
            both stay within their documented error bounds.
        calibration: path of a file written by ``PAROMethod.save_calibration``; when set, no
            calibration runs and a missing or incompatible entry is an error. Default None.
        block_size: tile size (tokens) of the masks and the kernel. Paper: 64.
        backend: kernel backend: "auto" (Triton on CUDA, else PyTorch), "triton", "torch" or "flex".
    """

    density: float = 0.5
    calibration_steps: tuple[int, ...] = (5, 25)
    order_recall: float = 0.9
    orders: tuple[str, ...] = AXIS_ORDERS
    qk_bits: int | None = None
    pv_bits: int | None = None
    calibration: str | None = None
    block_size: int = 64
    backend: Backend = "auto"

    def validate(self) -> None:
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"PAROConfig.density must be in (0, 1] (paper: 0.2-0.5), got {self.density}")
        steps = list(self.calibration_steps)
        if not steps or any(s < 0 for s in steps) or steps != sorted(set(steps)):
            raise ValueError(
                f"PAROConfig.calibration_steps must be increasing steps >= 0 (default [5, 25]), got {steps}"
            )
        if not 0.0 < self.order_recall <= 1.0:
            raise ValueError(f"PAROConfig.order_recall must be in (0, 1], got {self.order_recall}")
        bad = [o for o in self.orders if o not in AXIS_ORDERS]
        if bad or not self.orders:
            raise ValueError(f"PAROConfig.orders must be a non-empty subset of {list(AXIS_ORDERS)}, got {bad}")
        if self.qk_bits not in (None, 4, 8):
            raise ValueError(f"PAROConfig.qk_bits must be 8, 4 or None, got {self.qk_bits}")
        if self.pv_bits not in (None, 4, 8):
            raise ValueError(f"PAROConfig.pv_bits must be 8, 4 or None, got {self.pv_bits}")
        quantized = self.qk_bits is not None or self.pv_bits is not None
        if quantized and self.backend == "flex":
            raise ValueError("PAROConfig.backend='flex' has no quantized path; use 'auto', 'triton' or 'torch'")
        if self.backend == "triton" and self.qk_bits is None and self.pv_bits is not None:
            raise ValueError(
                "PAROConfig.backend='triton' quantizes P only together with Q·Kᵀ: set qk_bits=8 or use 'torch'"
            )
        check_block_size(self.block_size, "PAROConfig.block_size")


@dataclass
class _Calibration:
    grid: tuple[int, int, int]
    heads: int
    orders: list[str]
    mask: torch.Tensor  # bool [H, Mq, Mk], on CPU
    recall: float = float("nan")
    shard: tuple[int, int, int] | None = None  # heads (start, stop, total) when calibrated on one rank's heads
    _device_cache: dict = field(default_factory=dict, repr=False)

    def head_slice(self, heads: tuple[int, int, int]) -> "_Calibration":
        """Heads ``start:stop`` of this calibration (a rank's share under context parallelism), kept."""
        part = self._device_cache.get(heads)
        if part is None:
            start, stop, _ = heads
            part = self._device_cache[heads] = _Calibration(
                self.grid, stop - start, self.orders[start:stop], self.mask[start:stop], self.recall, heads
            )
        return part

    def real_density(self, heads: int) -> float:
        """Density of the first ``heads`` heads' masks (a rank's model heads, its zero padding left out)."""
        key = ("density", heads)
        if key not in self._device_cache:
            self._device_cache[key] = float(self.mask[:heads].float().mean())
        return self._device_cache[key]

    def plan(self, device: torch.device, block: int) -> tuple[torch.Tensor, torch.Tensor, BlockSparseLayout]:
        """Permutations, inverses and the kernel layout on ``device`` (built once per device)."""
        if device not in self._device_cache:
            perms = head_permutations(self.grid, self.orders, device)
            n = perms.shape[-1]
            layout = BlockSparseLayout.from_block_mask(self.mask[None].to(device), block, block, n, n)
            self._device_cache[device] = (perms, inverse_permutation(perms), layout)
        return self._device_cache[device]


@dataclass
class PAROState:
    """Calibrations per (layer, branch, phase); ``loaded`` when they came from a file."""

    entries: dict[tuple[str, int, int], _Calibration] = field(default_factory=dict)
    loaded: str | None = None
    calibrations: int = 0
    rebuilds: int = 0

    def reset(self) -> None:
        self.entries.clear()
        self.loaded = None
        self.calibrations = 0
        self.rebuilds = 0

    def orders(self, key: tuple[str, int, int]) -> list[str]:
        return list(self.entries[key].orders)

    def mask(self, key: tuple[str, int, int]) -> torch.Tensor:
        return self.entries[key].mask.clone()


@register_method
class PAROMethod(VideoSparseMethod):
    """Per-head reordered block-sparse (optionally quantized) attention with online calibration."""

    name = "paro"
    config_cls = PAROConfig
    state_cls = PAROState
    drawing = Drawing("paro", "PARO's per-head permutation and block mask on synthetic attention")
    benchmarks = {
        "quality": tuple(Variant({"density": d}, f"d={d}") for d in (0.2, 0.3, 0.5))
        + tuple(Variant({"density": 0.5, "qk_bits": 8, "pv_bits": pv}, f"d=0.5 int8/int{pv}") for pv in (8, 4)),
    }
    event_steps_field = "calibration_steps"

    @classmethod
    def padded_heads_refusal(cls, config):
        if config.calibration is not None:
            return ("a calibration file holds the model's heads, not the padded ones; calibrate online (no "
                    "PAROConfig.calibration) or use a degree that divides the head count")
        return None
    small_example = {"density": 0.4, "calibration_steps": (0, 25), "block_size": 16, "backend": "torch"}
    lossless_example = {**small_example, "density": 1.0}

    def reset(self) -> None:
        super().reset()
        if self.config.calibration is not None:
            self.load_calibration(self.config.calibration)

    @property
    def stats(self) -> dict[tuple[str, int, int], dict[str, Any]]:
        return {
            key: {"orders": list(c.orders), "density": float(c.mask.float().mean()), "recall": c.recall}
            for key, c in self.state.entries.items()
        }

    def use_dense(self, ctx: AttnContext) -> bool:
        return ctx.step < ctx.scaled_step(self.config.calibration_steps[0])

    def phase(self, ctx: AttnContext) -> int:
        """Index of the calibration in force at this step (the last calibration step reached)."""
        steps = [ctx.scaled_step(s) for s in self.config.calibration_steps]
        return max([i for i, s in enumerate(steps) if s <= ctx.step], default=0)

    # ------------------------------------------------------------------------------------ attention
    def video_attention(self, q, k, v, ctx):
        cfg = self.config
        b, h, n, d = q.shape
        key = (ctx.layer, ctx.branch, self.phase(ctx))
        grid = tuple(int(g) for g in ctx.grid)
        c = self.state.entries.get(key)
        if c is not None and ctx.heads is not None and c.heads == ctx.heads[2] and c.heads != h:
            c = c.head_slice(ctx.heads)
        if c is not None and (c.grid != grid or c.heads != h):
            if self.state.loaded:
                raise ValueError(
                    f"calibration file {self.state.loaded!r} was made for grid {c.grid} with {c.heads} heads "
                    f"at layer {ctx.layer!r}, but this call has grid {grid} with {h} heads; run once "
                    "without PAROConfig.calibration to calibrate for this shape and save again"
                )
            del self.state.entries[key]
            self.state.rebuilds += 1
            c = None
        if c is None:
            if self.state.loaded:
                raise ValueError(
                    f"calibration file {self.state.loaded!r} has no entry for layer {ctx.layer!r}, branch "
                    f"{ctx.branch}, phase {key[2]}; it was saved from a run with other layers, branches or "
                    "calibration steps — recalibrate without PAROConfig.calibration"
                )
            return self._calibrate(q, k, v, ctx, key, grid)
        perms, inv, layout = c.plan(q.device, cfg.block_size)
        qp, kp, vp = (permute_heads(t, perms) for t in (q, k, v))
        if cfg.qk_bits is None and cfg.pv_bits is None:
            op, lsep = kernel_attention(qp, kp, vp, layout, ctx.scale, cfg.backend)
        else:
            op, lsep = block_sparse_attention(
                qp, kp, vp, layout, ctx.scale, backend=cfg.backend, qk_bits=cfg.qk_bits, pv_bits=cfg.pv_bits
            )
        density = layout.density if not ctx.padded_heads else c.real_density(h - ctx.padded_heads)
        ctx.record(density=density, search=False, cache_hit=True)
        return permute_heads(op, inv), permute_heads(lsep, inv)

    def _calibrate(self, q, k, v, ctx, key, grid):
        cfg = self.config
        n = q.shape[2]
        dense = BlockSparseLayout.dense(1, 1, n, n, cfg.block_size, cfg.block_size, q.device)
        o, lse = kernel_attention(q, k, v, dense, ctx.scale, cfg.backend)
        orders, mask, info = calibrate_paro(
            q, k, lse, grid, cfg.density, cfg.block_size, cfg.orders, cfg.order_recall, ctx.scale, cfg.backend
        )
        # statistics of the model's heads (a rank's zero padding heads left out)
        recall = float(ctx.real_heads(info["recall"][None]).mean())  # recall, mask: per head, [H], [H, Mq, Mk]
        self.state.entries[key] = _Calibration(grid, q.shape[1], orders, mask.cpu(), recall, ctx.heads)
        self.state.calibrations += 1
        ctx.record(
            density=1.0, planned_density=float(ctx.real_heads(mask[None]).float().mean()), recall=recall, search=True,
            search_kind="calibration", cache_hit=False,
        )
        return o, lse

    # ------------------------------------------------------------------------------- calibration I/O
    def _config_fields(self) -> dict[str, Any]:
        d = self.config.to_dict()
        return {f: d[f] for f in _CALIBRATION_FIELDS}

    def save_calibration(self, path: str | os.PathLike) -> None:
        """Write every calibration of this run (orders and masks per layer, branch, phase) to ``path``."""
        if not self.state.entries:
            raise ValueError(
                "nothing to save: no calibration has run yet; run the pipeline past a calibration step "
                f"(PAROConfig.calibration_steps={list(self.config.calibration_steps)}) first"
            )
        if any(c.shard is not None for c in self.state.entries.values()):
            raise ValueError(
                "these calibrations cover only this rank's heads (they ran under context parallelism); "
                "calibrate on one device to save a file, which then loads under context parallelism too"
            )
        entries = [
            {
                "layer": layer, "branch": branch, "phase": phase, "grid": list(c.grid), "heads": c.heads,
                "orders": list(c.orders), "mask": c.mask.clone(), "recall": c.recall,
            }
            for (layer, branch, phase), c in self.state.entries.items()
        ]
        blob = {"format": _FORMAT, "version": _VERSION, "config": self._config_fields(), "entries": entries}
        torch.save(blob, os.fspath(path))

    def load_calibration(self, path: str | os.PathLike) -> None:
        """Replace this method's calibrations with those in ``path`` (and stop calibrating online)."""
        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"PAROConfig.calibration={path!r} does not exist; run once without `calibration` and call "
                "method.save_calibration(path) to create it"
            )
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # any unreadable file gets the same actionable message
            raise ValueError(f"PAROConfig.calibration={path!r} is not a PARO calibration file ({e})") from e
        if not isinstance(blob, dict) or blob.get("format") != _FORMAT:
            raise ValueError(f"PAROConfig.calibration={path!r} is not a PARO calibration file")
        if blob.get("version") != _VERSION:
            raise ValueError(
                f"PAROConfig.calibration={path!r} has format version {blob.get('version')}, this diffattn reads "
                f"version {_VERSION}; recalibrate and save again"
            )
        mine = self._config_fields()
        for name, value in blob["config"].items():
            if mine.get(name) != value:
                raise ValueError(
                    f"PAROConfig.calibration={path!r} was made with {name}={value!r}, but this config has "
                    f"{name}={mine.get(name)!r}; use the same {name} or recalibrate"
                )
        self.state.reset()
        for e in blob["entries"]:
            key = (e["layer"], int(e["branch"]), int(e["phase"]))
            self.state.entries[key] = _Calibration(
                tuple(int(g) for g in e["grid"]), int(e["heads"]), list(e["orders"]), e["mask"].bool(),
                float(e["recall"]),
            )
        self.state.loaded = path
