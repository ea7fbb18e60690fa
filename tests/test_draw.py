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
