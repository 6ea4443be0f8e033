"""llavakit.fileio: a write either lands whole or leaves the old file and no temp file behind."""

from __future__ import annotations

import pytest

from llavakit.fileio import atomic_path, atomic_write_bytes, atomic_write_text, save_figure


def test_write_replaces_whole_file_and_creates_folder(tmp_path):
    dst = tmp_path / "sub" / "a.json"
    assert atomic_write_text(dst, "one") == dst
    atomic_write_text(dst, "two")
    assert dst.read_text() == "two"
    atomic_write_bytes(dst, b"\x00three")
    assert dst.read_bytes() == b"\x00three"
    assert sorted(p.name for p in dst.parent.iterdir()) == ["a.json"]


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_failed_write_keeps_old_file_and_removes_temp(tmp_path, exc):
    dst = tmp_path / "w.safetensors"
    dst.write_text("old")
    with pytest.raises(exc):
        with atomic_path(dst) as tmp:
            tmp.write_text("half")
            raise exc("stopped mid-write")
    assert dst.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


def test_concurrent_writers_get_their_own_temp_files(tmp_path):
    dst = tmp_path / "x.txt"
    with atomic_path(dst) as a, atomic_path(dst) as b:
        assert a != b and a.parent == b.parent == tmp_path
        a.write_text("first")
        b.write_text("second")
    # b's block exits first, then a's: the last replace wins, whole
    assert dst.read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["x.txt"]


def test_permissions_follow_umask_or_the_replaced_file(tmp_path):
    import os

    import torch
    from safetensors.torch import save_file

    old = os.umask(0o022)
    try:
        new = tmp_path / "new.safetensors"
        with atomic_path(new) as tmp:
            save_file({"w": torch.zeros(2)}, str(tmp))
        assert new.stat().st_mode & 0o777 == 0o644  # as open() would give, not mkstemp's 0o600
        kept = tmp_path / "kept.json"
        kept.write_text("{}")
        kept.chmod(0o600)
        atomic_write_text(kept, "[]")
        assert kept.stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


def test_umask_is_read_without_changing_it():
    import os

    from llavakit.fileio import _umask

    old = os.umask(0o027)
    try:
        assert _umask() == 0o027
        assert os.umask(0o027) == 0o027  # still set
    finally:
        os.umask(old)


def test_save_figure_writes_the_suffix_format_and_keeps_the_old_plot_on_failure(tmp_path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2, 2))
    FigureCanvasAgg(fig)
    fig.subplots().plot([0, 1], [1, 0])
    png = save_figure(fig, tmp_path / "plots" / "a.png", dpi=50)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert save_figure(fig, tmp_path / "a.svg").read_text().lstrip().startswith("<?xml")
    old = png.read_bytes()

    class Broken:
        def savefig(self, path, **kw):
            open(path, "wb").write(b"half a plot")
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        save_figure(Broken(), png)
    assert png.read_bytes() == old and sorted(p.name for p in png.parent.iterdir()) == ["a.png"]
