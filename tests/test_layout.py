"""BlockSparseLayout: construction, validation and round trips against plain tensor expressions."""

from dataclasses import replace

import pytest
import torch

from diffattn.kernels import BlockSparseLayout, cdiv


def _expand_blocks(block_mask: torch.Tensor, bq: int, bk: int, nq: int, nk: int) -> torch.Tensor:
    """Token mask of a block mask, written independently of the layout code."""
    return block_mask.repeat_interleave(bq, dim=-2).repeat_interleave(bk, dim=-1)[..., :nq, :nk]


# ---------------------------------------------------------------- from_block_mask / round trips
@pytest.mark.parametrize("shape", [(2, 3), (1, 3), (2, 1), (1, 1)], ids=lambda s: f"B{s[0]}-H{s[1]}")
def test_from_block_mask_round_trip(shape):
    b, h = shape
    mask = torch.rand(b, h, 7, 9) < 0.4
    mask[..., 0, :] = False  # an empty row
    layout = BlockSparseLayout.from_block_mask(mask, 32, 64)
    assert layout.kv_indices.shape[:3] == (b, h, 7)
    assert torch.equal(layout.kv_counts, mask.sum(-1).to(torch.int32))
    assert torch.equal(layout.to_block_mask(), mask)
    assert layout.density == pytest.approx(mask.float().mean().item())
    # Listed indices come first and increase; the rest is -1.
    for bi in range(b):
        for hi in range(h):
            for r in range(7):
                n = int(layout.kv_counts[bi, hi, r])
                expected = torch.nonzero(mask[bi, hi, r]).flatten().to(torch.int32)
                assert torch.equal(layout.kv_indices[bi, hi, r, :n], expected)
                assert bool((layout.kv_indices[bi, hi, r, n:] == -1).all())


def test_from_block_mask_2d_and_doc_example():
    mask = torch.tensor([[1, 0], [1, 1]], dtype=torch.bool)
    layout = BlockSparseLayout.from_block_mask(mask, block_q=64, block_k=64)
    assert layout.kv_counts.tolist() == [[[1, 2]]]
    assert layout.kv_indices.tolist() == [[[[0, -1], [0, 1]]]]
    assert layout.density == 0.75


def test_to_token_mask_matches_block_expansion():
    mask = torch.rand(2, 3, 4, 5) < 0.5
    layout = BlockSparseLayout.from_block_mask(mask, 32, 16, seq_q=100, seq_k=70)
    expected = _expand_blocks(mask, 32, 16, 100, 70)
    assert torch.equal(layout.to_token_mask(), expected)
    assert torch.equal(layout.to_token_mask(97, 65), expected[..., :97, :65])


def test_dense_layout():
    layout = BlockSparseLayout.dense(2, 1, 100, 130, 32, 64)
    assert layout.kv_counts.shape == (2, 1, 4)
    assert layout.num_kv_blocks == 3 and layout.density == 1.0
    assert bool(layout.to_token_mask().all()) and layout.to_token_mask().shape == (2, 1, 100, 130)


