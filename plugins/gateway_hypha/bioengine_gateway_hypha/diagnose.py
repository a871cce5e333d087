"""Why a connection to a Hypha server failed, as one line with the setting that fixes it.

hypha-rpc reports a refused token as `ConnectionAbortedError("Authentication error: ...")`, a
workspace the token may not enter as "Workspace X does not exist or is not accessible", and a
refused workspace creation as a RemoteException carrying the server's traceback. The operator
gets none of that verbatim: `describe` names the cause, and `permanent` says whether retrying
can help (a server that is down may come back; a rejected token does not become valid).
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass

from .errors import one_line

_AUTH = re.compile(r"authentication error|invalid token|token (has )?expired|jwt|signature", re.I)
_WORKSPACE = re.compile(
    r"workspace \S+ does not exist or is not accessible|permission denied|"
    r"only registered user can create workspace|not allowed|forbidden",
    re.I,
)


@dataclass(frozen=True)
class ConnectionProblem:
    """What went wrong (one line, fix included) and whether retrying can help."""

    message: str
    permanent: bool


def _detail(exc: BaseException) -> str:
    text = one_line(str(exc)) if str(exc) else type(exc).__name__
    # RemoteException text starts "RemoteError:" and the useful part is the last "Exception: ..."
    found = re.findall(r"Exception: ([^:]+?)(?= Exception:|$)", str(exc).replace("\n", " "))
    if text.startswith("RemoteError") and found:
        text = found[0].strip()
    return text[:300]


def describe(exc: BaseException, *, url: str, workspace: str | None) -> ConnectionProblem:
    """Classify a failure of connecting to (or registering on) the Hypha server at `url`."""
    detail = _detail(exc)
    if _AUTH.search(detail):
        return ConnectionProblem(
            f"the Hypha server at {url} refused the token ({detail}): put a valid token in the "
            "variable or file named by the hypha gateway's token_env / token_file",
            permanent=True,
        )
    if _WORKSPACE.search(detail):
        ws = workspace or "(the token's own)"
        return ConnectionProblem(
            f"no access to workspace {ws} on {url} ({detail}): use a token that grants it "
            "(token_env / token_file) or change the hypha gateway's workspace",
            permanent=True,
        )
    if isinstance(exc, TimeoutError | ConnectionError | socket.gaierror | OSError):
        return ConnectionProblem(
            f"no Hypha server answers at {url} ({detail}): check the hypha gateway's server_url "
            "(is the server up and reachable from here?); retrying",
            permanent=False,
        )
    return ConnectionProblem(f"cannot register on the Hypha server at {url}: {detail}", False)


__all__ = ["ConnectionProblem", "describe"]
