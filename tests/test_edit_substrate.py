"""FateZero and IR-Diffusion on the substrate of every diffattn method: one attention body, one
install/remove, the UNet's per-model state and schedule, one word-to-token helper (tiny models, CPU)."""

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
from diffusers.models.attention_processor import Attention, AttnProcessor2_0  # noqa: E402

import diffattn  # noqa: E402
from diffattn.pipelines import FateZeroPipeline  # noqa: E402
from diffattn.pipelines.tiny_sd import tiny_clip_tokenizer, tiny_sd_pipeline  # noqa: E402
from diffattn.processors.attention_body import AttentionBody  # noqa: E402
from diffattn.processors.fatezero import FateZeroConfig, FateZeroState  # noqa: E402
from diffattn.processors.ir import IRAttention, IRConfig, IRRegions  # noqa: E402
from diffattn.processors.sparse import SparseAttnProcessor, state_of  # noqa: E402
from diffattn.processors.tokens import word_token_indices  # noqa: E402
from tests.tolerances import assert_close  # noqa: E402

BOXES_T = [(0.0, 0.1, 0.55, 0.9), (0.45, 0.0, 1.0, 0.7)]
BOXES_R = [(0.2, 0.2, 0.8, 0.8), (0.0, 0.35, 0.6, 1.0)]


def _core(q, k, v, scale):
    return (q @ k.transpose(-1, -2) * scale).softmax(-1) @ v


@pytest.mark.parametrize(
    "kind", ["self-4d-groupnorm-residual", "cross-normcross-qknorm"], ids=lambda s: s.split("-")[0]
)
def test_attention_body_around_a_plain_core_is_the_modules_attention(kind):
    torch.manual_seed(0)
    if kind.startswith("self"):
        attn = Attention(query_dim=16, heads=2, dim_head=8, norm_num_groups=4, residual_connection=True,
                         rescale_output_factor=2.0, out_bias=True).eval()
        x, ctx = torch.randn(3, 16, 5, 7), None  # [B, C, H, W]: 35 tokens
    else:
        attn = Attention(query_dim=16, cross_attention_dim=12, heads=2, dim_head=8, cross_attention_norm="layer_norm",
                         qk_norm="layer_norm", out_bias=True).eval()
        x, ctx = torch.randn(3, 11, 16), torch.randn(3, 9, 12)
    with torch.no_grad():
        body = AttentionBody(attn, x)
        k, v = body.key_value(ctx, encoder=ctx is not None)
        got = body.finish(_core(body.query(), k, v, attn.scale))
        expected = AttnProcessor2_0()(attn, x, ctx)
    assert got.shape == x.shape if ctx is None else got.shape == (3, 11, 16)
    assert_close(got, expected, torch.float32)


@pytest.fixture(scope="module")
def sd():
    return tiny_sd_pipeline(seed=0, sample_size=8, block_out_channels=(16, 32))


def test_ir_runs_on_the_unets_diffattn_state_and_remove_restores(sd):
    unet = sd.unet
    originals = dict(unet.attn_processors)
    ir = IRAttention(unet, IRConfig(start_layer=0, reference_dropout=0.0),
                     IRRegions(target=BOXES_T, reference=BOXES_R), capture=True).install()
    schedule = state_of(unet)
    assert schedule is not None and ir.state.schedule is schedule
    g = torch.Generator().manual_seed(0)
    sample, ctx = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 77, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        for t in (900, 500):
            unet(sample, t, encoder_hidden_states=ctx)
    assert schedule.tracker.step == 1 and {r["step"] for r in ir.state.records} == {0, 1}
    diffattn.remove(unet)
    after = unet.attn_processors
    assert all(after[k] is originals[k] for k in originals) and state_of(unet) is None
    assert not unet._forward_pre_hooks and not unet._forward_hooks
    ir.remove()  # already removed: nothing left to restore
    assert all(unet.attn_processors[k] is originals[k] for k in originals)


def test_fatezero_shares_an_applied_methods_schedule_and_gives_its_processors_back(sd, monkeypatch):
    pipe = FateZeroPipeline.from_pipe(sd)
    pipe.set_progress_bar_config(disable=True)
    unet = pipe.unet
    originals = dict(unet.attn_processors)
    diffattn.apply(pipe, "dense")
    applied = dict(unet.attn_processors)
    schedule = state_of(unet)
    seen = []
    process = FateZeroState.process

    def spy(self, name, is_cross, heads, probs):
        seen.append((self.step, self.schedule is schedule, tuple(self.latent_hw)))
        return process(self, name, is_cross, heads, probs)

    monkeypatch.setattr(FateZeroState, "process", spy)
    frames = [np.random.default_rng(i).integers(0, 256, (16, 16, 3), dtype=np.uint8) for i in range(2)]
    try:
        inv = pipe.invert(frames, "a cat on a mat", num_inference_steps=2,
                          config=FateZeroConfig(frame_refs=("first",), temporal_min_channels=0))
        assert {s for s, _, _ in seen} == {0, 1} and all(shared and hw == (8, 8) for _, shared, hw in seen)
        assert schedule.tracker.step == 1 and inv.store.num_steps == 2  # the loop's step, not timesteps
        after = unet.attn_processors
        assert all(after[k] is applied[k] for k in applied)
        assert any(isinstance(p, SparseAttnProcessor) for p in after.values())
        assert state_of(unet) is schedule
    finally:
        diffattn.remove(pipe)
    assert all(unet.attn_processors[k] is originals[k] for k in originals) and state_of(unet) is None


