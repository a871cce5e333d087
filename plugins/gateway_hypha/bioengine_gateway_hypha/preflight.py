"""Before serving: does a Hypha server answer at `server_url` (proxy mode), and can the
embedded one bind its port? One line per problem, naming the setting that fixes it."""

from __future__ import annotations

import json
import socket
import ssl
import urllib.error
import urllib.request
from typing import Any

from .settings import HyphaGatewaySettings


def _embedded(settings: HyphaGatewaySettings) -> list[str]:
    if not settings.port:
        return []
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((settings.host.strip("[]"), settings.port))
        except OSError as exc:
            return [
                f"the embedded Hypha server cannot listen on {settings.host}:{settings.port} "
                f"({exc.strerror or exc}): choose a free [gateways] port (0 picks one) or host"
            ]
    return []


def check_server(url: str, *, timeout: float = 5.0) -> str | None:
    """None when a Hypha server answers at `url`, else what is wrong (one line)."""
    probe = url.rstrip("/") + "/assets/config.json"
    try:
        with urllib.request.urlopen(probe, timeout=timeout) as resp:  # noqa: S310 - http(s) only
            data: Any = json.loads(resp.read(65536) or b"null")
    except urllib.error.HTTPError as exc:
        return f"{url} answers HTTP {exc.code} at /assets/config.json: it does not look like a Hypha server"
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, ssl.SSLError | ssl.CertificateError):
            return f"TLS to {url} failed ({reason}): check server_url and the certificates this host trusts"
        return f"no Hypha server answers at {url} ({reason})"
    except (TimeoutError, OSError) as exc:
        return f"no Hypha server answers at {url} ({exc or type(exc).__name__})"
    except ValueError:
        return f"{url} does not answer /assets/config.json with JSON: it does not look like a Hypha server"
    if not isinstance(data, dict) or "hypha_version" not in data:
        return f"{url} answers, but not as a Hypha server (no hypha_version in /assets/config.json)"
    return None


def preflight(*, settings: HyphaGatewaySettings, context: Any, offline: bool) -> list[str]:
    """Embedded: the port is free (no network needed). Proxy: the server answers (online)."""
    if settings.embedded:
        return _embedded(settings)
    if offline or not settings.server_url:
        return []
    problem = check_server(settings.server_url)
    return [f"{problem}: check server_url = {settings.server_url!r}"] if problem else []


__all__ = ["check_server", "preflight"]
