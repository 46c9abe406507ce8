"""Every registered figure regenerates into a temporary folder, deterministically."""

import pytest

from course_lib.figures import FIGURES, main, regenerate


def test_all_figures_regenerate_deterministically(tmp_path):
    first = regenerate(tmp_path / "a")
    second = regenerate(tmp_path / "b", only=[p.stem for p in first])
    assert {p.stem for p in first} == set(FIGURES)
    for a, b in zip(first, second):
        assert a.stat().st_size > 1000
        assert a.read_bytes() == b.read_bytes(), f"{a.name} differs between two runs"


def test_cli_writes_one_figure(tmp_path, capsys):
    main(["--out", str(tmp_path), "--only", "01_task_masks"])
    assert (tmp_path / "01_task_masks.svg").exists()
    assert "wrote 1 figures" in capsys.readouterr().out


def test_unknown_figure_is_named():
    with pytest.raises(ValueError, match="only"):
        regenerate("unused", only=["no_such_figure"])


def test_every_figure_is_committed(tmp_path):
    from pathlib import Path

    for path in regenerate(tmp_path):
        committed = Path("figures") / path.name
        assert committed.exists(), f"figures/{path.name} is missing: run python -m course_lib.figures"