def test_one_word_helper_serves_both_rules():
    tok = tiny_clip_tokenizer()
    prompt = "a tiger, on a red car and a blue car"
    # FateZero's official rule: space-separated words, exact; IR's: the word's tokens anywhere.
    with pytest.raises(ValueError, match="not a word of the prompt"):
        word_token_indices(prompt, ["tiger"], tok)
    assert word_token_indices(prompt, ["tiger"], tok, match="normalized") == [2, 3]  # the word "tiger,"
    assert word_token_indices(prompt, ["tiger"], tok, match="tokens") == [2]
    assert word_token_indices(prompt, ["car"], tok) == word_token_indices(prompt, ["car"], tok, match="tokens")
    assert word_token_indices(prompt, ["red car"], tok, match="tokens") == word_token_indices(
        prompt, ["red", 7], tok
    )
    with pytest.raises(ValueError, match="not in prompt"):
        word_token_indices(prompt, ["cat"], tok, match="tokens")


@pytest.mark.parametrize("mode", ["off", "store"])
def test_fatezero_layers_it_does_not_store_build_no_probabilities(mode, monkeypatch):
    """Layers above ``max_query_tokens`` (and every layer while FateZero is off) are plain attention,
    computed without the ``[Nq, Nk]`` probability matrix; a smaller layer still builds and stores it."""
    from diffattn.processors.fatezero import FateZeroAttnProcessor

    torch.manual_seed(0)
    attn = Attention(query_dim=16, cross_attention_dim=12, heads=2, dim_head=8).eval()
    state = FateZeroState(FateZeroConfig(frame_refs=("self",), temporal_min_channels=0, max_query_tokens=20))
    state.mode = mode
    seen = []
    monkeypatch.setattr(state, "process", lambda name, is_cross, heads, probs: seen.append(probs.shape) or probs)
    proc = FateZeroAttnProcessor("cross", state)
    for n in (35, 12):
        x, ctx = torch.randn(2, n, 16), torch.randn(2, 9, 12)
        with torch.no_grad():
            assert_close(proc(attn, x, ctx), AttnProcessor2_0()(attn, x, ctx), torch.float32)
    assert seen == ([] if mode == "off" else [(2, 2, 12, 9)])


@pytest.mark.parametrize("rule", ["swap", "refine"])
def test_edit_plan_moves_its_tensors_to_the_attention_once(rule):
    from diffattn.processors.fatezero import EditPlan

    g = torch.Generator().manual_seed(0)
    t = 6
    # the plan is kept in float64 on the host; the attention runs in float32
    plan = EditPlan(self_range=(0, 3), cross_alpha=(torch.rand(4, t, generator=g) > 0.5).double(),
                    equalizer=torch.rand(t, generator=g, dtype=torch.float64) + 0.5)
    if rule == "swap":
        plan.mapper = torch.rand(t, t, generator=g, dtype=torch.float64)
    else:
        plan.refine_index = torch.randperm(t, generator=g)
        plan.refine_keep = (torch.rand(t, generator=g) > 0.3).double()
    stored, current = (torch.rand(2, 3, 5, t, generator=g) for _ in range(2))
    def expected(step):
        if rule == "swap":
            out = torch.einsum("fhqs,st->fhqt", stored, plan.mapper.float())
        else:
            keep = plan.refine_keep.float()
            out = stored[..., plan.refine_index] * keep + current * (1 - keep)
        alpha = plan.cross_alpha[step].float()
        return out * plan.equalizer.float() * alpha + current * (1 - alpha)

    for step in (1, 2):
        assert_close(plan.cross_edit(stored, current, step), expected(step), torch.float32)
        if step == 1:
            first = dict(plan._copies)
    # the second call found every copy made by the first (none made again), in the attention's dtype
    assert plan._copies.keys() == first.keys() and all(plan._copies[k] is v for k, v in first.items())
    assert {k[0] for k in first} == {"cross_alpha", "equalizer", "mapper" if rule == "swap" else "refine_keep"} | (
        set() if rule == "swap" else {"refine_index"})
    assert all(v[1].dtype == (torch.int64 if k[0] == "refine_index" else torch.float32) for k, v in first.items())
    # a field set anew is copied anew
    plan.equalizer = torch.rand(t, generator=g, dtype=torch.float64) + 2.0
    assert_close(plan.cross_edit(stored, current, 2), expected(2), torch.float32)
