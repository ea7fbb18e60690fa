"""The embedded tiny video model: data, text encoder, pipeline, shipped weights, and that it learned."""

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers", reason="the tiny model is a Diffusers transformer")
from diffusers import WanTransformer3DModel  # noqa: E402

from diffattn.pipelines.tiny import (
    COLORS,
    POSITION_CHANNELS,
    DIRECTIONS,
    SHAPES,
    Scene,
    TinyVideoPipeline,
    load_pipeline,
    parse_prompt,
    random_scenes,
    pixel_to_position,
    render_videos,
    position_channels,
    scene_prompt,
    tiny_asset_dir,
    with_position_channels,
)
from tests.tolerances import MODEL_TOL


@pytest.fixture(scope="module")
def pipe():
    p = load_pipeline("tiny")
    p.set_progress_bar_config(disable=True)
    return p


def _color(name):
    return np.array(COLORS[name], dtype=np.float32) / 255


def _foreground(video, background):
    """Mask [F, H, W] of pixels far from the background colour."""
    return np.abs(video - background).sum(-1) > 0.6


def _coverage(video, color, background):
    """Anti-aliased shape coverage [F, H, W] in [0, 1] of a two-colour video."""
    d = _color(color) - _color(background)
    return np.clip(((video - _color(background)) @ d) / (d @ d), 0, 1)


def _centroids(mask):
    ys, xs = np.mgrid[: mask.shape[1], : mask.shape[2]]
    return np.array([[(xs * m).sum() / m.sum(), (ys * m).sum() / m.sum()] for m in mask])


# ------------------------------------------------------------------------------------------- data
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("direction", list(DIRECTIONS))
def test_render_moves_the_shape_by_speed_per_frame(shape, direction):
    scene = Scene(shape, "red", "blue", direction, x=32.0, y=30.0, radius=8.0, speed=2.5)
    video = render_videos([scene], 7, 64, 60)[0].permute(1, 2, 3, 0).numpy()  # [F, H, W, 3]
    assert video.shape == (7, 64, 60, 3)
    np.testing.assert_allclose(video[:, 0, 0], np.broadcast_to(_color("blue"), (7, 3)), atol=1e-6)
    alpha = _coverage(video, "red", "blue")
    cent = _centroids(alpha)
    dx, dy = DIRECTIONS[direction]
    np.testing.assert_allclose(cent[-1] - cent[0], [6 * 2.5 * dx, 6 * 2.5 * dy], atol=0.05)
    # the shape keeps its area; circle, square and triangle are about the size of the radius-8 circle
    areas = alpha.sum((1, 2))
    assert areas.max() - areas.min() <= 0.02 * areas.mean()
    assert 0.5 * np.pi * 64 < areas.mean() < 1.3 * np.pi * 64


def test_shapes_differ_and_colours_are_exact():
    scenes = [Scene(s, "yellow", "black", "left", 20.0, 20.0, 9.0, 1.0) for s in SHAPES]
    frames = render_videos(scenes, 1, 40, 40)[:, :, 0].permute(0, 2, 3, 1).numpy()
    masks = [_foreground(f[None], _color("black"))[0] for f in frames]
    assert all((a != b).sum() > 20 for i, a in enumerate(masks) for b in masks[i + 1 :])
    np.testing.assert_allclose(frames[0][20, 20], _color("yellow"), atol=1e-6)


def test_random_scenes_stay_in_frame_and_prompt_round_trips():
    g = torch.Generator().manual_seed(3)
    scenes = random_scenes(40, 9, 64, 64, g)
    assert scenes == random_scenes(40, 9, 64, 64, torch.Generator().manual_seed(3))
    for s in scenes:
        assert s.color != s.background
        dx, dy = DIRECTIONS[s.direction]
        for f in (0, 8):
            x, y = s.x + dx * s.speed * f, s.y + dy * s.speed * f
            assert s.radius <= x <= 64 - s.radius and s.radius <= y <= 64 - s.radius
        parsed = parse_prompt(scene_prompt(s))
        assert parsed == {"shape": s.shape, "color": s.color, "background": s.background, "direction": s.direction}


