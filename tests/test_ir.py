"""IR-Diffusion: isolation/reposition attention, against plain-PyTorch references written here.

Everything the tests compare with is computed independently: boxes are rasterised with an explicit
centre-in-box loop, reposition with explicit nearest-centre index arithmetic, and the attention with
an einsum softmax over an explicitly built mask.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F

from diffattn.pipelines.ir import IRDiffusionPipeline, find_token_indices
from diffattn.pipelines.tiny_sd import tiny_clip_tokenizer, tiny_sd_pipeline
from diffattn.processors.ir import (
    IRAttention,
    IRAttnProcessor,
    IRConfig,
    IRRegions,
    IRState,
    box_cells,
    label_map,
    region_mask,
    reposition,
    self_attention_layers,
)
from tests.tolerances import MODEL_TOL, assert_close


# ------------------------------------------------------------------------------ independent references
def ref_cells(box, h, w):
    """Set of (r, c) whose centre lies in [x0, x1) x [y0, y1); an axis covering no centre keeps the
    index under the box's centre on that axis."""
    x0, y0, x1, y1 = box
    rows = [r for r in range(h) if y0 <= (r + 0.5) / h < y1] or [min(int((y0 + y1) / 2 * h), h - 1)]
    cols = [c for c in range(w) if x0 <= (c + 0.5) / w < x1] or [min(int((x0 + x1) / 2 * w), w - 1)]
    return {(r, c) for r in rows for c in cols}


def cells_of(region, h, w):
    """A test region is a box (normalised xyxy) or a frozenset of (r, c) cells (a mask on the grid)."""
    return set(region) if isinstance(region, frozenset) else ref_cells(region, h, w)


def ref_labels(regions, h, w, overlap="larger"):
    """Label per cell: among the regions containing it, the largest (official) or smallest; ties: the later."""
    cells = [cells_of(b, h, w) for b in regions]
    labels = []
    for r in range(h):
        for c in range(w):
            owners = [i for i, s in enumerate(cells) if (r, c) in s]
            if not owners:
                labels.append(-1)
            else:
                sign = -1 if overlap == "larger" else 1
                labels.append(min(owners, key=lambda i: (sign * len(cells[i]), -i)))
    return labels


def ref_bbox(cells):
    rows = [r for r, _ in cells]
    cols = [c for _, c in cells]
    return min(rows), max(rows) + 1, min(cols), max(cols) + 1


def ref_reposition(x, src, dst, mode="nearest"):
    """x [C, h, w]: dst cell (t, u) takes src cell r0 + floor((t - t0 + o) * sh / dh) (same for cols), with
    o = 0 for "nearest" (the official, PyTorch's legacy rule) and o = 0.5 for "nearest-exact" (centres)."""
    o = 0.5 if mode == "nearest-exact" else 0.0
    r0, r1, c0, c1 = src
    t0, t1, u0, u1 = dst
    out = torch.zeros_like(x)
    for t in range(t0, t1):
        r = r0 + min(int(math.floor((t - t0 + o) * (r1 - r0) / (t1 - t0))), r1 - r0 - 1)
        for u in range(u0, u1):
            c = c0 + min(int(math.floor((u - u0 + o) * (c1 - c0) / (u1 - u0))), c1 - c0 - 1)
            out[:, t, u] = x[:, r, c]
    return out


def ref_key_cells(target_region, ref_region, h, w, reposition=True):
    """Usable key cells of one reference: its subject cells, moved into the target bbox if repositioned."""
    ref = cells_of(ref_region, h, w)
    if not reposition:
        return ref
    mask = torch.zeros(1, h, w)
    for r, c in ref:
        mask[0, r, c] = 1.0
    dst = ref_bbox(cells_of(target_region, h, w))
    moved = ref_reposition(mask, ref_bbox(ref), dst)[0]
    return {(r, c) for r in range(h) for c in range(w) if moved[r, c] > 0.5}


def ref_allowed(target_regions, h, w, isolation=True, with_refs=True, ref_regions=None, reposition=True):
    """bool [N, (n+1)N] (or [N, N]): a query of subject i reads reference i's usable keys and target
    keys of no other subject; a background query reads all target keys and no reference key."""
    ref_regions = target_regions if ref_regions is None else ref_regions
    key = (tuple(map(_hashable, target_regions)), tuple(map(_hashable, ref_regions)))
    return _ref_allowed(*key, h, w, isolation, with_refs, reposition).clone()


def _hashable(region):
    return region if isinstance(region, frozenset) else tuple(region)


