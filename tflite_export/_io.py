"""File writing that never leaves a partial file behind."""

import os
import tempfile


def atomic_write(path, data):
    """Writes `data` to a temporary file next to `path`, then renames it over `path`.

    A crash or error leaves `path` as it was (absent or the old content), never half-written.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"The directory to save into does not exist; create it first. Received: path={path!r}"
        )
    if os.path.isdir(path):
        raise ValueError(f"This path is a directory, not a file: pass the file to write inside it. Received: path={path!r}")
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
