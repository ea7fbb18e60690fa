"""Block-sparse layouts: which key blocks each query block attends to.

A layout lists, for every (batch, head, query block), the key blocks to visit:

* ``kv_indices`` int32 ``[B|1, H|1, Mq, Kmax]`` — key-block indices, strictly increasing within a row
  for the first ``kv_counts`` entries; entries past the count are ignored (filled with -1).
* ``kv_counts``  int32 ``[B|1, H|1, Mq]`` — how many entries of the row are used.

A size-1 batch or head dimension broadcasts, so one pattern can serve every head without copies.

Optionally a listed block can be *partial*: ``kv_mask_ids`` int32 ``[B|1, H|1, Mq, Kmax]`` holds -1 for a
full block or an index into ``block_masks`` bool ``[P, block_q, block_k]``, a token-level mask inside
that block. Partial blocks make token-exact patterns (neighbourhood windows, key padding) block-sparse
without computing a superset.

>>> import torch
>>> mask = torch.tensor([[1, 0], [1, 1]], dtype=torch.bool)[None, None]
>>> layout = BlockSparseLayout.from_block_mask(mask, block_q=64, block_k=64)
>>> layout.kv_counts.tolist(), layout.density
([[[1, 2]]], 0.75)
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import cached_property

import torch

__all__ = ["BlockSparseLayout", "cdiv", "check_block"]


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True, eq=False)
class BlockSparseLayout:
    kv_indices: torch.Tensor
    kv_counts: torch.Tensor
    block_q: int
    block_k: int
    num_kv_blocks: int
    seq_q: int | None = None
    seq_k: int | None = None
    kv_mask_ids: torch.Tensor | None = None
    block_masks: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def _built(cls, *args, density: float | None = None, full: bool | None = None, **kwargs) -> "BlockSparseLayout":
        """A layout whose constructor guarantees valid entries: only the shape checks run, because the
        value checks read the device. ``density`` / ``full`` seed the host-side facts when the
        constructor knows them, so using the layout never reads them back."""
        self = object.__new__(cls)
        given = dict(zip((f.name for f in fields(cls)), args), **kwargs)
        for f in fields(cls):
            object.__setattr__(self, f.name, given.get(f.name, f.default))
        self._check_structure()
        if density is not None:
            self.__dict__["density"] = float(density)
        if full is not None:
            self.__dict__["is_full"] = bool(full)
        return self

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_block_mask(
        cls,
        mask: torch.Tensor,
        block_q: int = 64,
        block_k: int = 64,
        seq_q: int | None = None,
        seq_k: int | None = None,
    ) -> "BlockSparseLayout":
        """Layout from a boolean block mask ``[B|1, H|1, Mq, Mk]`` (True = attend to that block)."""
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
        if mask.ndim == 2:
            mask = mask[None, None]
        if mask.ndim != 4:
            raise ValueError(
                f"mask must have shape [B|1, H|1, Mq, Mk] (or [Mq, Mk]), got {tuple(mask.shape)}"
            )
        if mask.dtype != torch.bool:
            raise ValueError(f"mask must be bool, got {mask.dtype}; use mask.bool() or mask > 0")
        check_block(block_q, "block_q")
        check_block(block_k, "block_k")
        counts = mask.sum(-1, dtype=torch.int32)
        kmax = max(int(counts.max()) if counts.numel() else 0, 1)
        indices, counts = _rows(mask, counts, kmax)
        return cls._built(indices, counts, int(block_q), int(block_k), int(mask.shape[-1]), seq_q, seq_k)

    @classmethod
    def dense(
        cls,
        batch: int,
        heads: int,
        seq_q: int,
        seq_k: int,
        block_q: int = 64,
        block_k: int = 64,
        device: torch.device | str | None = None,
    ) -> "BlockSparseLayout":
        """Every query block attends to every key block (batch/head dims may be 1 to broadcast)."""
        check_block(block_q, "block_q")
        check_block(block_k, "block_k")
        mq, mk = cdiv(seq_q, block_q), cdiv(seq_k, block_k)
        idx = torch.arange(mk, dtype=torch.int32, device=device).expand(batch, heads, mq, mk).contiguous()
        counts = torch.full((batch, heads, mq), mk, dtype=torch.int32, device=device)
        return cls._built(idx, counts, block_q, block_k, mk, seq_q, seq_k, density=1.0, full=True)

    @classmethod
    def from_token_mask(
        cls, token_mask: torch.Tensor, block_q: int = 64, block_k: int = 64
    ) -> "BlockSparseLayout":
        """Exact layout for a token mask ``[B|1, H|1, Nq, Nk]``: full blocks where the mask is all True,
        partial blocks (with their token mask) where it is mixed, nothing where it is all False."""
        if token_mask.ndim != 4 or token_mask.dtype != torch.bool:
            raise ValueError(
                f"token_mask must be bool [B|1, H|1, Nq, Nk], got {token_mask.dtype} {tuple(token_mask.shape)}"
            )
        b, h, nq, nk = token_mask.shape
        mq, mk = cdiv(nq, block_q), cdiv(nk, block_k)
        padded = token_mask.new_zeros(b, h, mq * block_q, mk * block_k)
        padded[..., :nq, :nk] = token_mask
        # Positions past the sequence ends never count: treat them as "kept" for the full-block test.
        valid = token_mask.new_zeros(mq * block_q, mk * block_k)
        valid[:nq, :nk] = True
        tiles = padded.view(b, h, mq, block_q, mk, block_k).permute(0, 1, 2, 4, 3, 5)
        vtiles = valid.view(mq, block_q, mk, block_k).permute(0, 2, 1, 3)
        any_ = tiles.any(-1).any(-1)
        full = (tiles | ~vtiles).all(-1).all(-1) & any_
        layout = cls.from_block_mask(any_, block_q, block_k, nq, nk)
        partial = any_ & ~full
        if not bool(partial.any()):
            return layout
        pid = torch.full(partial.shape, -1, dtype=torch.int32, device=token_mask.device)
        n_partial = int(partial.sum())
        pid[partial] = torch.arange(n_partial, dtype=torch.int32, device=token_mask.device)
        block_masks = tiles[partial].contiguous()
        safe = layout.kv_indices.clamp_min(0).long()
        ids = torch.gather(pid, -1, safe)
        ids = torch.where(layout.kv_indices >= 0, ids, torch.full_like(ids, -1))
        return cls._built(
            layout.kv_indices, layout.kv_counts, block_q, block_k, mk, nq, nk, ids.contiguous(), block_masks
        )

    @classmethod
    def from_key_padding(
        cls, key_valid: torch.Tensor, seq_q: int, block_q: int = 64, block_k: int = 64
    ) -> "BlockSparseLayout":
        """Dense layout over keys where ``key_valid`` (bool ``[B, Nk]``, True = real token) holds.

        Every query row sees the same keys. Every key block is listed (density 1.0) and blocks holding a
        padded key are partial, so the layout is built without reading the mask back: a padding mask
        that is new at every forward costs no host synchronisation.
        """
        if key_valid.ndim != 2 or key_valid.dtype != torch.bool:
            raise ValueError(f"key_valid must be bool [B, Nk], got {key_valid.dtype} {tuple(key_valid.shape)}")
        check_block(block_q, "block_q")
        check_block(block_k, "block_k")
        b, nk = key_valid.shape
        dev = key_valid.device
        mq, mk = cdiv(seq_q, block_q), cdiv(nk, block_k)
        padded = key_valid.new_zeros(b, mk * block_k)
        padded[:, :nk] = key_valid
        tiles = padded.view(b, mk, block_k)
        tail = (torch.arange(mk * block_k, device=dev) >= nk).view(mk, block_k)
        full = (tiles | tail).all(-1)
        pid = torch.arange(b * mk, dtype=torch.int32, device=dev).view(b, 1, 1, mk)
        ids = torch.where(full[:, None, None, :], torch.full_like(pid, -1), pid).expand(b, 1, mq, mk)
        block_masks = tiles.reshape(b * mk, 1, block_k).expand(b * mk, block_q, block_k).contiguous()
        idx = torch.arange(mk, dtype=torch.int32, device=dev).expand(b, 1, mq, mk).contiguous()
        counts = torch.full((b, 1, mq), mk, dtype=torch.int32, device=dev)
        return cls._built(
            idx, counts, block_q, block_k, mk, seq_q, nk, ids.contiguous(), block_masks, density=1.0, full=False
        )

    # ------------------------------------------------------------------ views
    @property
    def num_q_blocks(self) -> int:
        return self.kv_counts.shape[-1]

    @property
    def max_kv(self) -> int:
        return self.kv_indices.shape[-1]

    @property
    def has_partial(self) -> bool:
        return self.kv_mask_ids is not None

    @cached_property
    def density(self) -> float:
        """Fraction of (query block, key block) pairs computed, averaged over batch and heads (read from
        the device once per layout, or known when it was built)."""
        total = self.kv_counts.numel() * self.num_kv_blocks
        return float(self.kv_counts.sum(dtype=torch.float64)) / max(total, 1)

    @cached_property
    def is_full(self) -> bool:
        """Every block listed and none partial: plain dense attention (read once, like :attr:`density`)."""
        return self.kv_mask_ids is None and bool((self.kv_counts == self.num_kv_blocks).all())

    def to_block_mask(self) -> torch.Tensor:
        """Boolean ``[B|1, H|1, Mq, Mk]`` mask of the listed blocks (partial blocks count as kept)."""
        b, h, mq, kmax = self.kv_indices.shape
        slot = torch.arange(kmax, device=self.kv_indices.device)
        used = slot < self.kv_counts[..., None]
        mask = torch.zeros(b, h, mq, self.num_kv_blocks + 1, dtype=torch.bool, device=self.kv_indices.device)
        idx = torch.where(used, self.kv_indices.long(), torch.full_like(self.kv_indices, self.num_kv_blocks).long())
        mask.scatter_(-1, idx, True)
        return mask[..., : self.num_kv_blocks]

    def to_token_mask(self, seq_q: int | None = None, seq_k: int | None = None) -> torch.Tensor:
        """Boolean ``[B|1, H|1, Nq, Nk]`` token mask this layout computes (partial blocks exact)."""
        nq = seq_q if seq_q is not None else (self.seq_q or self.num_q_blocks * self.block_q)
        nk = seq_k if seq_k is not None else (self.seq_k or self.num_kv_blocks * self.block_k)
        b, h, mq, kmax = self.kv_indices.shape
        dev = self.kv_indices.device
        tiles = torch.zeros(b, h, mq, self.num_kv_blocks + 1, self.block_q, self.block_k, dtype=torch.bool, device=dev)
        slot = torch.arange(kmax, device=dev)
        used = slot < self.kv_counts[..., None]
        idx = torch.where(used, self.kv_indices.long(), torch.full_like(self.kv_indices, self.num_kv_blocks).long())
        if self.kv_mask_ids is None:
            content = torch.ones(b, h, mq, kmax, self.block_q, self.block_k, dtype=torch.bool, device=dev)
        else:
            ids = self.kv_mask_ids.long()
            content = self.block_masks[ids.clamp_min(0)]
            content = torch.where((ids >= 0)[..., None, None], content, torch.ones_like(content))
        content = content & used[..., None, None]
        bi = torch.arange(b, device=dev)[:, None, None, None]
        hi = torch.arange(h, device=dev)[None, :, None, None]
        qi = torch.arange(mq, device=dev)[None, None, :, None]
        tiles[bi, hi, qi, idx] = content
        tiles = tiles[:, :, :, : self.num_kv_blocks]
        full = tiles.permute(0, 1, 2, 4, 3, 5).reshape(b, h, mq * self.block_q, self.num_kv_blocks * self.block_k)
        return full[..., :nq, :nk]

    def to(self, device: torch.device | str) -> "BlockSparseLayout":
        """This layout on ``device``; a copy keeps the facts already known on the host."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return type(self)._built(
            move(self.kv_indices), move(self.kv_counts), self.block_q, self.block_k, self.num_kv_blocks,
            self.seq_q, self.seq_k, move(self.kv_mask_ids), move(self.block_masks),
            density=self.__dict__.get("density"), full=self.__dict__.get("is_full"),
        )

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Check shapes, then every entry (the entry checks read the device)."""
        self._check_structure()
        self._check_values()

    def _check_structure(self) -> None:
        idx, cnt = self.kv_indices, self.kv_counts
        check_block(self.block_q, "block_q")
        check_block(self.block_k, "block_k")
        if not isinstance(idx, torch.Tensor) or idx.ndim != 4:
            raise ValueError(f"kv_indices must be a 4-D tensor [B|1, H|1, Mq, Kmax], got {_shape(idx)}")
        if not isinstance(cnt, torch.Tensor) or cnt.ndim != 3:
            raise ValueError(f"kv_counts must be a 3-D tensor [B|1, H|1, Mq], got {_shape(cnt)}")
        if idx.dtype != torch.int32 or cnt.dtype != torch.int32:
            raise ValueError(
                f"kv_indices and kv_counts must be int32, got {idx.dtype} and {cnt.dtype}; use .to(torch.int32)"
            )
        if tuple(idx.shape[:3]) != tuple(cnt.shape):
            raise ValueError(
                f"kv_indices {tuple(idx.shape)} and kv_counts {tuple(cnt.shape)} disagree on [B, H, Mq]"
            )
        if idx.device != cnt.device:
            raise ValueError(f"kv_indices on {idx.device} but kv_counts on {cnt.device}")
        if self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if (self.kv_mask_ids is None) != (self.block_masks is None):
            raise ValueError("kv_mask_ids and block_masks must be given together")
        if self.kv_mask_ids is not None:
            ids, bm = self.kv_mask_ids, self.block_masks
            if ids.shape != idx.shape or ids.dtype != torch.int32:
                raise ValueError(
                    f"kv_mask_ids must be int32 with the shape of kv_indices {tuple(idx.shape)}, "
                    f"got {ids.dtype} {tuple(ids.shape)}"
                )
            if bm.ndim != 3 or bm.dtype != torch.bool or tuple(bm.shape[1:]) != (self.block_q, self.block_k):
                raise ValueError(
                    f"block_masks must be bool [P, {self.block_q}, {self.block_k}], got {bm.dtype} {tuple(bm.shape)}"
                )
        self._check_lengths()

    def _check_lengths(self) -> None:
        cnt, mk = self.kv_counts, self.num_kv_blocks
        if self.seq_q is not None and cdiv(self.seq_q, self.block_q) != cnt.shape[-1]:
            raise ValueError(
                f"seq_q={self.seq_q} needs {cdiv(self.seq_q, self.block_q)} query blocks of {self.block_q}, "
                f"layout has {cnt.shape[-1]}"
            )
        if self.seq_k is not None and cdiv(self.seq_k, self.block_k) != mk:
            raise ValueError(
                f"seq_k={self.seq_k} needs {cdiv(self.seq_k, self.block_k)} key blocks of {self.block_k}, "
                f"layout has num_kv_blocks={mk}"
            )

    def _check_values(self) -> None:
        idx, cnt, mk = self.kv_indices, self.kv_counts, self.num_kv_blocks
        if cnt.numel():
            if int(cnt.min()) < 0 or int(cnt.max()) > idx.shape[-1]:
                raise ValueError(
                    f"kv_counts must lie in [0, Kmax={idx.shape[-1]}], got range "
                    f"[{int(cnt.min())}, {int(cnt.max())}]"
                )
            slot = torch.arange(idx.shape[-1], device=idx.device)
            used = slot < cnt[..., None]
            vals = idx[used]
            if vals.numel() and (int(vals.min()) < 0 or int(vals.max()) >= mk):
                raise ValueError(
                    f"kv_indices out of range: listed blocks must lie in [0, {mk - 1}], got "
                    f"[{int(vals.min())}, {int(vals.max())}]"
                )
            if idx.shape[-1] > 1:
                both = used[..., 1:]
                if bool((both & (idx[..., 1:] <= idx[..., :-1])).any()):
                    raise ValueError(
                        "kv_indices rows must be strictly increasing (no duplicate blocks); "
                        "build layouts with BlockSparseLayout.from_block_mask"
                    )
        if self.kv_mask_ids is not None:
            ids, bm = self.kv_mask_ids, self.block_masks
            if ids.numel() and (int(ids.max()) >= bm.shape[0] or int(ids.min()) < -1):
                raise ValueError(f"kv_mask_ids must lie in [-1, {bm.shape[0] - 1}]")

    def check_inputs(self, batch: int, heads: int, seq_q: int, seq_k: int) -> None:
        """Raise if this layout cannot serve attention of the given sizes."""
        b, h = self.kv_counts.shape[:2]
        if b not in (1, batch) or h not in (1, heads):
            raise ValueError(
                f"layout batch/heads {(b, h)} do not broadcast to q's {(batch, heads)}; use size 1 or match"
            )
        if cdiv(seq_q, self.block_q) != self.num_q_blocks:
            raise ValueError(
                f"q has {seq_q} tokens = {cdiv(seq_q, self.block_q)} blocks of {self.block_q}, but the layout "
                f"has {self.num_q_blocks} query blocks; rebuild the layout for this length"
            )
        if cdiv(seq_k, self.block_k) != self.num_kv_blocks:
            raise ValueError(
                f"k has {seq_k} tokens = {cdiv(seq_k, self.block_k)} blocks of {self.block_k}, but the layout "
                f"has {self.num_kv_blocks} key blocks; rebuild the layout for this length"
            )


def _rows(mask: torch.Tensor, counts: torch.Tensor, kmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Index rows of a block mask: its selected blocks first, in increasing order, -1 past the count."""
    # A stable sort puts the selected blocks first, in increasing block order.
    order = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True)[..., :kmax].to(torch.int32)
    slot = torch.arange(kmax, device=mask.device, dtype=torch.int32)
    indices = torch.where(slot < counts[..., None], order, torch.full_like(order, -1))
    return indices.contiguous(), counts.contiguous()


def check_block(value: int, name: str, maximum: int | None = None, hint: str = "e.g. 64 or 128") -> None:
    """Raise unless ``value`` is a power of two >= 16 (and <= ``maximum``): every kernel's tiles are."""
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= 16 and not value & (value - 1)
    if not ok or (maximum is not None and value > maximum):
        span = ">= 16" if maximum is None else f"in 16..{maximum}"
        raise ValueError(f"{name} must be a power of two {span} ({hint}), got {value!r}")


def _shape(t: object) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__
