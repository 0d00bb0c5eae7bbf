"""atomic.py: whole files or none, modes from the umask, one-line errors, no path outside a folder."""
import errno
import os

import pytest

from minimal_amkp.run import atomic
from minimal_amkp.config import RunError


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_files_are_created_as_the_umask_says(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        atomic.atomic_write_text(tmp_path / "a.txt", "x")
        atomic.atomic_write_bytes(tmp_path / "sub" / "b.bin", b"y")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == mode
    assert (tmp_path / "sub" / "b.bin").stat().st_mode & 0o777 == mode


def test_a_failed_write_is_one_line_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    atomic.atomic_write_text(tmp_path / "a.txt", "old")

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(atomic.os, "fsync", full)
    with pytest.raises(atomic.WriteError, match=r"a\.txt: cannot write \(No space left on device\)$") as e:
        atomic.atomic_write_text(tmp_path / "a.txt", "new")
    assert isinstance(e.value, RunError) and isinstance(e.value, OSError)
    assert os.listdir(tmp_path) == ["a.txt"] and (tmp_path / "a.txt").read_text() == "old"


def test_temporary_names_are_recognised(tmp_path):
    seen = []
    with atomic.before_write(seen.append), atomic.atomic_open(tmp_path / "c.pt", "wb") as f:
        f.write(b"z")
        (tmp_name,) = [n for n in os.listdir(tmp_path) if n != "c.pt"]
    assert atomic.is_temporary(tmp_name, "c.pt") and not atomic.is_temporary(tmp_name, "c.p")
    assert not atomic.is_temporary(".c.pt.tmp", "c.pt") and not atomic.is_temporary("c.pt", "c.pt")
    assert seen == [str(tmp_path / "c.pt")] and os.listdir(tmp_path) == ["c.pt"]


def test_inside_refuses_paths_and_links_that_leave_the_folder(tmp_path):
    (tmp_path / "out").mkdir()
    assert atomic.inside(tmp_path / "out", "figures/a.png") == os.path.join(tmp_path / "out", "figures/a.png")
    for rel in ("../x.png", "/etc/passwd", "figures/../../x.png"):
        with pytest.raises(RunError, match="refusing to write outside"):
            atomic.inside(tmp_path / "out", rel)
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", tmp_path / "out" / "figures")
    with pytest.raises(RunError, match=r"figures/a\.png: refusing to write outside"):
        atomic.inside(tmp_path / "out", "figures/a.png")
