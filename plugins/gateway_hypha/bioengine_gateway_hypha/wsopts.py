"""Per-connection WebSocket compression switch for hypha-rpc (which offers no option for it).

hypha-rpc opens its WebSocket with the `websockets` default, permessage-deflate. The gateway
turns it off for its own connection only: a context variable set while it connects is
inherited by the tasks hypha-rpc starts then (including its reconnection loop), and the
connection's `_ws_connect_kwargs` consults it. Other hypha-rpc clients in the process are
unaffected. If hypha-rpc changes its internals the switch silently does nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

_NO_DEFLATE: ContextVar[bool] = ContextVar("bioengine_hypha_no_deflate", default=False)


def _install() -> bool:
    """Wrap hypha-rpc's connect kwargs once; False if its internals are not as expected."""
    try:
        from hypha_rpc import websocket_client
    except ImportError:  # pragma: no cover
        return False
    cls = getattr(websocket_client, "WebsocketRPCConnection", None)
    original = getattr(cls, "_ws_connect_kwargs", None)
    if original is None:
        return False
    if getattr(original, "_bioengine_wrapped", False):
        return True

    def connect_kwargs(self):  # type: ignore[no-untyped-def]
        kwargs = original(self)
        if _NO_DEFLATE.get():
            kwargs["compression"] = None
        return kwargs

    connect_kwargs._bioengine_wrapped = True  # type: ignore[attr-defined]
    cls._ws_connect_kwargs = connect_kwargs  # type: ignore[union-attr]
    return True


@contextlib.contextmanager
def websocket_compression(enabled: bool) -> Iterator[None]:
    """Within this block (and tasks started in it), hypha-rpc connects with/without deflate."""
    if not _install():
        yield
        return
    token = _NO_DEFLATE.set(not enabled)
    try:
        yield
    finally:
        _NO_DEFLATE.reset(token)
