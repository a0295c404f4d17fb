"""File writing that never leaves a partial file behind."""

import os
import tempfile


def check_writable(path, received):
    """The directory of `path`, once it exists and `path` is no directory; `received`: ``path='m.tflite'``."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"The directory to write into does not exist; create it first. Received: {received}")
    if os.path.isdir(path):
        raise ValueError(f"This path is a directory, not a file: name the file to write inside it. Received: {received}")
    return directory


def atomic_write(path, data):
    """Writes `data` to a temporary file next to `path`, then renames it over `path`: never half-written."""
    path = os.fspath(path)
    directory = check_writable(path, f"path={path!r}")
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tfopt-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the user's usual mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
