"""AdaSpa as a method: online block search with exact masses, LSE cached across denoising steps.

Schedule (steps of a 50-step run, scaled to the run's ``num_steps``): dense attention before
``warmup_steps``; a search at each of ``search_steps``; between searches the last layout is reused.
The first search of a (layer, branch) is *fused*: one dense attention pass that also returns each
query's LSE (its output is this step's output), then one :func:`~diffattn.kernels.block_mass` pass.
Later searches are *LSE-cached*: the mass pass alone with the LSE kept from the fused search, then
block-sparse attention with the new layout. The planner is :func:`diffattn.patterns.adaspa.plan_adaspa`.

State lives in :class:`AdaSpaState` (``method.state``), keyed by ``ctx.cache_key`` = (layer, branch) so
CFG branches never share plans; an entry is rebuilt when anything about the call's shape changes (grid,
batch, heads, length, head dim, text length, dtype, device) or the step goes backwards (a new run).

>>> import torch
>>> from diffattn.methods import AttnContext
>>> method = AdaSpaMethod(AdaSpaConfig(block_size=16, warmup_steps=0, backend="torch"))
>>> q = k = v = torch.randn(1, 2, 4 * 8 * 8, 16)
>>> o = method.attend(q, k, v, AttnContext(layer="l0", grid=(4, 8, 8), step=0, num_steps=4))
>>> method.stats[("l0", 0)]["fused_searches"]
1
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ..kernels import BlockSparseLayout, block_mass
from ..patterns import check_block_size
from ..patterns.adaspa import plan_adaspa
from .base import AttnContext, Drawing, MethodConfig, Variant, register_method
from .sparse import Backend, VideoSparseMethod, kernel_attention, dense_layout

__all__ = ["AdaSpaConfig", "AdaSpaMethod", "AdaSpaState"]


@dataclass(frozen=True)
class AdaSpaConfig(MethodConfig):
    """AdaSpa (arXiv 2502.21079). Defaults are the paper's.

    Attributes:
        sparsity: base fraction of key blocks each query-block row drops (``mode="topk"``).
            Paper: 0.8 (keep 20%).
        mode: ``"topk"`` — the paper: every row of a head keeps its top-k blocks by exact mass;
            ``"recall"`` — per head and row, the fewest blocks whose mass reaches ``target_recall``
            (set quality instead of sparsity). Paper: "topk".
        target_recall: mass each row keeps in ``mode="recall"``. Not in the paper; 0.95.
        head_adaptive: redistribute sparsity across heads by recall (``mode="topk"``): with ``n``
            heads above ``recall_threshold`` at the base sparsity ``s``, the ``n`` best heads get
            ``(1+s)/2`` and the ``n`` worst ``(3s-1)/2``. Paper: on.
        recall_threshold: recall above which a head counts as easy. Paper: 0.8.
        warmup_steps: steps (of 50, scaled to the run) before this one run dense. Paper: 10.
        search_steps: steps (of 50, scaled) at which the block layout is searched again. Paper: (10, 30).
        lse_cache: later searches reuse the LSE of the first (fused) search and skip its dense pass;
            off = every search is fused (the paper's "without LSE cache" ablation). Paper: on.
        block_size: tile size (tokens) of blocks for both the search and the kernel. Paper: 64.
        backend: kernel backend: "auto" (Triton on CUDA, else PyTorch), "triton", "torch" or "flex".
    """

    sparsity: float = 0.8
    mode: Literal["topk", "recall"] = "topk"
    target_recall: float = 0.95
    head_adaptive: bool = True
    recall_threshold: float = 0.8
    warmup_steps: int = 10
    search_steps: tuple[int, ...] = (10, 30)
    lse_cache: bool = True
    block_size: int = 64
    backend: Backend = "auto"

    def validate(self) -> None:
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"AdaSpaConfig.sparsity must be in [0, 1) (0.8 keeps 20%), got {self.sparsity}")
        if not 0.0 < self.target_recall <= 1.0:
            raise ValueError(f"AdaSpaConfig.target_recall must be in (0, 1] (e.g. 0.95), got {self.target_recall}")
        if not 0.0 <= self.recall_threshold <= 1.0:
            raise ValueError(f"AdaSpaConfig.recall_threshold must be in [0, 1], got {self.recall_threshold}")
        if self.warmup_steps < 0:
            raise ValueError(f"AdaSpaConfig.warmup_steps must be >= 0 (paper: 10), got {self.warmup_steps}")
        if not self.search_steps or any(s < 0 for s in self.search_steps):
            raise ValueError(
                f"AdaSpaConfig.search_steps must be a non-empty list of steps >= 0 (paper: [10, 30]), "
                f"got {list(self.search_steps)}"
            )
        check_block_size(self.block_size, "AdaSpaConfig.block_size")


@dataclass
class _Entry:
    signature: tuple
    layout: BlockSparseLayout | None = None
    lse: torch.Tensor | None = None
    searched_at: int | None = None
    last_step: int = -1
    density: float = 1.0
    recall: float = float("nan")
    head_sparsity: torch.Tensor | None = None
    fused: int = 0
    cached: int = 0
    hits: int = 0


@dataclass
class AdaSpaState:
    """Per (layer, branch) search results: layout, cached LSE, counters. ``reset()`` forgets all."""

    entries: dict[tuple[str, int], _Entry] = field(default_factory=dict)
    rebuilds: int = 0

    def reset(self) -> None:
        self.entries.clear()
        self.rebuilds = 0

    def entry(self, key: tuple[str, int], signature: tuple, step: int) -> _Entry:
        """The entry for ``key``, new if absent, built for another shape, or from an earlier run."""
        e = self.entries.get(key)
        if e is None or e.signature != signature or step < e.last_step:
            if e is not None:
                self.rebuilds += 1
            e = self.entries[key] = _Entry(signature)
        e.last_step = step
        return e

    @property
    def stats(self) -> dict[tuple[str, int], dict[str, Any]]:
        """Per (layer, branch): searches (fused, cached), layout reuses (``cache_hits``), the current
        layout's density, the recall it had when searched, and the planned sparsity per head."""
        return {
            key: {
                "searches": e.fused + e.cached,
                "fused_searches": e.fused,
                "cached_searches": e.cached,
                "cache_hits": e.hits,
                "density": e.density,
                "recall": e.recall,
                "searched_at": e.searched_at,
                "head_sparsity": None if e.head_sparsity is None else e.head_sparsity.mean(0).tolist(),
            }
            for key, e in self.entries.items()
        }


@register_method
class AdaSpaMethod(VideoSparseMethod):
    """Adaptive block-sparse attention: exact-mass block search, reused between search steps."""

    name = "adaspa"
    config_cls = AdaSpaConfig
    state_cls = AdaSpaState
    drawing = Drawing("adaspa", "AdaSpa's per-head block masks on synthetic DiT-like attention")
    benchmarks = {
        "quality": tuple(Variant({"sparsity": s}, f"s={s}") for s in (0.5, 0.7, 0.8, 0.9))
        + (Variant({"sparsity": 0.8, "head_adaptive": False}, "s=0.8 uniform"),)
        + tuple(Variant({"mode": "recall", "target_recall": r}, f"recall>={r}") for r in (0.9, 0.95, 0.99)),
    }
    event_steps_field = "search_steps"

    @classmethod
    def padded_heads_refusal(cls, config):
        if config.head_adaptive and config.mode == "topk":
            return ("its head-adaptive rule ranks every head's recall, and zero heads would take part; set "
                    "AdaSpaConfig(head_adaptive=False) or use a degree that divides the head count")
        return None
    small_example = {"sparsity": 0.6, "warmup_steps": 0, "search_steps": (0, 25), "block_size": 16, "backend": "torch"}
    lossless_example = {**small_example, "sparsity": 0.0, "head_adaptive": False}

    def search_call(self, q, k, v):
        cfg = self.config
        bs, n = cfg.block_size, q.shape[2]
        _, lse = kernel_attention(q, k, v, dense_layout(n, n, bs, q.device), None, cfg.backend)
        return lambda: self._search(q, k, lse, None)

    @property
    def stats(self) -> dict[tuple[str, int], dict[str, Any]]:
        return self.state.stats

    def use_dense(self, ctx: AttnContext) -> bool:
        return ctx.step < ctx.scaled_step(self.config.warmup_steps)

    def search_steps(self, ctx: AttnContext) -> set[int]:
        """This run's search steps (the configured 50-step schedule scaled to ``ctx.num_steps``)."""
        return {ctx.scaled_step(s) for s in self.config.search_steps}

    def _search(self, q, k, lse, scale, heads=None, gather_heads=None):
        """The block search: block mass under the dense LSE, then the block choice (the same call for
        the method and for the benchmarks that time it)."""
        cfg = self.config
        mass = block_mass(q, k, lse, cfg.block_size, cfg.block_size, scale, cfg.backend)
        return plan_adaspa(
            mass, cfg.sparsity, cfg.mode, cfg.head_adaptive, cfg.recall_threshold, cfg.target_recall,
            heads, gather_heads,
        )

    def _plan(self, q, k, lse, ctx, e: _Entry) -> None:
        cfg = self.config
        bs = cfg.block_size
        mask, info = self._search(q, k, lse, ctx.scale, ctx.heads, ctx.gather_heads)
        n = q.shape[2]
        e.layout = BlockSparseLayout.from_block_mask(mask, bs, bs, n, n)
        # statistics of the model's heads (a rank's zero padding heads left out)
        e.density = e.layout.density if not ctx.padded_heads else float(ctx.real_heads(mask).float().mean())
        e.recall = float(ctx.real_heads(info["recall"]).mean())
        e.head_sparsity = ctx.real_heads(info["sparsity"])
        e.searched_at = ctx.step

    def video_attention(self, q, k, v, ctx):
        cfg = self.config
        b, h, n, d = q.shape
        signature = (tuple(ctx.grid), b, h, n, d, ctx.text_len, q.dtype, q.device)
        e = self.state.entry(ctx.cache_key, signature, ctx.step)
        # The latest planned search step reached: a step a cache skipped (no attention call) moves its
        # search to the next computed step instead of dropping it.
        due = max((s for s in self.search_steps(ctx) if s <= ctx.step), default=None)
        search_now = due is not None and (e.searched_at is None or e.searched_at < due)
        late = {"search_planned_at": due} if search_now and due != ctx.step else {}
        if e.layout is None or (search_now and (e.lse is None or not cfg.lse_cache)):
            # Fused search: the dense pass is this step's output and gives the exact LSE.
            dense = dense_layout(n, n, cfg.block_size, q.device)
            o, lse = kernel_attention(q, k, v, dense, ctx.scale, cfg.backend)
            self._plan(q, k, lse, ctx, e)
            e.lse = lse if cfg.lse_cache else None
            e.fused += 1
            ctx.record(
                density=1.0, planned_density=e.density, recall=e.recall, search=True, search_kind="fused",
                cache_hit=False, **late,
            )
            return o, lse
        if search_now:
            self._plan(q, k, e.lse, ctx, e)
            e.cached += 1
            o, lse = kernel_attention(q, k, v, e.layout, ctx.scale, cfg.backend)
            ctx.record(
                density=e.density, recall=e.recall, search=True, search_kind="cached", cache_hit=True, **late
            )
            return o, lse
        e.hits += 1
        o, lse = kernel_attention(q, k, v, e.layout, ctx.scale, cfg.backend)
        ctx.record(density=e.density, search=False, cache_hit=True)
        return o, lse
