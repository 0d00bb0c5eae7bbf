"""outdir.py: the manifest records every write, deletes exactly its files, and no folder can steer it outside."""
import json
import os

import pytest

from minimal_amkp.run import outdir
from minimal_amkp.run.atomic import atomic_write_text
from minimal_amkp.config import RunError


def test_writes_are_recorded_before_they_happen_and_overwrite_deletes_only_those(tmp_path):
    out = tmp_path / "out"
    folder = outdir.Folder(str(out))
    folder.lock()
    try:
        atomic_write_text(out / "config.json", "{}")
        atomic_write_text(out / "figures" / "a.png", "x")
        atomic_write_text(tmp_path / "elsewhere.txt", "not ours")         # outside --out: not recorded
        assert outdir.read_manifest(str(out)) == ["config.json", "figures/a.png"]
        (out / "notes.txt").write_text("a user's")
        (out / "figures" / "b.png").write_text("a user's")
        assert outdir.foreign(str(out), folder.files) == ["notes.txt", "figures/b.png"]
        folder.remove_outputs()
    finally:
        folder.release()
    assert sorted(os.listdir(out)) == [outdir.LOCK, outdir.MANIFEST, "figures", "notes.txt"]
    assert os.listdir(out / "figures") == ["b.png"] and (tmp_path / "elsewhere.txt").exists()


@pytest.mark.parametrize("manifest", [
    {"program": "minimal_amkp", "files": ["../victim.txt"]},
    {"program": "minimal_amkp", "files": ["/etc/hostname"]},
    {"program": "minimal_amkp", "files": ["a/../../victim.txt"]},
    {"program": "something else", "files": []},
    {"program": "minimal_amkp", "files": "config.json"},
    [],
])
def test_a_hostile_manifest_is_refused_and_nothing_is_deleted(tmp_path, manifest):
    (tmp_path / "victim.txt").write_text("keep")
    out = tmp_path / "out"
    out.mkdir()
    (out / outdir.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(RunError, match=r"\.amkp-manifest\.json: not a manifest of minimal_amkp"):
        outdir.Folder(str(out)).lock()
    assert (tmp_path / "victim.txt").read_text() == "keep"


def test_a_linked_folder_cannot_lead_the_deletion_outside(tmp_path):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "a.png").write_text("keep")
    out.mkdir()
    os.symlink(elsewhere, out / "figures")
    (out / outdir.MANIFEST).write_text(json.dumps({"program": "minimal_amkp", "files": ["figures/a.png"]}))
    folder = outdir.Folder(str(out))
    folder.lock()
    try:
        with pytest.raises(RunError, match=r"figures/a\.png: refusing to write outside"):
            folder.remove_outputs()
    finally:
        folder.release()
    assert (elsewhere / "a.png").read_text() == "keep"


def test_one_lock_per_folder_even_within_a_process(tmp_path):
    first, second = outdir.Folder(str(tmp_path)), outdir.Folder(str(tmp_path))
    first.lock()
    try:
        with pytest.raises(RunError, match=rf"another run is using this folder \(pid {os.getpid()} on "):
            second.lock()
    finally:
        first.release()
    second.lock()
    second.release()
