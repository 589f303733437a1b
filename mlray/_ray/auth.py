"""Ray token auth for the local head mlray starts, and how this venv's Ray CLIs find the token
(written for Ray 2.60.0).

Ray 2.60 takes its auth mode only from ``RAY_AUTH_MODE``, reads it once per process (at ``import ray``), and
its CLIs (``ray job submit``, ``serve deploy``, ``serve status``) send the token only when their own process
is in token mode. A head in token mode would refuse the README's commands run from a plain shell, so:

- :func:`ensure_token`: the token file mlray creates, 64 hex characters, mode 0600, never overwritten; a
  file that others may read is refused.
- the hook: ``mlray-ray-auth.pth`` in this venv's site-packages, which Python's ``site`` runs at the start of
  every process of the venv. Only when the process has none of ``RAY_AUTH_MODE``, ``RAY_AUTH_TOKEN`` and
  ``RAY_AUTH_TOKEN_PATH``, and mlray's record of its running local head names a token file, does it set
  ``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN_PATH`` for that process (and the ones it starts). It reads
  three variables, and one small file only when none is set; it never raises. ``mlray down`` removes it.
- :func:`refresh_ray_config`: a process that imported Ray before mlray set its environment re-reads it.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import stat
import sys
import sysconfig
from collections.abc import Mapping
from pathlib import Path

from mlray._ray import check_version
from mlray.errors import MlrayError

logger = logging.getLogger(__name__)

# Ray's own variables, in the order Ray looks for a token (after the mode).
AUTH_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
TOKEN_PATTERN = re.compile(r"[0-9a-f]{64}")
HOOK_FILE = "mlray-ray-auth.pth"

# What the hook runs, with RECORD set to the record of the head it was written for; $MLRAY_HOME (a
# different state folder) names another record. Every name it binds stays in its own namespace.
HOOK_SOURCE = """\
try:
    import os
    if not any(key in os.environ for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")):
        if os.environ.get("MLRAY_HOME"):
            RECORD = os.path.join(os.path.abspath(os.path.expanduser(os.environ["MLRAY_HOME"])), "cluster.json")
        if os.path.isfile(RECORD):
            import json
            with open(RECORD) as f:
                token_path = json.load(f).get("token_path")
            if isinstance(token_path, str) and os.path.isfile(token_path):
                os.environ["RAY_AUTH_MODE"] = "token"
                os.environ["RAY_AUTH_TOKEN_PATH"] = token_path
except Exception:
    pass
"""


def ensure_token(path: Path) -> Path:
    """The token at ``path``: created (64 hex characters, mode 0600, in a 0700 folder) if missing, else
    checked: a token that others may read, or that is not one, is refused with what to do."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        check_token_file(path)
        return path
    with os.fdopen(fd, "w") as out:
        out.write(secrets.token_hex(32))
    logger.info("Created the local Ray head's auth token at %s (mode 0600)", path)
    return path


def check_token_file(path: Path) -> None:
    info = path.stat()
    if info.st_mode & 0o077:
        raise MlrayError(f"the Ray auth token {path} has mode {stat.filemode(info.st_mode)}: others may read it; "
                         f"run `chmod 600 {path}` (or delete it and mlray creates a new one)")
    if info.st_uid != os.getuid():
        raise MlrayError(f"the Ray auth token {path} belongs to uid {info.st_uid}, not to this user "
                         f"({os.getuid()}); delete it and mlray creates a new one")
    if not TOKEN_PATTERN.fullmatch(path.read_text().strip()):
        raise MlrayError(f"{path} does not hold a Ray auth token (64 hex characters); delete it and mlray "
                         "creates a new one")


def token_of(env: Mapping[str, str]) -> str | None:
    """The token a process with ``env`` sends, as Ray looks it up, or None (token auth off, or no token)."""
    if env.get("RAY_AUTH_MODE", "disabled").lower() != "token":
        return None
    if env.get("RAY_AUTH_TOKEN"):
        return env["RAY_AUTH_TOKEN"].strip()
    path = Path(env["RAY_AUTH_TOKEN_PATH"]) if env.get("RAY_AUTH_TOKEN_PATH") else Path.home() / ".ray" / "auth_token"
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def bearer(env: Mapping[str, str]) -> dict[str, str]:
    """The header Ray's dashboard wants from a process with ``env`` ({} without token auth)."""
    token = token_of(env)
    return {"Authorization": f"Bearer {token}"} if token else {}


def refresh_ray_config() -> None:
    """Make a process that imported Ray already see the ``RAY_AUTH_*`` now in its environment.

    Ray reads its config when it is imported; ``ray.init`` later would not notice the mode, and its calls to a
    token head would be refused. This is what Ray's own ``_enable_token_auth`` does.
    """
    if "ray" not in sys.modules or sys.modules["ray"].is_initialized():  # connected: its mode is settled
        return
    check_version("auth config refresh")
    from ray._raylet import AuthenticationTokenLoader, Config  # type: ignore[attr-defined]

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def hook_line(record: Path) -> str:
    """The one line of the ``.pth`` file (``site`` executes lines that start with ``import``)."""
    return f"import os; exec({HOOK_SOURCE!r}, {{'RECORD': {str(record)!r}}})\n"


def hook_folder() -> Path | None:
    """This interpreter's site-packages when it runs in a virtual environment (never a system Python)."""
    if sys.prefix == sys.base_prefix:
        return None
    return Path(sysconfig.get_paths()["purelib"])


def install_hook(record: Path) -> Path | None:
    """Write the hook for the head whose record is ``record``; returns its path, or None where there is no
    venv or it cannot be written (then the user sets the variables; the log says which)."""
    folder = hook_folder()
    if folder is None or not os.access(folder, os.W_OK):
        logger.warning("Not in a writable virtual environment: Ray's CLIs here need `export RAY_AUTH_MODE=token "
                       "RAY_AUTH_TOKEN_PATH=<token>` (the token path is in %s)", record)
        return None
    path = folder / HOOK_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(hook_line(record))
    tmp.replace(path)  # a process starting meanwhile reads the old line or the new, never half of one
    return path


def remove_hook(record: Path) -> bool:
    """Remove the hook if it was written for ``record`` (another head's stays); returns whether it did."""
    folder = hook_folder()
    path = folder / HOOK_FILE if folder is not None else None
    if path is None or not path.exists() or path.read_text() != hook_line(record):
        return False
    path.unlink()
    return True
