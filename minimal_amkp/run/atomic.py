"""Write files so that a reader never sees half of one.

Every output and checkpoint goes to a temporary file in the same folder, is flushed to disk
and then renamed over the target: `os.replace` is atomic on POSIX, so an interrupted run
leaves either the old file or the new one, never a truncated mix, and at worst a stale
`.<name>.<8 characters>.tmp` beside it (outdir.py removes those when the next run starts).
The temporary file is created with mode 0o666 less the umask, as `open` would create the
target, so outputs are as readable as the user's umask says. A failed write (a full disk, a
folder one may not write) is a one-line WriteError.
"""
import contextlib
import os
import re
import secrets

from minimal_amkp.config import RunError

# Matches the temporary files of atomic_open (and of its earlier tempfile.mkstemp versions)
# for a target `name`: TEMPORARY.format(re.escape(name)).
TEMPORARY = r"^\.{}\.[0-9a-z_]{{8}}\.tmp$"
_before_write = []          # callables told the absolute path of every file about to be written


class WriteError(RunError, OSError):
    """An output could not be written; an OSError too, so callers that catch those still do."""


def is_temporary(file_name, target_name):
    """Whether file_name is a temporary file of atomic_open for a target called target_name."""
    return re.match(TEMPORARY.format(re.escape(target_name)), file_name) is not None


@contextlib.contextmanager
def before_write(fn):
    """Call fn(absolute path) before each file atomic_open writes, while the block runs."""
    _before_write.append(fn)
    try:
        yield
    finally:
        _before_write.remove(fn)


def inside(folder, rel):
    """os.path.join(folder, rel), refused with a RunError unless it resolves inside folder.

    Symbolic links are followed, so a link inside folder that points elsewhere is refused too.
    """
    path = os.path.join(folder, rel)
    base = os.path.realpath(folder)
    if os.path.commonpath([base, os.path.realpath(path)]) != base:
        raise RunError(f"{path}: refusing to write outside {folder}")
    return path


def _create(path):
    """(fd, name) of a new temporary sibling of path, mode 0o666 less the umask."""
    folder, name = os.path.split(path)
    while True:
        tmp = os.path.join(folder, f".{name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666), tmp
        except FileExistsError:
            continue


@contextlib.contextmanager
def atomic_open(path, mode="w", **kwargs):
    """Open a temporary sibling of `path` for writing; rename it to `path` on success."""
    if not any(c in mode for c in "wx"):
        raise ValueError(f"atomic_open writes only; got mode={mode!r}")
    path = os.path.abspath(path)
    try:
        for fn in list(_before_write):
            fn(path)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = _create(path)
    except WriteError:
        raise
    except OSError as e:
        raise WriteError(f"{path}: cannot write ({e.strerror or e})") from None
    try:
        with os.fdopen(fd, mode.replace("x", "w"), **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and not isinstance(e, WriteError):
            raise WriteError(f"{path}: cannot write ({e.strerror or e})") from None
        raise


def atomic_write_text(path, text):
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)


def atomic_write_bytes(path, data):
    with atomic_open(path, "wb") as f:
        f.write(data)
