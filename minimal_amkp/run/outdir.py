"""The output folder (--out): one run at a time, a manifest of what it wrote, no leftovers.

Beside the outputs, --out holds two files of its own:
    .amkp-manifest.json   every file the run has written, relative to --out, each recorded
                          before it is first created (atomic.before_write), so after a kill it
                          still names every file, and every temporary file, the run left
    .amkp-lock            flock-ed by the process that uses the folder; the kernel releases
                          the lock when that process ends, however it ends (SIGKILL included)
So `--overwrite` deletes exactly the files of the manifest and leaves anything else alone; a
folder that holds files but no manifest is not a run's, and is refused; and the run that takes
the lock removes the temporary files (`.<name>.<8 characters>.tmp`) a killed run left beside
the manifest's files, and only those.
"""
import contextlib
import fcntl
import json
import os
import posixpath
import threading

from minimal_amkp.run.atomic import atomic_write_text, before_write, inside, is_temporary
from minimal_amkp.config import RunError

MANIFEST = ".amkp-manifest.json"
LOCK = ".amkp-lock"
PROGRAM = "minimal_amkp"


def _entry_ok(rel):
    return (isinstance(rel, str) and rel and not posixpath.isabs(rel) and "\\" not in rel
            and all(part not in ("", ".", "..") for part in rel.split("/")))


def read_manifest(out):
    """The manifest's files (relative paths), or None when --out has no manifest; RunError when
    the file is not a manifest of this program (a folder must not name files for us to delete)."""
    p = os.path.join(out, MANIFEST)
    if not os.path.exists(p):
        return None
    try:
        with open(p, encoding="utf-8") as f:
            m = json.load(f)
    except (OSError, ValueError) as e:
        raise RunError(f"{p}: unreadable manifest ({e}); remove it, or pick another --out") from None
    files = m.get("files") if isinstance(m, dict) and m.get("program") == PROGRAM else None
    if not isinstance(files, list) or not all(_entry_ok(f) for f in files):
        raise RunError(f"{p}: not a manifest of {PROGRAM} (it must list plain paths inside --out); "
                       "remove it, or pick another --out")
    return files


def _folders(files):
    """Every folder that holds a file of `files`, "" (--out itself) included."""
    return {"/".join(f.split("/")[:k]) for f in files for k in range(f.count("/") + 1)} | {""}


def _names_in(folder, files):
    return {posixpath.basename(f) for f in files if posixpath.dirname(f) == folder}


def foreign(out, files):
    """Paths in --out (top level, and the folders of the manifest's files) that no run wrote."""
    ours, folders = set(files) | {MANIFEST, LOCK}, _folders(files)
    found = []
    for folder in sorted(folders):
        where = os.path.join(out, folder)
        if not os.path.isdir(where):
            continue
        names = _names_in(folder, ours)
        for entry in sorted(os.listdir(where)):
            rel = posixpath.join(folder, entry) if folder else entry
            if rel not in ours and rel not in folders and not any(is_temporary(entry, n) for n in names):
                found.append(rel)
    return found


class Folder:
    """--out as one run uses it: `lock` takes it (and starts recording), `release` lets it go."""

    def __init__(self, out):
        self.out = out
        self.files = []
        self._fd = None
        self._stack = contextlib.ExitStack()
        self._mutex = threading.Lock()

    def lock(self):
        """Create --out, take its lock, remove stale temporary files and record every write from now on.

        RunError, before anything else is written, when the folder cannot be created or
        written, or another run holds it.
        """
        lock = os.path.join(self.out, LOCK)
        try:
            os.makedirs(self.out, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError as e:
            raise RunError(f"--out {self.out}: cannot write there ({e.strerror or e})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunError(f"--out {self.out}: another run is using this folder ({holder}); "
                           "wait for it to end or pick another --out") from None
        self._fd = fd
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {os.uname().nodename}\n".encode())
        self.files = read_manifest(self.out) or []
        self._remove_temporaries()
        self._write()                                # also proves --out is writable
        self._stack.enter_context(before_write(self._record))

    def release(self):
        self._stack.close()
        if self._fd is not None:
            os.close(self._fd)                       # closing the descriptor drops the flock
            self._fd = None

    def remove_outputs(self):
        """Delete the manifest's files (nothing else), and the folders they leave empty."""
        for rel in self.files:
            p = inside(self.out, rel)               # a linked folder must not lead the deletion outside
            if os.path.isfile(p) or os.path.islink(p):
                os.unlink(p)
        for folder in sorted(_folders(self.files) - {""}, key=len, reverse=True):
            with contextlib.suppress(OSError):
                os.rmdir(os.path.join(self.out, folder))
        self.files = []
        self._write()

    def _remove_temporaries(self):
        for folder in _folders(self.files):
            where = os.path.join(self.out, folder)
            names = _names_in(folder, self.files + [MANIFEST])
            if not os.path.isdir(where):
                continue
            for entry in os.listdir(where):
                p = os.path.join(where, entry)
                if any(is_temporary(entry, n) for n in names) and not os.path.isdir(p):
                    os.unlink(inside(self.out, os.path.relpath(p, self.out)))

    def _write(self):
        atomic_write_text(os.path.join(self.out, MANIFEST),
                          json.dumps({"program": PROGRAM, "files": sorted(self.files)}, indent=1) + "\n")

    def _record(self, path):
        rel = os.path.relpath(path, os.path.abspath(self.out))
        if rel.startswith(os.pardir) or os.path.isabs(rel) or rel == MANIFEST:
            return
        rel = rel.replace(os.sep, "/")
        with self._mutex:
            if rel not in self.files:
                self.files.append(rel)
                self._write()
