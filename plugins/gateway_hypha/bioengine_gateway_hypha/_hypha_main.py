"""Run `hypha.server` as `python -m hypha.server` would, with WebSocket compression off.

Hypha's main calls `uvicorn.run` without `ws_per_message_deflate`, so uvicorn compresses every
WebSocket message with zlib. Image tensors do not compress, and deflating them made a 1 MB
round trip ~10x slower (bench/RESULTS.md). This launcher sets the option and hands over
to Hypha's own main unchanged. Usage: python -m bioengine_gateway_hypha._hypha_main ARGS...
"""

from __future__ import annotations

import os
import runpy
import sys

import uvicorn


def main() -> None:
    """Patch uvicorn.run's default, then run hypha.server as __main__."""
    deflate = os.environ.get("BIOENGINE_HYPHA_WS_DEFLATE", "false").lower() in ("1", "true")
    original = uvicorn.run

    def run(app, **kwargs):  # type: ignore[no-untyped-def]
        kwargs.setdefault("ws_per_message_deflate", deflate)
        return original(app, **kwargs)

    uvicorn.run = run  # type: ignore[assignment]
    sys.argv = ["hypha.server", *sys.argv[1:]]
    runpy.run_module("hypha.server", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