# ---------------------------------------------------------------- exact token-level constructors
@pytest.mark.parametrize("nq,nk", [(100, 130), (64, 64), (33, 200)], ids=lambda n: str(n))
def test_from_token_mask_is_exact(nq, nk):
    bq, bk = 32, 16
    # Mix of all-kept, all-dropped and mixed blocks: a band plus random holes.
    i = torch.arange(nq)[:, None]
    j = torch.arange(nk)[None, :]
    band = (j * nq - i * nk).abs() < 25 * max(nq, nk)
    holes = torch.rand(2, 3, nq, nk) < 0.9
    tm = band & holes
    tm[0, 0] = band  # one head with only full/empty/banded blocks
    tm[1, 2, :, : nk // 2] = True
    layout = BlockSparseLayout.from_token_mask(tm, bq, bk)
    assert torch.equal(layout.to_token_mask(), tm)
    # Blocks kept entirely (tails counted as kept) are full, not partial.
    assert layout.has_partial
    mq, mk = cdiv(nq, bq), cdiv(nk, bk)
    padded = torch.ones(2, 3, mq * bq, mk * bk, dtype=torch.bool)
    padded[..., :nq, :nk] = tm
    full = padded.view(2, 3, mq, bq, mk, bk).all(3).all(-1)
    used = torch.arange(layout.max_kv) < layout.kv_counts[..., None]
    ids = torch.where(used, layout.kv_mask_ids, torch.full_like(layout.kv_mask_ids, -2))
    listed_full = torch.gather(full, -1, layout.kv_indices.clamp_min(0).long())
    assert bool(((ids == -1) == (listed_full & used)).all())


def test_from_token_mask_without_partial_blocks():
    block = torch.rand(1, 2, 3, 4) < 0.5
    tm = _expand_blocks(block, 16, 16, 48, 64)
    layout = BlockSparseLayout.from_token_mask(tm, 16, 16)
    assert not layout.has_partial
    assert torch.equal(layout.to_block_mask(), block)


def test_from_key_padding_is_exact():
    key_valid = torch.ones(3, 150, dtype=torch.bool)
    key_valid[0, 120:] = False
    key_valid[1, 10:70] = False
    key_valid[2, :] = False
    layout = BlockSparseLayout.from_key_padding(key_valid, seq_q=90, block_q=32, block_k=64)
    expected = key_valid[:, None, None, :].expand(3, 1, 90, 150)
    assert torch.equal(layout.to_token_mask(), expected)
    assert layout.density == 1.0 and "density" in layout.__dict__  # known when built, never read back


# ---------------------------------------------------------------- validation
def _good() -> BlockSparseLayout:
    return BlockSparseLayout.from_block_mask(torch.rand(2, 3, 4, 5) < 0.6, 32, 32)


_MALFORMED = [
    ("index-out-of-range", lambda l: replace(l, kv_indices=l.kv_indices.clamp_min(0) + 9, kv_counts=torch.ones_like(l.kv_counts)), "out of range"),
    ("negative-index", lambda l: replace(l, kv_indices=torch.full_like(l.kv_indices, -3), kv_counts=torch.ones_like(l.kv_counts)), "out of range"),
    ("duplicate", lambda l: replace(l, kv_indices=torch.zeros(2, 3, 4, 2, dtype=torch.int32), kv_counts=torch.full((2, 3, 4), 2, dtype=torch.int32)), "strictly increasing"),
    ("decreasing", lambda l: replace(l, kv_indices=torch.tensor([3, 1], dtype=torch.int32).expand(2, 3, 4, 2).contiguous(), kv_counts=torch.full((2, 3, 4), 2, dtype=torch.int32)), "strictly increasing"),
    ("count-too-large", lambda l: replace(l, kv_counts=torch.full_like(l.kv_counts, l.max_kv + 1)), "kv_counts must lie"),
    ("count-negative", lambda l: replace(l, kv_counts=torch.full_like(l.kv_counts, -1)), "kv_counts must lie"),
    ("int64", lambda l: replace(l, kv_indices=l.kv_indices.long()), "int32"),
    ("shape-mismatch", lambda l: replace(l, kv_counts=l.kv_counts[:, :, :3]), "disagree"),
    ("indices-3d", lambda l: replace(l, kv_indices=l.kv_indices[0]), "4-D"),
    ("no-kv-blocks", lambda l: replace(l, num_kv_blocks=0), "num_kv_blocks"),
    ("seq-q-mismatch", lambda l: replace(l, seq_q=200), "seq_q=200"),
    ("seq-k-mismatch", lambda l: replace(l, seq_k=64), "seq_k=64"),
    ("block-not-pow2", lambda l: replace(l, block_q=48), "block_q"),
    ("block-too-small", lambda l: replace(l, block_k=8), "block_k"),
    ("mask-ids-alone", lambda l: replace(l, kv_mask_ids=torch.full_like(l.kv_indices, -1)), "together"),
    ("block-masks-shape", lambda l: replace(l, kv_mask_ids=torch.full_like(l.kv_indices, -1), block_masks=torch.ones(1, 16, 32, dtype=torch.bool)), "block_masks"),
    ("mask-id-range", lambda l: replace(l, kv_mask_ids=torch.full_like(l.kv_indices, 1), block_masks=torch.ones(1, 32, 32, dtype=torch.bool)), "kv_mask_ids must lie"),
]


@pytest.mark.parametrize("edit,match", [pytest.param(e, m, id=n) for n, e, m in _MALFORMED])
def test_malformed_layouts_rejected(edit, match):
    with pytest.raises(ValueError, match=match):
        edit(_good())


@pytest.mark.parametrize(
    "mask,block,match",
    [
        (torch.ones(2, 3, dtype=torch.int64), 32, "bool"),
        (torch.ones(3, 3, 3, dtype=torch.bool), 32, "shape"),
        (torch.ones(1, 1, 2, 2, dtype=torch.bool), 24, "power of two"),
        (torch.ones(1, 1, 2, 2, dtype=torch.bool), True, "power of two"),
    ],
    ids=["int-mask", "3d-mask", "block-24", "block-bool"],
)
def test_from_block_mask_rejects(mask, block, match):
    with pytest.raises(ValueError, match=match):
        BlockSparseLayout.from_block_mask(mask, block, 32)


def test_from_block_mask_rejects_non_tensor():
    with pytest.raises(TypeError, match="mask must be a torch.Tensor"):
        BlockSparseLayout.from_block_mask([[True]], 32, 32)


def test_token_constructors_reject_bad_masks():
    with pytest.raises(ValueError, match="token_mask"):
        BlockSparseLayout.from_token_mask(torch.ones(4, 4, dtype=torch.bool), 16, 16)
    with pytest.raises(ValueError, match="key_valid"):
        BlockSparseLayout.from_key_padding(torch.ones(2, 4), seq_q=4)


def test_check_inputs_rejects_mismatched_attention():
    layout = BlockSparseLayout.from_block_mask(torch.ones(1, 3, 4, 5, dtype=torch.bool), 32, 32)
    layout.check_inputs(2, 3, 100, 150)
    with pytest.raises(ValueError, match="query blocks"):
        layout.check_inputs(2, 3, 200, 150)
    with pytest.raises(ValueError, match="key blocks"):
        layout.check_inputs(2, 3, 100, 100)
    with pytest.raises(ValueError, match="broadcast"):
        layout.check_inputs(2, 4, 100, 150)
