"""`diffattn draw <pattern>`: every method's pattern drawing runs from the command line and writes an image
(the radial and gna drawings are checked in their own test files)."""

import pytest

from diffattn import cli

SMALL = {
    "adaspa": ["--grid", "2", "8", "8", "--heads", "2"],
    "paro": ["--grid", "2", "8", "8", "--heads", "2"],
    "tome": ["--grid", "16", "16"],
}


@pytest.mark.parametrize("which", sorted(SMALL))
def test_draw_writes_an_image(which, tmp_path, capsys):
    out = tmp_path / f"{which}.png"
    assert cli.main(["draw", which, *SMALL[which], "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 1000


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