@pytest.mark.parametrize("jitter", [0.0, 0.2])
def test_scene_jitter_bounds_the_start_around_a_centred_trajectory(jitter):
    scenes = random_scenes(40, 9, 64, 64, torch.Generator().manual_seed(4), jitter=jitter)
    for s in scenes:
        dx, dy = DIRECTIONS[s.direction]
        # centre of the trajectory (frames 0..8) and its distance from the frame centre
        mid_x, mid_y = s.x + dx * s.speed * 4, s.y + dy * s.speed * 4
        room = 64 - 2 * s.radius - 2
        travel = s.speed * 8
        along_room = room - travel
        off_along = abs((mid_x if dx else mid_y) - 32)
        off_across = abs((mid_y if dx else mid_x) - 32)
        assert off_along <= along_room / 2 * jitter + 1e-4
        assert off_across <= room / 2 * jitter + 1e-4
    if jitter == 0.0:
        assert all(abs(s.x + DIRECTIONS[s.direction][0] * s.speed * 4 - 32) < 1e-4 for s in scenes)
    with pytest.raises(ValueError, match="jitter"):
        random_scenes(1, 9, 64, 64, jitter=1.5)


def test_scene_directions_can_be_restricted():
    scenes = random_scenes(30, 5, 64, 64, torch.Generator().manual_seed(5), directions=["right", "down"])
    assert {s.direction for s in scenes} == {"right", "down"}
    for bad in ([], ["sideways"]):
        with pytest.raises(ValueError, match="directions"):
            random_scenes(1, 5, 64, 64, directions=bad)


@pytest.mark.parametrize("direction", list(DIRECTIONS))
def test_measure_motion_recovers_the_rendered_speed(direction):
    from diffattn.pipelines.tiny import measure_motion

    scene = Scene("triangle", "orange", "purple", direction, x=30.0, y=34.0, radius=7.0, speed=2.75)
    video = render_videos([scene], 7, 64, 64)[0].permute(1, 2, 3, 0).numpy()
    got = measure_motion(video, scene_prompt(scene))
    assert got["speed"] == pytest.approx(2.75, abs=0.02) and abs(got["drift"]) < 0.02
    dx, dy = DIRECTIONS[direction]
    np.testing.assert_allclose(got["centroids"][-1] - got["centroids"][0], [6 * 2.75 * dx, 6 * 2.75 * dy], atol=0.1)
    opposite = {"left": "right", "right": "left", "up": "down", "down": "up"}[direction]
    assert measure_motion(video, scene_prompt(scene).replace(direction, opposite))["speed"] == pytest.approx(
        -2.75, abs=0.02
    )
    assert measure_motion(video, "a triangle")["speed"] is None  # no colours or direction named
    with pytest.raises(ValueError, match="video must be"):
        measure_motion(video[0], scene_prompt(scene))


