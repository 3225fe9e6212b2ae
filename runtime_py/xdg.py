"""XDG_RUNTIME_DIR for processes that have none, so Mesa's Vulkan drivers stay quiet on stderr.

Mesa's drivers (lavapipe among them) load the Wayland client library when the
Vulkan instance enumerates its adapters, and it prints "error: XDG_RUNTIME_DIR
is invalid or not set in the environment." when the variable is unset: on
servers, in containers, under cron or ssh without a login session. Nothing here
uses the directory; an empty private one (0700 and per user, as the XDG spec
asks of it) quiets the message. `make` sets its own; a variable already set is kept.
"""

import os
import stat
import sys
import tempfile


def ensure_xdg_runtime_dir() -> None:
    """Set XDG_RUNTIME_DIR to a private directory of this user's when it is unset (Linux only; never raises)."""
    if os.environ.get("XDG_RUNTIME_DIR") or not sys.platform.startswith("linux"):
        return
    uid = os.getuid()
    path = os.path.join(tempfile.gettempdir(), f"executorch_wgpu-xdg-{uid}")
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.lstat(path)
    except OSError:
        return
    # Someone else's, a link, or open to others: not a runtime directory; leave the variable unset.
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid or st.st_mode & 0o077:
        return
    os.environ["XDG_RUNTIME_DIR"] = path
