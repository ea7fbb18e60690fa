"""`diffattn draw <pattern>`: every method's pattern drawing runs from the command line and writes an image
(the radial and gna drawings are checked in their own test files)."""

import pytest
import torch

from diffattn import cli
from diffattn.patterns.adaspa import plan_adaspa
from diffattn.patterns.paro import calibrate_paro, threshold_block_mask
from tests import drawn

SMALL = {
    "adaspa": ["--grid", "2", "8", "8", "--heads", "2"],
    "paro": ["--grid", "2", "8", "8", "--heads", "2"],
    "tome": ["--grid", "16", "16"],
}


def _planned(which: str) -> list[torch.Tensor | None]:
    """What each panel of ``diffattn draw <which> SMALL[which]`` must show, from the planners: block
    masks, or for ToMe the tokens kept as they are (drawn black); None for a panel not checked."""
    from diffattn.kernels import BlockSparseLayout, block_mass, block_sparse_attention
    from diffattn.patterns.synthetic import synthetic_qkv

    if which == "tome":
        from diffattn.patterns.tome import bipartite_matching, merge_count, smooth_features

        m = bipartite_matching(smooth_features((16, 16), seed=0), (16, 16), (4, 4), None)
        kept = []
        for ratio in (0.4, 0.95):
            tm = m.merge_plan(merge_count(m.num_tokens, ratio, m.src.numel()))
            kept.append((tm.slot[0] < tm.num_kept).reshape(16, 16))
        return [None, *kept]
    grid = (2, 8, 8)
    q, k, v = synthetic_qkv(grid, heads=2)
    n = q.shape[2]
    _, lse = block_sparse_attention(q, k, v, BlockSparseLayout.dense(1, 1, n, n), backend="torch")
    if which == "adaspa":
        mask, _ = plan_adaspa(block_mass(q, k, lse, 64, 64), 0.8, "topk")
        return [mask[0, 0], mask[0, 1]]
    _, mask, _ = calibrate_paro(q, k, lse, grid, 0.3)
    fhw = threshold_block_mask(block_mass(q, k, lse, 64, 64).mean(0), 0.3)
    return [fhw[0], mask[0], fhw[1], mask[1]]


@pytest.mark.parametrize("which", sorted(SMALL))
def test_draw_shows_the_planned_masks(which, tmp_path, capsys):
    out = tmp_path / f"{which}.png"
    assert cli.main(["draw", which, *SMALL[which], "--out", str(out)]) == 0
    shown = drawn.panels(drawn.read_png(out))
    want = _planned(which)
    assert len(shown) == len(want)
    for panel, mask in zip(shown, want):
        if mask is None:
            continue
        if which == "tome":
            got = torch.from_numpy(drawn.cells(panel, tuple(mask.shape)).max(axis=-1) < 0.05)  # black = kept
        else:
            got = drawn.drawn_mask(panel, tuple(mask.shape))
        assert torch.equal(got, mask)


def test_draw_names_the_pattern_in_errors_and_help(capsys):
    with pytest.raises(SystemExit):
        cli.main(["draw", "nope"])
    assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["draw", "radial", "--help"])
    assert "diffattn draw radial" in capsys.readouterr().out


@pytest.mark.parametrize("out, words", [
    ("pattern.pngx", ".pngx is not an image type; use .png"),
    ("pattern", "no file extension"),
    ("missing-folder/pattern.png", "does not exist"),
])
def test_a_bad_out_is_one_line(out, words, tmp_path, capsys):
    path = str(tmp_path / out)
    assert cli.main(["draw", "tome", "--grid", "8", "8", "--out", path]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("diffattn draw tome: --out") and words in err and path in err


def test_draw_gna_without_options_draws_a_window_smaller_than_the_grid(tmp_path, capsys):
    out = tmp_path / "gna.png"
    assert cli.main(["draw", "gna", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    bound = float(text.split("speedup bound ")[1].split("x")[0])
    assert bound > 2 and out.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("which", sorted(SMALL))
def test_titles_are_not_clipped(which, tmp_path):
    """A clipped title runs into the picture's top edge; a whole one leaves a white margin above it."""
    import numpy as np
    from PIL import Image

    out = tmp_path / f"{which}.png"
    assert cli.main(["draw", which, *SMALL[which], "--out", str(out)]) == 0
    pixels = np.asarray(Image.open(out).convert("L"))
    assert pixels[:8].min() > 240, "something is drawn up to the top edge: a title is cut off"
    assert pixels[: pixels.shape[0] // 8].min() < 100, "no title above the panels"