def _train_tiny_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "scripts" / "train_tiny.py"
    spec = importlib.util.spec_from_file_location("train_tiny", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_training_origin_sits_lead_pixels_behind_the_trajectory_middle():
    make_batch = _train_tiny_module().make_batch
    g = torch.Generator().manual_seed(6)
    videos, prompts, origin = make_batch(8, [5], 64, 48, g, 0.0, (0.15, 0.19), 1.0, lead=6.0)
    assert origin.shape == (8, 2)
    frames = ((videos + 1) / 2).permute(0, 2, 3, 4, 1).numpy()  # [B, F, H, W, 3]
    for video, prompt, o in zip(frames, prompts, origin.tolist()):
        words = parse_prompt(prompt)
        dx, dy = DIRECTIONS[words["direction"]]
        cx, cy = _centroids(_coverage(video, words["color"], words["background"]))[2] + 0.5  # middle frame
        # the middle of the trajectory, in the training coordinates, is `lead` pixels along the direction
        along_x = (pixel_to_position(cx, 48) - o[1]) * (48 - 1) / 2
        along_y = (pixel_to_position(cy, 64) - o[0]) * (64 - 1) / 2
        assert (along_x, along_y) == pytest.approx((6.0 * dx, 6.0 * dy), abs=0.35)
    assert make_batch(2, [3], 64, 64, g, 0.0, (0.15, 0.19))[2] is None  # no lead: frame-centred origin


# ------------------------------------------------------------------------------------ text encoder
def test_tokenizer_handles_unknown_words_case_punctuation_and_length(pipe):
    te = pipe.text_encoder
    ids, lengths = te.tokenize(["A RED circle, zorp!!", "", " ".join(["red"] * 40)])
    vocab = te.config.vocab
    assert [vocab[i] for i in ids[0, :4]] == ["a", "red", "circle", "<unk>"]
    assert lengths.tolist() == [4, 0, te.config.max_length]
    out = te(ids, lengths)
    assert out.shape == (3, te.config.max_length, te.config.out_dim)
    assert torch.isfinite(out).all()
    assert (out[0, 4:] == 0).all() and (out[1] == 0).all()
    with pytest.raises(TypeError, match="prompt must be a string"):
        te.tokenize([3])


def test_word_skip_adds_each_words_own_embedding_and_growing_it_changes_nothing():
    from diffattn.pipelines.tiny import TinyTextEncoder

    torch.manual_seed(0)
    plain = TinyTextEncoder(max_length=8, embed_dim=16, hidden_dim=16, out_dim=24)
    grown = _train_tiny_module()._add_word_skip(plain)
    assert grown.config.word_skip and not plain.config.word_skip
    ids, lengths = plain.tokenize(["a red circle moving left", "the blue square", ""])
    with torch.no_grad():
        torch.testing.assert_close(grown(ids, lengths), plain(ids, lengths), rtol=0, atol=0)  # new table is zero
        grown.word.weight.normal_()
        grown.word.weight[0].zero_()
        out, base = grown(ids, lengths), plain(ids, lengths)
    # inside each prompt: the plain encoding plus the word's row; past it (and for the empty prompt): zeros
    for row in range(3):
        n = int(lengths[row])
        torch.testing.assert_close(out[row, :n], base[row, :n] + grown.word.weight[ids[row, :n]])
        assert (out[row, n:] == 0).all()


# ---------------------------------------------------------------------------------------- pipeline
def test_shipped_model_is_a_wan_transformer_with_enough_tokens(pipe):
    assert isinstance(pipe, TinyVideoPipeline)
    assert isinstance(pipe.transformer, WanTransformer3DModel)
    cfg = pipe.transformer.config
    assert cfg.attention_head_dim >= 32
    pf, ph, pw = cfg.patch_size
    assert (9 // pf) * (64 // ph) * (64 // pw) == 9 * 16 * 16
    size = sum(f.stat().st_size for f in tiny_asset_dir().rglob("*") if f.is_file())
    assert size < 8 * 2**20
    # it predicts the clean video and sees absolute positions
    assert pipe.config.prediction_type == "sample"
    assert (cfg.in_channels, cfg.out_channels) == (3 + POSITION_CHANNELS, 3)


def test_position_channels():
    pos = position_channels(2, 5, 4, 6)
    assert pos.shape == (2, 3, 5, 4, 6)
    assert pos[0, 0, :, 0, 0].tolist() == [-0.5, -0.25, 0.0, 0.25, 0.5]  # frames from the middle, /4
    assert pos[0, 1, 0, :, 0].tolist() == pytest.approx([-1, -1 / 3, 1 / 3, 1])  # y
    assert pos[1, 2, 3, 2, :].tolist() == pytest.approx([-1, -0.6, -0.2, 0.2, 0.6, 1])  # x
    lat = torch.randn(2, 3, 5, 4, 6)
    assert with_position_channels(lat, 3) is lat
    both = with_position_channels(lat, 6)
    assert torch.equal(both[:, :3], lat) and torch.equal(both[:, 3:], pos)
    with pytest.raises(ValueError, match="position channels"):
        with_position_channels(lat, 5)
    origin = torch.tensor([[0.0, 0.0], [0.5, -0.25]])
    moved = with_position_channels(lat, 6, origin=origin)[:, 3:]
    assert torch.equal(moved[0], pos[0]) and torch.equal(moved[1, 0], pos[1, 0])  # frame channel unchanged
    assert torch.allclose(moved[1, 1], pos[1, 1] - 0.5) and torch.allclose(moved[1, 2], pos[1, 2] + 0.25)
    assert pixel_to_position(0.5, 4) == -1 and pixel_to_position(3.5, 4) == 1
    with pytest.raises(ValueError, match="origin"):
        position_channels(2, 5, 4, 6, origin=torch.zeros(2, 3))


def test_call_shapes_seeds_and_bad_sizes(pipe):
    def run(seed, **kw):
        return pipe(
            ["a red circle moving left on a blue background", "zorp"], num_frames=2, height=32, width=24,
            num_inference_steps=2, generator=torch.Generator().manual_seed(seed), **kw,
        ).frames

    a, b, c = run(0), run(0), run(1)
    assert a.shape == (2, 2, 32, 24, 3) and a.dtype == np.float32
    assert a.min() >= 0 and a.max() <= 1
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).mean() > 1e-3
    pt = run(0, output_type="pt")
    assert pt.shape == (2, 2, 3, 32, 24)
    np.testing.assert_allclose(pt.permute(0, 1, 3, 4, 2).numpy(), a, atol=1e-6)
    for kwargs, name in (({"height": 30}, "height"), ({"width": 0}, "width"), ({"num_frames": 0}, "num_frames")):
        with pytest.raises(ValueError, match=name):
            pipe("a red circle", **{"num_frames": 2, "height": 32, "width": 32, **kwargs})


def test_save_and_load_folder_round_trip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "tiny")
    again = load_pipeline(tmp_path / "tiny")
    assert isinstance(again, TinyVideoPipeline)
    for a, b in zip(pipe.transformer.state_dict().values(), again.transformer.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        load_pipeline(tmp_path)
    with pytest.raises(FileNotFoundError, match="neither an existing folder nor a hub id"):
        load_pipeline(str(tmp_path / "missing"))


def test_folder_saved_before_the_package_split_still_loads(pipe, tmp_path):
    """Folders written before the tiny model moved into its own module name the package itself as the
    text encoder's library."""
    import json
    import shutil

    folder = shutil.copytree(tiny_asset_dir(), tmp_path / "old")
    index = json.loads((folder / "model_index.json").read_text())
    assert index["text_encoder"][0] == "diffattn.pipelines.tiny.model"
    index["text_encoder"][0] = "diffattn.pipelines.tiny"
    (folder / "model_index.json").write_text(json.dumps(index))
    old = load_pipeline(folder)
    for a, b in zip(pipe.text_encoder.state_dict().values(), old.text_encoder.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_dense_processor_matches_model_attention(pipe):
    import diffattn

    kw = dict(num_frames=5, height=64, width=64, num_inference_steps=2, output_type="latent")
    ref = pipe("a green square moving up on a white background", generator=torch.Generator().manual_seed(0), **kw).frames
    diffattn.apply(pipe, "dense", backend="torch")
    try:
        out = pipe("a green square moving up on a white background", generator=torch.Generator().manual_seed(0), **kw).frames
        assert diffattn.stats(pipe).summary()["calls"] == 2 * 2 * pipe.transformer.config.num_layers
    finally:
        diffattn.remove(pipe)
    torch.testing.assert_close(out, ref, atol=MODEL_TOL[0], rtol=MODEL_TOL[1])


# ----------------------------------------------------------------------------- the model learned
PROMPTS = [  # one per direction: (prompt, shape colour, background, direction)
    ("a red circle moving right on a blue background", "red", "blue", "right"),
    ("a yellow square moving up on a black background", "yellow", "black", "up"),
    ("a white triangle moving left on a green background", "white", "green", "left"),
    ("an orange circle moving down on a purple background", "orange", "purple", "down"),
]


# Bounds on the shipped weights' motion in these samples: the centroid's fitted speed along the prompted
# direction, px per frame (training videos: 2.9-3.5; measured 2.76-3.21), and its drift across it
# (measured |drift| <= 0.16). A model that draws the shape in place scores ~0 on speed.
MOTION_MIN_SPEED = 2.0
MOTION_MAX_DRIFT = 0.6


@pytest.fixture(scope="module")
def samples(pipe):
    """The shipped model's videos of PROMPTS at the default size and steps."""
    frames = pipe(
        [p for p, *_ in PROMPTS], num_inference_steps=20, generator=torch.Generator().manual_seed(0)
    ).frames
    assert frames.shape == (len(PROMPTS), 9, 64, 64, 3)
    return frames


def _fit_slope(values):
    t = np.arange(len(values)) - (len(values) - 1) / 2
    return float((t * (values - values.mean())).sum() / (t * t).sum())


def test_trained_model_draws_the_prompted_scene(samples):
    """The prompted background and one compact shape of the prompted colour in every frame."""
    names = list(COLORS)
    palette = np.stack([_color(n) for n in names])
    ys, xs = np.mgrid[:64, :64]
    for video, (prompt, color, background, _) in zip(samples, PROMPTS):
        bg = np.median(video.reshape(-1, 3), 0)
        assert names[np.abs(palette - bg).sum(1).argmin()] == background, (prompt, bg)
        fg = _foreground(video, _color(background))  # [F, H, W]
        # one shape of about the trained size (radius 0.15-0.19 of the frame: 7-11 % of the pixels)
        share = fg.mean((1, 2))
        assert (share > 0.03).all() and (share < 0.25).all(), (prompt, share)
        # mostly the prompted colour
        nearest = np.abs(video[fg][:, None] - palette[None]).sum(-1).argmin(1)
        assert np.mean(nearest == names.index(color)) > 0.6, (prompt, np.bincount(nearest, minlength=len(names)))
        # compact (the trained shapes are 7-11 px in half-extent): nearly all of it within 18 px of its
        # centroid, and the whole trajectory inside the frame
        cent = _centroids(fg.astype(np.float32))
        for f in range(9):
            dist = np.hypot(xs - cent[f, 0], ys - cent[f, 1])[fg[f]]
            assert np.mean(dist < 18) > 0.9, (prompt, f)
        assert (cent > 8).all() and (cent < 56).all(), (prompt, cent)


def test_trained_model_moves_the_shape_the_way_the_prompt_says(samples):
    """From pure noise, the shape travels along the prompted direction (the training videos: ~3.2 px a
    frame, 25 px over 9 frames) and stays put across it."""
    for video, (prompt, color, background, direction) in zip(samples, PROMPTS):
        along = np.array(DIRECTIONS[direction], dtype=np.float64)
        across = along[::-1]
        cent = _centroids(_coverage(video, color, background))
        speed, drift = _fit_slope(cent @ along), _fit_slope(cent @ across)
        assert speed > MOTION_MIN_SPEED, (prompt, speed, cent)
        assert abs(drift) < MOTION_MAX_DRIFT, (prompt, drift, cent)


def test_trained_model_denoises_motion(pipe):
    """Given a half-noised video of a moving shape, the clean-video prediction follows the motion frame by
    frame (the attention tracks the shape across frames)."""
    from diffattn.pipelines.tiny import with_position_channels

    g = torch.Generator().manual_seed(11)
    scenes = [  # trajectories centred in the frame, ~3 px a frame, as in the training data
        Scene("circle", "red", "blue", "right", 20.0, 32.0, 11.0, 3.0),
        Scene("square", "yellow", "purple", "down", 32.0, 20.0, 11.0, 3.0),
        Scene("triangle", "white", "green", "left", 44.0, 32.0, 11.0, 3.0),
        Scene("circle", "green", "black", "up", 32.0, 44.0, 11.0, 3.0),
    ]
    x0 = render_videos(scenes, 9, 64, 64) * 2 - 1
    sigma = 0.3
    xt = (1 - sigma) * x0 + sigma * torch.randn(x0.shape, generator=g)
    model = pipe.transformer
    emb = pipe.text_encoder.encode([scene_prompt(s) for s in scenes])
    with torch.no_grad():
        pred = model(with_position_channels(xt, model.config.in_channels), torch.full((4,), 1000 * sigma), emb,
                     return_dict=False)[0]
    pred_video = ((pred + 1) / 2).clamp(0, 1).permute(0, 2, 3, 4, 1).numpy()  # [B, F, H, W, 3]
    for video, s in zip(pred_video, scenes):
        truth = _centroids(_coverage(render_videos([s], 9, 64, 64)[0].permute(1, 2, 3, 0).numpy(), s.color,
                                     s.background))
        got = _centroids(_coverage(video, s.color, s.background))
        assert np.abs(got - truth).max() < 3.0, (scene_prompt(s), got - truth)
        assert np.linalg.norm(got[-1] - got[0]) > 15  # it moved about 25 px


@pytest.mark.parametrize("prediction_type", ["sample", "velocity"])
def test_sampler_lands_on_an_exact_prediction(prediction_type, monkeypatch):
    """An oracle transformer (x0 = C, or the velocity that leads to C) makes the Euler sampler end on C,
    with guidance too: the pipeline's conversion between predictions is exact."""
    from diffattn.pipelines.tiny import build_tiny_pipeline

    p = build_tiny_pipeline(prediction_type=prediction_type)
    p.set_progress_bar_config(disable=True)
    target = torch.linspace(-0.9, 0.9, 3 * 2 * 8 * 8).view(1, 3, 2, 8, 8)
    sigmas = []

    def oracle(hidden_states, timestep, **kw):
        sigma = float(timestep.flatten()[0]) / 1000
        sigmas.append(sigma)
        assert torch.equal(hidden_states[:, 3:], position_channels(1, 2, 8, 8))
        x = hidden_states[:, :3]
        x0 = target.expand_as(x)
        out = x0 if prediction_type == "sample" else (x - x0) / sigma
        return (out,)

    monkeypatch.setattr(p.transformer, "forward", oracle)
    video = p("a red circle", num_frames=2, height=8, width=8, num_inference_steps=5, guidance_scale=3.0,
              output_type="pt", generator=torch.Generator().manual_seed(0)).frames
    expected = ((target + 1) / 2).permute(0, 2, 1, 3, 4)
    torch.testing.assert_close(video, expected, atol=1e-5, rtol=0)
    assert len(sigmas) == 10 and min(sigmas) > 0


def test_bad_prediction_type_is_refused():
    from diffattn.pipelines.tiny import build_tiny_pipeline

    with pytest.raises(ValueError, match="prediction_type"):
        build_tiny_pipeline(prediction_type="epsilon")


def test_step_callback_sees_the_latents(pipe):
    seen = []

    def callback(p, i, t, values):
        seen.append((i, values["latents"].shape))
        return {}

    pipe("a red circle moving left on a blue background", num_frames=5, height=32, width=32,
         num_inference_steps=2, generator=torch.Generator().manual_seed(0), callback_on_step_end=callback)
    assert [i for i, _ in seen] == [0, 1] and all(len(s) == 5 for _, s in seen)
