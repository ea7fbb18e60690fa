"""Radial attention: planner against a loop-by-loop reading of the official rule, method against the
dense masked reference."""

import math

import pytest
import torch

from diffattn.kernels.naive import dense_masked_attention
from diffattn.methods import AttnContext
from diffattn.methods.radial import RadialConfig, RadialMethod
from diffattn.patterns.radial import (
    block_mask_to_layout,
    radial_block_mask,
    radial_layout,
    radial_mask_mod,
    radial_token_mask,
)
from tests import drawn
from tolerances import assert_close


# ------------------------------------------------------------------------------ independent reference
def ref_pair_mask(i, j, p, decay_factor, block, sink):
    """Token mask of query frame i against key frame j, written from the rule's description."""
    dist = abs(i - j)
    if sink and j == 0:
        return torch.ones(p, p, dtype=torch.bool)
    if dist <= 1:
        width = p
    else:
        length = 2 ** p.bit_length() / 2 ** dist.bit_length() * decay_factor
        width = length if length >= block else block
    r = torch.arange(p)[:, None]
    c = torch.arange(p)[None, :]
    local = (c - r).abs() <= width
    undecayed = 2 ** p.bit_length() / 2 ** dist.bit_length()
    if undecayed < block and dist % int(block / undecayed) != 0:
        local[:] = False
    return local


