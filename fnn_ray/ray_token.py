"""The authentication token of a private local Ray: readable by this user alone.

Ray turns token authentication on for a local instance and, by default, writes the token to
``~/.ray/auth_token`` with the process umask (usually mode 0644: every user of the machine could read it and
join the instance). :func:`use_private_token` instead writes a fresh token to ``auth_token`` (mode 0600) in a new
directory (mode 0700) under the temporary directory and points ``RAY_AUTH_TOKEN_PATH`` at it, which the Ray
processes started from this one inherit. One token per process; the directory is removed when the process exits.
A token the user chose (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH``) or ``RAY_AUTH_MODE=disabled`` is left alone.
"""

from __future__ import annotations

import atexit
import os
import secrets
import shutil
import tempfile

__all__ = ["TOKEN_PATH_VARIABLE", "use_private_token"]

#: The variable Ray reads the token file's path from (its own name).
TOKEN_PATH_VARIABLE = "RAY_AUTH_TOKEN_PATH"

_path: str | None = None  # this process's token file


def _write_token() -> str:
    directory = tempfile.mkdtemp(prefix="fnn-ray-auth-")  # mode 0700
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    path = os.path.join(directory, "auth_token")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)  # whatever the umask
        f.write(secrets.token_hex(32))
    return path


def use_private_token() -> str | None:
    """Before a private local Ray starts: make this process and the Ray processes it starts use a token file only
    this user can read; return its path (None when the user set a token, a token file or the auth mode)."""
    global _path
    chosen = os.environ.get(TOKEN_PATH_VARIABLE) not in (None, _path) or os.environ.get("RAY_AUTH_TOKEN")
    if chosen or os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return None
    if _path is None or not os.path.isfile(_path):
        _path = _write_token()
    os.environ[TOKEN_PATH_VARIABLE] = _path
    from ray._raylet import AuthenticationTokenLoader

    AuthenticationTokenLoader.instance().reset_cache()  # a token cached by an earlier Ray of this process
    return _path