@functools.lru_cache(maxsize=None)
def _ref_allowed(target_regions, ref_regions, h, w, isolation, with_refs, reposition):
    n = len(target_regions)
    N = h * w
    labels = ref_labels(target_regions, h, w)
    usable = [ref_key_cells(t, r, h, w, reposition) for t, r in zip(target_regions, ref_regions)]
    cols = (n + 1) * N if with_refs else N
    allowed = torch.zeros(N, cols, dtype=torch.bool)
    for q in range(N):
        lq = labels[q]
        if with_refs and lq >= 0:
            for k in range(N):
                allowed[q, lq * N + k] = divmod(k, w) in usable[lq]
        off = n * N if with_refs else 0
        for k in range(N):
            lk = labels[k]
            allowed[q, off + k] = (not isolation) or lq < 0 or lk < 0 or lq == lk
    return allowed


def ref_ir_attention(attn, hs, n, target_boxes, ref_boxes, grid, isolation=True, with_refs=True,
                     reposition=True):
    """Output of the IR self-attention on a batch of G x [ref_0..ref_{n-1}, target] rows [B, N, C]."""
    h, w = grid
    B, N, C = hs.shape
    heads = attn.heads

    def split(t):
        return t.view(t.shape[0], -1, heads, t.shape[-1] // heads).transpose(1, 2)

    def attend(q, k, v, allowed=None):
        s = torch.einsum("bhqd,bhkd->bhqk", q, k) * attn.scale
        if allowed is not None:
            s = s.masked_fill(~allowed, float("-inf"))
        return torch.einsum("bhqk,bhkd->bhqd", s.softmax(-1), v)

    q, k, v = split(attn.to_q(hs)), split(attn.to_k(hs)), split(attn.to_v(hs))
    out = torch.empty_like(q)
    allowed = ref_allowed(target_boxes, h, w, isolation, with_refs, ref_boxes, reposition)
    for g in range(B // (n + 1)):
        base = g * (n + 1)
        for i in range(n):
            r = slice(base + i, base + i + 1)
            out[base + i] = attend(q[r], k[r], v[r])[0]
        t = base + n
        keys, values = [], []
        if with_refs:
            for i in range(n):
                moved = hs[base + i][None]
                if reposition:
                    grid_hs = hs[base + i].T.reshape(C, h, w)
                    src = ref_bbox(cells_of(ref_boxes[i], h, w))
                    dst = ref_bbox(cells_of(target_boxes[i], h, w))
                    moved = ref_reposition(grid_hs, src, dst).reshape(C, N).T[None]
                keys.append(split(attn.to_k(moved)))
                values.append(split(attn.to_v(moved)))
        keys.append(k[t : t + 1])
        values.append(v[t : t + 1])
        out[t] = attend(q[t : t + 1], torch.cat(keys, 2), torch.cat(values, 2), allowed)[0]
    out = out.transpose(1, 2).reshape(B, N, -1)
    return attn.to_out[1](attn.to_out[0](out))


# --------------------------------------------------------------------------------------- tiny models
def tiny_sdxl_pipeline(seed: int = 0):
    """A tiny random ``StableDiffusionXLPipeline`` (SDXL architecture: two text encoders, text_time)."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16,
        block_out_channels=(32, 64),
        layers_per_block=1,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + 32,
        cross_attention_dim=64,
        norm_num_groups=16,
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        block_out_channels=(16, 32),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=32,
    )
    tok = tiny_clip_tokenizer()
    cfg = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
               pad_token_id=1)
    torch.manual_seed(seed + 2)
    te1 = CLIPTextModel(CLIPTextConfig(**cfg))
    torch.manual_seed(seed + 3)
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**cfg, projection_dim=32))
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tiny_clip_tokenizer(),
        unet=unet, scheduler=EulerDiscreteScheduler(), force_zeros_for_empty_prompt=True,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sd():
    return tiny_sd_pipeline(seed=0)


@pytest.fixture(scope="module")
def sdxl():
    return tiny_sdxl_pipeline(seed=0)


def _attn(dim=16, heads=2):
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(1)
    return Attention(query_dim=dim, heads=heads, dim_head=dim // heads, out_bias=True).eval()


# Reference attention from the first layer, no random query dropout: every mask is deterministic.
EXACT = IRConfig(start_layer=0, reference_dropout=0.0)
BOXES_T = [(0.0, 0.1, 0.55, 0.9), (0.45, 0.0, 1.0, 0.7)]  # overlapping on purpose
BOXES_R = [(0.2, 0.2, 0.8, 0.8), (0.0, 0.35, 0.6, 1.0)]


# ------------------------------------------------------------------------------------------- regions
@pytest.mark.parametrize("grid", [(5, 7), (8, 8), (3, 11)], ids=lambda g: f"h{g[0]}-w{g[1]}")
@pytest.mark.parametrize(
    "box",
    [(0.0, 0.0, 1.0, 1.0), (0.1, 0.25, 0.6, 0.75), (0.33, 0.0, 0.34, 1.0), (0.5, 0.5, 1.0, 1.0),
     (0.4, 0.41, 0.42, 0.43)],
    ids=["full", "inner", "thin", "corner", "dot"],
)
def test_box_cells_match_centre_rule(grid, box):
    h, w = grid
    expected = ref_cells(box, h, w)
    got = {tuple(x) for x in torch.nonzero(region_mask(box, h, w)).tolist()}
    assert got == expected
    assert box_cells(box, h, w) == ref_bbox(expected)


@pytest.mark.parametrize("grid", [(5, 7), (8, 8)], ids=lambda g: f"h{g[0]}-w{g[1]}")
@pytest.mark.parametrize("overlap", ["larger", "smaller"])
def test_label_map_overlap_rule(grid, overlap):
    """Default: overlaps go to the larger region (the official mask post-processing); "smaller" is opt-in."""
    boxes = [(0.3, 0.3, 0.7, 0.7)] + BOXES_T[::-1]  # smallest first: list order alone would fail
    got = label_map(boxes, *grid, overlap=overlap).tolist()
    assert got == ref_labels(boxes, *grid, overlap)
    assert got != ref_labels(boxes, *grid, "smaller" if overlap == "larger" else "larger")
    if overlap == "larger":
        assert label_map(boxes, *grid).tolist() == got and IRConfig().overlap == "larger"


def test_overlap_goes_to_the_larger_region_in_the_attention_plan():
    from diffattn.processors.ir import build_plan

    big, small = (0.0, 0.0, 0.75, 0.75), (0.5, 0.5, 1.0, 1.0)
    regions = IRRegions(target=[small, big], reference=[small, big])
    labels = {o: build_plan(regions, IRConfig(overlap=o), 8, 8, "cpu").labels.view(8, 8) for o in ("larger", "smaller")}
    assert int(labels["larger"][5, 5]) == 1 and int(labels["smaller"][5, 5]) == 0
    assert int(labels["larger"][7, 7]) == 0 and int(labels["larger"][0, 0]) == 1


def test_mask_regions_resize_by_area():
    mask = torch.zeros(40, 56)
    mask[10:30, 7:35] = 1.0
    got = region_mask(mask, 5, 7)
    pooled = mask.view(5, 8, 7, 8).mean((1, 3))
    assert torch.equal(got, pooled >= 0.5)


# ----------------------------------------------------------------------------------------- reposition
@pytest.mark.parametrize("mode", ["nearest-exact", "nearest", "bilinear"])
@pytest.mark.parametrize("grid", [(8, 8), (5, 7), (9, 13)], ids=lambda g: f"h{g[0]}-w{g[1]}")
def test_reposition_moves_constant_patch_box_to_box(grid, mode):
    h, w = grid
    src = box_cells((0.1, 0.2, 0.5, 0.9), h, w)
    dst = box_cells((0.4, 0.0, 1.0, 0.6), h, w)
    x = torch.randn(2, 3, h, w)
    value = torch.tensor([1.5, -2.0, 0.25]).view(1, 3, 1, 1)
    x[:, :, src[0] : src[1], src[2] : src[3]] = value
    out = reposition(x, src, dst, mode)
    inside = torch.zeros(h, w, dtype=torch.bool)
    inside[dst[0] : dst[1], dst[2] : dst[3]] = True
    assert torch.equal(out[:, :, ~inside], torch.zeros_like(out[:, :, ~inside]))
    expected = value.expand(2, 3, h, w)[:, :, inside]
    if mode == "bilinear":  # weights summing to 1 in fp32
        assert_close(out[:, :, inside], expected, torch.float32)
    else:
        assert torch.equal(out[:, :, inside], expected)


@pytest.mark.parametrize("mode", ["nearest-exact", "nearest", "bilinear"])
def test_reposition_identity_when_boxes_equal(mode):
    x = torch.randn(1, 4, 6, 9)
    box = box_cells((0.2, 0.1, 0.9, 0.8), 6, 9)
    out = reposition(x, box, box, mode)
    r0, r1, c0, c1 = box
    assert torch.equal(out[..., r0:r1, c0:c1], x[..., r0:r1, c0:c1])
    assert out.abs().sum() == x[..., r0:r1, c0:c1].abs().sum()


@pytest.mark.parametrize(
    "src,dst", [((0, 3, 1, 4), (2, 8, 0, 9)), ((1, 7, 0, 9), (3, 5, 4, 6)), ((0, 2, 0, 5), (4, 9, 2, 5))],
    ids=["grow", "shrink", "mixed"],
)
@pytest.mark.parametrize("mode", ["nearest", "nearest-exact"])
def test_reposition_nearest_index_maps(src, dst, mode):
    """Default "nearest" (official): source index floor(i * in / out); "nearest-exact" (opt-in) maps centres."""
    x = torch.arange(9 * 10, dtype=torch.float32).view(1, 1, 9, 10)
    got = reposition(x, src, dst, mode)[0]
    assert torch.equal(got, ref_reposition(x[0], src, dst, mode))
    # The two rules agree on integer upscales only (the "grow" case); with a 3 -> 5 resize they differ.
    other = "nearest-exact" if mode == "nearest" else "nearest"
    odd_src, odd_dst = (0, 3, 0, 3), (2, 7, 2, 7)
    assert not torch.equal(reposition(x, odd_src, odd_dst, mode)[0], ref_reposition(x[0], odd_src, odd_dst, other))
    if mode == "nearest":
        assert torch.equal(reposition(x, src, dst)[0], got) and IRConfig().interpolation == "nearest"


# ------------------------------------------------------------------------- processor vs reference
def _single_layer(config, target_boxes, ref_boxes, grid, capture=False):
    attn = _attn()
    state = IRState(config=config, regions=IRRegions(target=target_boxes, reference=ref_boxes),
                    num_layers=1, capture=capture)
    state.step, state.latent_hw = 0, grid
    attn.set_processor(IRAttnProcessor(state, 0, "attn1"))
    return attn, state


@pytest.mark.parametrize("groups", [1, 2], ids=["no-cfg", "cfg"])
@pytest.mark.parametrize("grid", [(5, 7), (8, 8)], ids=lambda g: f"h{g[0]}-w{g[1]}")
@pytest.mark.parametrize("capture", [False, True], ids=["sdpa", "probs"])
def test_processor_matches_reference(groups, grid, capture):
    n = len(BOXES_T)
    attn, state = _single_layer(EXACT, BOXES_T, BOXES_R, grid, capture)
    hs = torch.randn(groups * (n + 1), grid[0] * grid[1], 16)
    with torch.no_grad():
        got = attn(hs)
        expected = ref_ir_attention(attn, hs, n, BOXES_T, BOXES_R, grid)
    assert_close(got, expected, torch.float32)


def test_processor_three_subjects_no_isolation_matches_reference():
    boxes_t = [(0.0, 0.0, 0.4, 1.0), (0.3, 0.0, 0.7, 0.5), (0.6, 0.4, 1.0, 1.0)]
    boxes_r = [(0.1, 0.1, 0.9, 0.9), (0.0, 0.0, 0.5, 0.5), (0.25, 0.5, 0.75, 1.0)]
    attn, _ = _single_layer(EXACT.replace(isolation=False), boxes_t, boxes_r, (6, 6))
    hs = torch.randn(2 * 4, 36, 16)
    with torch.no_grad():
        assert_close(attn(hs), ref_ir_attention(attn, hs, 3, boxes_t, boxes_r, (6, 6), isolation=False),
                     torch.float32)


def _cells_mask(cells, h, w, up=4):
    m = torch.zeros(h, w)
    for r, c in cells:
        m[r, c] = 1.0
    return m.repeat_interleave(up, 0).repeat_interleave(up, 1)


@pytest.mark.parametrize("reposition", [True, False], ids=["reposition", "in-place"])
def test_processor_with_masks_matches_reference(reposition):
    """Mask regions (an L-shape and a blob, overlapping) instead of boxes, on a 6 x 7 grid."""
    h, w = 6, 7
    t0 = frozenset({(r, c) for r in range(1, 6) for c in range(0, 2)} | {(5, c) for c in range(2, 5)})
    t1 = frozenset({(r, c) for r in range(0, 3) for c in range(1, 6)})
    r0 = frozenset({(r, c) for r in range(2, 4) for c in range(2, 7)})
    r1 = frozenset({(r, c) for r in range(0, 6) for c in range(3, 5)} - {(0, 3)})
    masks_t = [_cells_mask(t0, h, w), _cells_mask(t1, h, w)]
    masks_r = [_cells_mask(r0, h, w).bool(), _cells_mask(r1, h, w)]
    config = EXACT.replace(reposition=reposition)
    attn, _ = _single_layer(config, masks_t, masks_r, (h, w))
    hs = torch.randn(6, h * w, 16)
    with torch.no_grad():
        expected = ref_ir_attention(attn, hs, 2, [t0, t1], [r0, r1], (h, w), reposition=reposition)
        assert_close(attn(hs), expected, torch.float32)


def test_isolation_only_matches_reference():
    attn, _ = _single_layer(IRConfig(reference_attention=False), BOXES_T, BOXES_R, (5, 7))
    hs = torch.randn(6, 35, 16)
    with torch.no_grad():
        expected = ref_ir_attention(attn, hs, 2, BOXES_T, BOXES_R, (5, 7), with_refs=False)
        assert_close(attn(hs), expected, torch.float32)


def test_reference_dropout_drops_whole_query_rows_per_step():
    config = IRConfig(start_layer=0, reference_dropout=0.5, seed=3)
    attn, state = _single_layer(config, BOXES_T, BOXES_R, (8, 8), capture=True)
    hs = torch.randn(6, 64, 16)
    with torch.no_grad():
        for step in (0, 0, 1):
            state.step = step
            attn(hs)
    expected = ref_allowed(BOXES_T, 8, 8)
    labels = torch.tensor(ref_labels(BOXES_T, 8, 8))
    dropped = []
    for rec in state.records:
        allowed = rec["allowed"]
        assert torch.equal(allowed[:, 2 * 64 :], expected[:, 2 * 64 :])  # target keys untouched
        reads = allowed[:, : 2 * 64].any(1)
        assert torch.equal(allowed[reads, : 2 * 64], expected[reads, : 2 * 64])  # whole rows kept or dropped
        assert torch.equal(rec["probs"][..., ~allowed], torch.zeros_like(rec["probs"][..., ~allowed]))
        dropped.append((labels >= 0) & ~reads)
        for i in range(2):  # every subject keeps some reference-reading queries
            assert reads[labels == i].any()
    assert torch.equal(dropped[0], dropped[1]) and not torch.equal(dropped[0], dropped[2])
    subject_cells = int((labels >= 0).sum())
    assert 0.25 * subject_cells < int(dropped[0].sum()) < 0.75 * subject_cells


@pytest.mark.parametrize("groups", [1, 2], ids=["no-cfg", "cfg"])
def test_mutual_cross_attention_matches_reference(groups):
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    from diffattn.processors.ir import IRCrossAttnProcessor

    torch.manual_seed(4)
    attn = Attention(query_dim=16, cross_attention_dim=8, heads=2, dim_head=8, out_bias=True).eval()
    lam, n, (h, w) = 0.7, 2, (5, 7)
    state = IRState(config=IRConfig(mutual_cross_attention=lam),
                    regions=IRRegions(target=BOXES_T, reference=BOXES_R), latent_hw=(h, w))
    attn.set_processor(IRCrossAttnProcessor(state, AttnProcessor2_0()))
    hs, ctx = torch.randn(groups * 3, h * w, 16), torch.randn(groups * 3, 9, 8)
    labels = ref_labels(BOXES_T, h, w)
    with torch.no_grad():
        got = attn(hs, encoder_hidden_states=ctx)
        expected = AttnProcessor2_0()(attn, hs, ctx)
        for g in range(groups):
            t = 3 * g + 2
            q = attn.to_q(hs[t]).view(-1, 2, 8).transpose(0, 1)
            for i in range(n):
                k = attn.to_k(ctx[3 * g + i]).view(-1, 2, 8).transpose(0, 1)
                v = attn.to_v(ctx[3 * g + i]).view(-1, 2, 8).transpose(0, 1)
                o = ((q @ k.transpose(-1, -2)) * attn.scale).softmax(-1) @ v
                mutual = attn.to_out[0](o.transpose(0, 1).reshape(h * w, 16))
                for cell in range(h * w):
                    if labels[cell] == i:
                        expected[t, cell] = (1 - lam) * expected[t, cell] + lam * mutual[cell]
    assert_close(got, expected, torch.float32)


def test_processor_rejects_batch_not_groups_of_refs_and_target():
    attn, _ = _single_layer(EXACT, BOXES_T, BOXES_R, (5, 7))
    with pytest.raises(ValueError, match="not a multiple of 3"):
        attn(torch.randn(4, 35, 16))


# ------------------------------------------------------------------------------ whole-UNet invariants
def _unet_inputs(pipe, batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    unet = pipe.unet
    size = 8  # latents 8x8: attention grids 8x8 and 4x4 (SD), 4x4 (SDXL) keep CPU runs short
    sample = torch.randn(batch, 4, size, size, generator=g)
    ctx = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=g)
    kwargs = {}
    if unet.config.addition_embed_type == "text_time":
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, 32, generator=g),
            "time_ids": torch.tensor([[32, 32, 0, 0, 32, 32]] * batch, dtype=torch.float32),
        }
    return sample, torch.tensor(500), ctx, kwargs


def _run(unet, inputs):
    sample, t, ctx, kwargs = inputs
    with torch.no_grad():
        return unet(sample, t, encoder_hidden_states=ctx, **kwargs).sample


@pytest.mark.parametrize("which", ["sd", "sdxl"])
def test_captured_probabilities_zero_where_forbidden_renormalised_elsewhere(which, request):
    """The precise statement: P_ir = 0 off the allowed set, and P_ir = P / sum_allowed(P) on it,
    where P is the softmax of the same scores over all (refs + target) keys with no mask."""
    pipe = request.getfixturevalue(which)
    unet = pipe.unet
    n = len(BOXES_T)
    regions = IRRegions(target=BOXES_T, reference=BOXES_R)
    layers = len(self_attention_layers(unet))
    config = IRConfig(start_layer=layers // 2, reference_dropout=0.0)
    with IRAttention(unet, config, regions, capture=True) as ir:
        _run(unet, _unet_inputs(pipe, 2 * (n + 1)))
    kinds = [r["kind"] for r in ir.state.records]
    assert kinds == ["isolation"] * (layers // 2) + ["reference"] * (layers - layers // 2)
    for rec in ir.state.records:
        h, w = rec["grid"]
        allowed = ref_allowed(BOXES_T, h, w, with_refs=rec["kind"] == "reference")
        assert torch.equal(rec["allowed"].cpu(), allowed), rec["layer"]
        probs = rec["probs"]
        assert probs.shape[-2:] == allowed.shape
        assert torch.equal(probs[..., ~allowed], torch.zeros_like(probs[..., ~allowed]))
        full = (torch.einsum("bhqd,bhkd->bhqk", rec["q"].float(), rec["k"].float())
                / math.sqrt(rec["q"].shape[-1])).softmax(-1)
        kept = full * allowed
        assert_close(probs, kept / kept.sum(-1, keepdim=True), torch.float32)
        # The references' own attention is untouched: plain softmax over their own keys.
        plain = torch.einsum("bhqd,bhkd->bhqk", rec["q_ref"], rec["k_ref"]) / math.sqrt(rec["q"].shape[-1])
        plain = plain.softmax(-1)
        assert_close(rec["probs_ref"], plain, torch.float32)


@pytest.mark.parametrize("which", ["sd", "sdxl"])
def test_off_equals_original_and_remove_restores_exactly(which, request):
    pipe = request.getfixturevalue(which)
    unet = pipe.unet
    inputs = _unet_inputs(pipe, 6)
    before = _run(unet, inputs)
    originals = dict(unet.attn_processors)
    regions = IRRegions(target=BOXES_T, reference=BOXES_R)
    off_config = IRConfig(isolation=False, reference_attention=False, mutual_cross_attention=0.0)
    with IRAttention(unet, off_config, regions):
        procs = unet.attn_processors
        assert all(isinstance(procs[n], IRAttnProcessor) for n in self_attention_layers(unet))
        assert all(procs[n] is originals[n] for n in procs if n.endswith("attn2.processor"))
        off = _run(unet, inputs)
    torch.testing.assert_close(off, before, atol=MODEL_TOL[0], rtol=MODEL_TOL[1])
    after = dict(unet.attn_processors)
    assert after.keys() == originals.keys() and all(after[k] is originals[k] for k in originals)
    assert torch.equal(_run(unet, inputs), before)
    assert not unet._forward_pre_hooks


@pytest.mark.parametrize("which", ["sd", "sdxl"])
def test_references_keep_batch_order_and_are_unchanged(which, request):
    """Reference rows of the UNet output are those of the plain model; only targets change."""
    pipe = request.getfixturevalue(which)
    unet = pipe.unet
    n = len(BOXES_T)
    inputs = _unet_inputs(pipe, 2 * (n + 1), seed=3)
    plain = _run(unet, inputs)
    with IRAttention(unet, EXACT, IRRegions(target=BOXES_T, reference=BOXES_R)):
        ir = _run(unet, inputs)
    refs = [0, 1, 3, 4]
    torch.testing.assert_close(ir[refs], plain[refs], atol=MODEL_TOL[0], rtol=MODEL_TOL[1])
    for t in (2, 5):
        assert (ir[t] - plain[t]).abs().max() > 1e-3


def test_subject_order_is_consistent(sd):
    """Swapping subjects (their reference rows and boxes) leaves the target unchanged."""
    unet = sd.unet
    sample, t, ctx, kw = _unet_inputs(sd, 6, seed=5)
    perm = torch.tensor([1, 0, 2, 4, 3, 5])
    with IRAttention(unet, EXACT, IRRegions(target=BOXES_T, reference=BOXES_R)):
        a = _run(unet, (sample, t, ctx, kw))
    swapped = IRRegions(target=BOXES_T[::-1], reference=BOXES_R[::-1])
    with IRAttention(unet, EXACT, swapped):
        b = _run(unet, (sample[perm], t, ctx[perm], kw))
    torch.testing.assert_close(b[perm], a, atol=MODEL_TOL[0], rtol=MODEL_TOL[1])


def test_layer_order_is_forward_order(sdxl):
    unet = sdxl.unet
    called = []
    handles = [
        unet.get_submodule(name[: -len(".processor")]).register_forward_pre_hook(
            lambda m, a, name=name: called.append(name)
        )
        for name in unet.attn_processors
        if name.endswith("attn1.processor")
    ]
    try:
        _run(unet, _unet_inputs(sdxl, 1))
    finally:
        for h in handles:
            h.remove()
    assert self_attention_layers(unet) == called


def test_from_layer_and_from_step(sd):
    unet = sd.unet
    n = len(BOXES_T)
    inputs = _unet_inputs(sd, n + 1)
    for every, rest in ((True, "isolation"), (False, "plain")):
        cfg = IRConfig(start_layer=2, start_step=1, end_step=3, isolate_every_layer=every)
        with IRAttention(unet, cfg, IRRegions(target=BOXES_T, reference=BOXES_R), capture=True) as ir:
            for _ in range(4):
                _run(unet, inputs)
        for rec in ir.state.records:
            use_ref = rec["layer_index"] >= 2 and 1 <= rec["step"] < 3
            assert rec["kind"] == ("reference" if use_ref else rest), (rec["layer"], rec["step"])
        assert {r["step"] for r in ir.state.records} == {0, 1, 2, 3}


def test_step_restarts_at_a_new_generation(sd):
    unet = sd.unet
    sample, _, ctx, kw = _unet_inputs(sd, 3)
    with IRAttention(unet, IRConfig(), IRRegions(target=BOXES_T, reference=BOXES_R), capture=True) as ir:
        for t in (900, 500, 100, 900, 500):
            _run(unet, (sample, torch.tensor(t), ctx, kw))
    steps = [r["step"] for r in ir.state.records if r["layer_index"] == 0]
    assert steps == [0, 1, 2, 0, 1]


def test_default_start_layer_scales_official_sdxl_setting():
    assert IRConfig().resolved_start_layer(70) == 36
    assert IRConfig().resolved_start_layer(16) == 8
    assert IRConfig(start_layer=3).resolved_start_layer(16) == 3


def test_subject_maps_average_token_attention():
    """Maps = mean over calls of the head-averaged attention to the subject's tokens, upsampled."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    from diffattn.processors.ir import SubjectMapProcessor

    torch.manual_seed(2)
    attn = Attention(query_dim=16, cross_attention_dim=8, heads=2, dim_head=8).eval()
    state = IRState(config=IRConfig(), latent_hw=(8, 6))
    tokens = {1: [[2, 3], [5]], 2: [[4]]}
    state.subject_maps.update(tokens=tokens, sum={}, count=0)
    attn.set_processor(SubjectMapProcessor(state, AttnProcessor2_0(), max_tokens=64))
    hs, ctx = torch.randn(3, 12, 16), torch.randn(3, 7, 8)
    calls = [(hs, ctx), (hs * 0.5, ctx.flip(1))]
    with torch.no_grad():
        for x, c in calls:
            plain = AttnProcessor2_0()(attn, x, c)
            torch.testing.assert_close(attn(x, encoder_hidden_states=c), plain)
        for row, subjects in tokens.items():
            expected = 0
            for x, c in calls:
                q = attn.to_q(x[row]).view(12, 2, 8).transpose(0, 1)
                k = attn.to_k(c[row]).view(7, 2, 8).transpose(0, 1)
                p = ((q @ k.transpose(-1, -2)) * attn.scale).softmax(-1).mean(0)  # [12, 7]
                m = torch.stack([p[:, idx].sum(-1) for idx in subjects]).view(-1, 1, 4, 3)  # grid of 8x6 /2
                up = F.interpolate(m, size=(8, 6), mode="bilinear", align_corners=False)[:, 0]
                expected = expected + up
            assert_close(state.subject_maps["sum"][row], expected, torch.float32)
    assert state.subject_maps["count"] == 2 and 0 not in state.subject_maps["sum"]


# -------------------------------------------------------------------------------------- pipelines
PROMPTS = ["a photo of a dog", "a photo of a boy"]
SCENE = "a dog and a boy on the beach"


@pytest.mark.parametrize("which", ["sd", "sdxl"])
def test_pipeline_end_to_end_with_boxes(which, request):
    pipe = request.getfixturevalue(which)
    ir = IRDiffusionPipeline(pipe)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(3, 4, 8, 12, generator=g)  # non-square, as the official 768 x 1280
    out = ir(PROMPTS, SCENE, boxes=BOXES_T, reference_boxes=BOXES_R, num_inference_steps=2, height=16,
             width=24, latents=latents, output_type="pt", config=IRConfig(start_layer=0), capture=True)
    assert out.images.shape == (1, 3, 16, 24) and out.reference_images.shape == (2, 3, 16, 24)
    grids = {r["grid"] for r in out.records if r["kind"] == "reference"}
    assert grids == ({(8, 12), (4, 6)} if which == "sd" else {(4, 6)})
    assert torch.isfinite(out.images).all()
    plain = pipe(PROMPTS + [SCENE], num_inference_steps=2, guidance_scale=7.0, height=16, width=24,
                 latents=latents.clone(),
                 output_type="pt").images
    torch.testing.assert_close(out.reference_images, plain[:2], atol=MODEL_TOL[0], rtol=MODEL_TOL[1])
    assert (out.images[0] - plain[2]).abs().max() > 1e-4
    assert all(not isinstance(p, IRAttnProcessor) for p in pipe.unet.attn_processors.values())


@pytest.mark.parametrize("which", ["sd", "sdxl"])
def test_pipeline_derives_regions_from_subject_words(which, request):
    pipe = request.getfixturevalue(which)
    out = IRDiffusionPipeline(pipe)(
        PROMPTS, SCENE, subject_words=["dog", "boy"], num_inference_steps=2, region_steps=1, height=16,
        width=16, generator=torch.Generator().manual_seed(0), output_type="latent",
    )
    tmaps, rmaps = out.subject_maps["target"], out.subject_maps["reference"]
    assert tmaps.shape == (2, 8, 8) and len(rmaps) == 2
    assert tmaps.amax((1, 2)).tolist() == [1.0, 1.0] and tmaps.min() == 0.0
    t0, t1 = (m.bool() for m in out.regions.target)
    assert t0.any() and t1.any() and not (t0 & t1).any()
    assert out.images.shape == (1, 4, 8, 8)


def test_pipeline_without_tokenizer_uses_token_indices():
    pipe = tiny_sd_pipeline(seed=1, with_tokenizer=False)
    embeds = torch.randn(3, 77, 32)
    out = IRDiffusionPipeline(pipe)(
        None, None, prompt_embeds=embeds, negative_prompt_embeds=torch.zeros_like(embeds),
        subject_token_indices=[[2], [5]], reference_token_indices=[[4], [4]], num_inference_steps=2,
        region_steps=1, height=16, width=16, output_type="latent", generator=torch.Generator().manual_seed(0),
    )
    assert out.images.shape == (1, 4, 8, 8) and len(out.regions.reference) == 2
    with pytest.raises(ValueError, match="subject_words"):
        IRDiffusionPipeline(pipe)(None, None, prompt_embeds=embeds, num_inference_steps=1)


def test_find_token_indices():
    tok = tiny_clip_tokenizer()
    assert find_token_indices(tok, SCENE, "dog") == [2]
    assert find_token_indices(tok, SCENE, "boy") == [5]
    assert find_token_indices(tok, "a red car and a blue car", "car") == [3, 7]
    with pytest.raises(ValueError, match="not in prompt"):
        find_token_indices(tok, SCENE, "cat")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(boxes=[(0.0, 0.0, 1.2, 1.0), (0, 0, 1, 1)], reference_boxes=BOXES_R), "outside"),
        (dict(boxes=[(0.5, 0.0, 0.2, 1.0), (0, 0, 1, 1)], reference_boxes=BOXES_R), "empty"),
        (dict(boxes=BOXES_T[:1], reference_boxes=BOXES_R), "1 entries but there are 2"),
        (dict(boxes=[(0, 0, 1)] * 2, reference_boxes=BOXES_R), "4 numbers"),
        (dict(boxes=BOXES_T, masks=[torch.ones(4, 4)] * 2, reference_boxes=BOXES_R), "not both"),
        (dict(boxes=BOXES_T), "reference regions are needed"),
        (dict(subject_words=["dog", "cat"]), "not in prompt"),
        (dict(subject_token_indices=[[2], [99]], reference_token_indices=[[4], [4]]), r"\[1, 76\]"),
        (dict(boxes=BOXES_T, reference_boxes=BOXES_R, num_images_per_prompt=2), "num_images_per_prompt"),
        (dict(boxes=BOXES_T, reference_boxes=BOXES_R, latents=torch.randn(2, 4, 16, 16)), "expected"),
        (dict(boxes=BOXES_T, reference_masks=[torch.zeros(8, 8)] * 2), "empty"),
    ],
    ids=["outside", "inverted", "count", "arity", "both", "no-ref", "word", "index", "images", "latents",
         "mask"],
)
def test_bad_input_errors(sd, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        IRDiffusionPipeline(sd)(PROMPTS, SCENE, num_inference_steps=1, output_type="latent", **kwargs)


def test_config_errors():
    with pytest.raises(ValueError, match="end_step"):
        IRConfig(start_step=5, end_step=5)
    with pytest.raises(ValueError, match="mutual_cross_attention"):
        IRConfig(mutual_cross_attention=1.5)
    with pytest.raises(ValueError, match="reference_dropout"):
        IRConfig(reference_dropout=1.0)
    with pytest.raises(ValueError, match="interpolation"):
        IRConfig(interpolation="cubic")
    with pytest.raises(TypeError, match="IRAttention needs"):
        IRAttention(object())
    assert IRConfig.from_json(IRConfig(start_layer=4).to_json()) == IRConfig(start_layer=4)
