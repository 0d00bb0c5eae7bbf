"""Write files so that a reader never sees half of one.

Every output and checkpoint goes to a temporary file in the same folder, is flushed to disk
and then renamed over the target: `os.replace` is atomic on POSIX, so an interrupted run
leaves either the old file or the new one, never a truncated mix.
"""
import contextlib
import os
import tempfile


@contextlib.contextmanager
def atomic_open(path, mode="w", **kwargs):
    """Open a temporary sibling of `path` for writing; rename it to `path` on success."""
    if not any(c in mode for c in "wx"):
        raise ValueError(f"atomic_open writes only; got mode={mode!r}")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, mode.replace("x", "w"), **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path, text):
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)


def atomic_write_bytes(path, data):
    with atomic_open(path, "wb") as f:
        f.write(data)