def ref_block_mask(frames, p, decay_factor, block, sink, truncate=False):
    """Shrink each frame pair onto the global block grid and OR the pairs (simple loops). ``truncate``:
    like the official code, look only at the first ceil(p / block) blocks a frame touches."""
    n = frames * p
    m = math.ceil(n / block)
    out = torch.zeros(m, m, dtype=torch.bool)
    for i in range(frames):
        for j in range(frames):
            local = ref_pair_mask(i, j, p, decay_factor, block, sink)
            last_r, last_c = ((i + 1) * p - 1) // block, ((j + 1) * p - 1) // block
            if truncate:
                last_r = min(last_r, i * p // block + math.ceil(p / block) - 1)
                last_c = min(last_c, j * p // block + math.ceil(p / block) - 1)
            for rb in range(i * p // block, last_r + 1):
                for cb in range(j * p // block, last_c + 1):
                    r0, r1 = max(rb * block, i * p) - i * p, min((rb + 1) * block, (i + 1) * p) - i * p
                    c0, c1 = max(cb * block, j * p) - j * p, min((cb + 1) * block, (j + 1) * p) - j * p
                    rows_per_col = local[r0:r1, c0:c1].sum(0).tolist()
                    nonzero = sum(1 for x in rows_per_col if x > 0)
                    heavy = sum(1 for x in rows_per_col if x / block > 1 / 3)
                    if nonzero and heavy / nonzero > 0.6:
                        out[rb, cb] = True
    return out


def ref_token_mask(frames, p, decay_factor, block, sink):
    n = frames * p
    out = torch.zeros(n, n, dtype=torch.bool)
    for i in range(frames):
        for j in range(frames):
            out[i * p : (i + 1) * p, j * p : (j + 1) * p] = ref_pair_mask(i, j, p, decay_factor, block, sink)
    return out


def expand_blocks(mask, block, n):
    return mask.repeat_interleave(block, 0).repeat_interleave(block, 1)[:n, :n]


# (frames, tokens per frame, decay, pattern block): non-multiples of the block, frames shorter than a
# block, and enough frames for temporal striding (2**bitlen(P) / 2**bitlen(dist) < block).
SHAPES = [
    (6, 40, 1.0, 16),
    (9, 50, 0.5, 16),
    (5, 7, 1.0, 16),
    (12, 24, 0.95, 16),
    (30, 64, 1.0, 16),
    (17, 100, 0.2, 32),
    (7, 130, 0.3, 64),
    # P mod block > gcd(P, block): some frames straddle ceil(P / block) + 1 blocks
    (8, 21, 0.5, 16),
    (10, 45, 1.0, 16),
    (12, 75, 0.3, 32),
]
SHAPE_IDS = [f"F{f}-P{p}-decay{d}-b{b}" for f, p, d, b in SHAPES]


@pytest.mark.parametrize("truncate", [False, True], ids=["full-frames", "official-truncation"])
@pytest.mark.parametrize("sink", [False, True], ids=["nosink", "sink"])
@pytest.mark.parametrize("frames,p,decay,block", SHAPES, ids=SHAPE_IDS)
def test_block_mask_matches_reference(frames, p, decay, block, sink, truncate):
    got = radial_block_mask(frames, p, decay, block, sink, truncate)
    want = ref_block_mask(frames, p, decay, block, sink, truncate)
    assert got.shape == want.shape
    assert torch.equal(got, want), f"{int((got != want).sum())} blocks differ"


def test_official_truncation_only_removes_blocks():
    full = radial_block_mask(10, 45, 1.0, 16, True)
    cut = radial_block_mask(10, 45, 1.0, 16, True, True)
    assert bool((cut & ~full).any()) is False and int((full & ~cut).sum()) > 0


@pytest.mark.parametrize("sink", [False, True], ids=["nosink", "sink"])
@pytest.mark.parametrize("frames,p,decay,block", SHAPES[:4], ids=SHAPE_IDS[:4])
def test_token_mask_matches_reference(frames, p, decay, block, sink):
    assert torch.equal(radial_token_mask(frames, p, decay, block, sink), ref_token_mask(frames, p, decay, block, sink))


def test_mask_mod_drives_an_exact_flex_path():
    from diffattn.kernels.flex import flex_mask_mod_attention

    frames, p = 5, 21
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, frames * p, 32) for _ in range(3))
    mod = radial_mask_mod(frames, p, 0.5, 16, attention_sink=True)
    o, lse = flex_mask_mod_attention(q, k, v, mod, block_size=16)
    want, want_lse = dense_masked_attention(q, k, v, token_mask=ref_token_mask(frames, p, 0.5, 16, True))
    assert_close(o, want, torch.float32)
    assert_close(lse, want_lse, torch.float32, what="lse")


def test_striding_drops_far_odd_frames():
    # P=64: 2**7 / 2**bitlen(dist) < 16 from dist 8 on, so only every (16 / that)-th distance survives.
    tok = radial_token_mask(30, 64, 1.0, 16, False)
    frame = tok.view(30, 64, 30, 64).any(-1).any(1)
    assert bool(frame[0, 8]) and not bool(frame[0, 9]) and bool(frame[0, 10])
    assert bool(frame[0, 16]) and not bool(frame[0, 18]) and bool(frame[0, 20])


def test_density_falls_as_frames_grow():
    dens = [radial_block_mask(f, 1560, 0.2, 128, True).float().mean().item() for f in (6, 11, 21, 41, 81)]
    assert all(a > b for a, b in zip(dens, dens[1:])), dens
    # O(n log n), not O(n^2): doubling the frames (and the tokens) far less than quadruples the blocks.
    kept = [radial_block_mask(f, 1560, 0.2, 128, True).sum().item() for f in (81, 161, 321)]
    assert kept[1] < 2.5 * kept[0] and kept[2] < 2.5 * kept[1], kept


@pytest.mark.parametrize(
    "pattern_block,block_size", [(32, 16), (32, 32), (16, 32), (16, 64)], ids=lambda x: str(x)
)
def test_layout_is_exact_at_any_kernel_block(pattern_block, block_size):
    frames, p = 7, 45
    n = frames * p
    mask = radial_block_mask(frames, p, 0.5, pattern_block, True)
    layout = block_mask_to_layout(mask, pattern_block, block_size, n)
    assert layout.block_q == block_size
    assert torch.equal(layout.to_token_mask(n, n)[0, 0], expand_blocks(mask, pattern_block, n))
    if block_size > pattern_block:
        assert layout.has_partial


def test_layout_is_cached_per_shape():
    a = radial_layout(8, 33, 0.4, 16, True, 16)
    assert radial_layout(8, 33, 0.4, 16, True, 16) is a
    assert radial_layout(9, 33, 0.4, 16, True, 16) is not a


def test_bad_arguments_name_the_field():
    with pytest.raises(ValueError, match="decay_factor"):
        RadialConfig(decay_factor=0.0)
    with pytest.raises(ValueError, match="pattern_block"):
        RadialConfig(pattern_block=100)
    with pytest.raises(ValueError, match="dense_steps"):
        RadialConfig(dense_steps=60)
    with pytest.raises(ValueError, match="preset"):
        RadialConfig.preset("cogvideox")
    with pytest.raises(ValueError, match="tokens_per_frame"):
        radial_block_mask(4, 0, 0.5, 16, False)


def test_presets_and_json_round_trip():
    wan, hy = RadialConfig.preset("wan"), RadialConfig.preset("hunyuan")
    assert (wan.dense_layers, wan.dense_steps, wan.decay_factor, wan.attention_sink) == (1, 12, 0.2, True)
    assert (hy.dense_layers, hy.dense_steps, hy.decay_factor, hy.attention_sink) == (0, 12, 0.95, False)
    assert RadialConfig.from_json(hy.to_json()) == hy
    assert RadialConfig.preset("wan", block_size=128).block_size == 128


# ---------------------------------------------------------------------------------- method end to end
def joint_token_mask(video_mask, text_len, text_first, key_valid=None):
    nv = video_mask.shape[0]
    n = nv + text_len
    full = torch.ones(n, n, dtype=torch.bool)
    vs = slice(text_len, n) if text_first else slice(0, nv)
    full[vs, vs] = video_mask
    full = full[None, None]
    if key_valid is not None:
        full = full & key_valid[:, None, None, :]
    return full


@pytest.mark.parametrize("block_size", [16, 32], ids=lambda b: f"kb{b}")
@pytest.mark.parametrize(
    "text_len,text_first,padded",
    [(0, False, False), (7, False, False), (7, False, True), (5, True, False)],
    ids=["video-only", "video-text", "video-text-padded", "text-video"],
)
@pytest.mark.parametrize("sink", [False, True], ids=["nosink", "sink"])
def test_method_equals_dense_with_token_mask(text_len, text_first, padded, block_size, sink):
    grid = (8, 3, 7)  # 21 tokens per frame: frames straddle blocks
    nv = 8 * 21
    b, h, d = 2, 3, 16
    cfg = RadialConfig(
        decay_factor=0.5, attention_sink=sink, dense_layers=0, dense_steps=0, pattern_block=16,
        block_size=block_size, backend="torch",
    )
    n = nv + text_len
    q, k, v = (torch.randn(b, h, n, d) for _ in range(3))
    key_valid = None
    if padded:
        key_valid = torch.ones(b, n, dtype=torch.bool)
        key_valid[1, n - 3 :] = False  # the second sample's last text tokens are padding
    records = []
    ctx = AttnContext(
        grid=grid, text_len=text_len, text_first=text_first, key_padding=key_valid, step=30, layer_index=3,
        record=lambda **kw: records.append(kw),
    )
    out = RadialMethod(cfg).attend(q, k, v, ctx)
    video_mask = expand_blocks(radial_block_mask(8, 21, 0.5, 16, sink), 16, nv)
    want, _ = dense_masked_attention(q, k, v, token_mask=joint_token_mask(video_mask, text_len, text_first, key_valid))
    assert_close(out, want, torch.float32)
    assert 0 < records[-1]["density"] < 1


def test_warmup_layers_and_steps_run_dense():
    grid = (6, 3, 7)
    q, k, v = (torch.randn(1, 2, 126, 16) for _ in range(3))
    cfg = RadialConfig.preset("wan", pattern_block=16, block_size=16, backend="torch", decay_factor=0.3)
    method = RadialMethod(cfg)
    dense, _ = dense_masked_attention(q, k, v)

    def run(step, layer, num_steps=50):
        rec = []
        ctx = AttnContext(
            grid=grid, step=step, num_steps=num_steps, layer_index=layer, record=lambda **kw: rec.append(kw)
        )
        return method.attend(q, k, v, ctx), rec[-1]

    for step, layer, num_steps in [(0, 5, 50), (11, 5, 50), (30, 0, 50), (5, 5, 25)]:
        out, rec = run(step, layer, num_steps)
        assert rec.get("warmup") is True and rec["density"] == 1.0
        assert_close(out, dense, torch.float32)
    for step, layer, num_steps in [(12, 1, 50), (6, 1, 25)]:
        out, rec = run(step, layer, num_steps)
        assert "warmup" not in rec and rec["density"] < 1.0
        assert (out - dense).abs().max() > 1e-3  # the mask really drops keys


def test_official_truncation_reaches_the_layout():
    grid = (10, 5, 9)  # 45 tokens per frame at pattern block 16: some frames straddle 4 blocks
    cut = RadialConfig(pattern_block=16, block_size=16, decay_factor=1.0, official_truncation=True)
    full = cut.replace(official_truncation=False)
    lay_cut = RadialMethod(cut).layout(grid, torch.device("cpu"))
    lay_full = RadialMethod(full).layout(grid, torch.device("cpu"))
    assert torch.equal(lay_cut.to_block_mask()[0, 0], radial_block_mask(10, 45, 1.0, 16, True, True))
    assert lay_cut.density < lay_full.density


def test_shape_change_rebuilds_layout():
    cfg = RadialConfig(dense_layers=0, dense_steps=0, pattern_block=16, block_size=16, backend="torch")
    method = RadialMethod(cfg)
    for grid in [(6, 3, 7), (9, 2, 5)]:
        n = grid[0] * grid[1] * grid[2]
        q, k, v = (torch.randn(1, 2, n, 16) for _ in range(3))
        out = method.attend(q, k, v, AttnContext(grid=grid, step=40, layer_index=2))
        mask = expand_blocks(radial_block_mask(grid[0], grid[1] * grid[2], 0.2, 16, True), 16, n)
        want, _ = dense_masked_attention(q, k, v, token_mask=mask[None, None])
        assert_close(out, want, torch.float32)


def test_triton_interpreter_matches_reference():
    # A kernel tile larger than the pattern block: the layout carries partial blocks into the kernel.
    frames, p = 6, 21
    n = frames * p
    q, k, v = (torch.randn(1, 2, n, 16) for _ in range(3))
    mask = radial_block_mask(frames, p, 0.5, 16, True)
    layout = radial_layout(frames, p, 0.5, 16, True, 32)
    assert layout.has_partial
    from diffattn.kernels import block_sparse_attention

    o, _ = block_sparse_attention(q, k, v, layout, backend="triton")
    want, _ = dense_masked_attention(q, k, v, token_mask=expand_blocks(mask, 16, n)[None, None])
    assert_close(o, want, torch.float32)


def test_command_line_draws_a_mask(tmp_path, capsys):
    from diffattn import cli

    out = tmp_path / "radial.png"
    argv = ["--frames", "9", "--tokens-per-frame", "60", "--pattern-block", "16", "--token-panel", "--out", str(out)]
    assert cli.main(["draw", "radial", *argv]) == 0
    shown = drawn.panels(drawn.read_png(out))
    assert len(shown) == 2  # the block mask and the token rule
    mask = radial_block_mask(9, 60, 0.2, 16, True)
    assert torch.equal(drawn.drawn_mask(shown[0], tuple(mask.shape)), mask)
    assert f"density {float(mask.float().mean()):.4f}" in capsys.readouterr().out


# ------------------------------------------------------------------------------- diffusers integration
from tests import tiny_models as T  # noqa: E402

import diffattn  # noqa: E402

TINY_KW = dict(min_tokens=0, pattern_block=16, block_size=16, backend="torch")


def test_wan_pipeline_honours_dense_steps():
    pipe = T.wan_pipeline()
    # 12 of 50 steps dense scales to round(12 * 4 / 50) = 1 of 4 steps.
    diffattn.apply(pipe, "radial", dense_layers=0, dense_steps=12, **TINY_KW)
    video = pipe(
        prompt_embeds=torch.randn(1, 7, 32), negative_prompt_embeds=torch.randn(1, 7, 32), num_frames=13,
        height=16, width=32, guidance_scale=5.0, num_inference_steps=4, output_type="pt",
    ).frames
    rows = diffattn.stats(pipe).rows
    diffattn.remove(pipe)
    assert torch.isfinite(video).all()
    assert {r["grid"] for r in rows} == {(4, 1, 2)}
    assert {r["step"] for r in rows if r.get("warmup")} == {0}
    assert {r["step"] for r in rows if not r.get("warmup")} == {1, 2, 3}


def test_layout_capture_nests_inside_kernel_call_capture():
    """capture_layouts keeps the computed block mask and an enclosing capture_kernel_calls still sees the call."""
    from diffattn.methods.sparse import capture_kernel_calls

    method = RadialMethod(RadialConfig(dense_steps=0, dense_layers=0, backend="torch"))
    q, k, v = (torch.randn(1, 2, 4 * 64, 32) for _ in range(3))
    seen = {}
    ctx = AttnContext(layer="l", layer_index=3, num_layers=4, grid=(4, 8, 8), step=30, num_steps=50,
                      capture_layouts=True, record=lambda **kw: seen.update(kw))
    with capture_kernel_calls() as calls:
        method.attend(q, k, v, ctx)
    assert len(calls) == 1 and calls[0].q.shape == (1, 2, 256, 32)
    assert torch.equal(seen["block_mask"], calls[0].layout.to_block_mask().cpu())
