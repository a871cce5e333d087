"""Before serving: does a Hypha server answer at `server_url` and accept the token (proxy mode),
and is the embedded one installed and free to bind its port? One line per problem, naming the
setting that fixes it.

The token matters early because the gateway connects only after the first replica is ready:
without this check a refused token stops `serve` after Triton has been started for nothing."""

from __future__ import annotations

import json
import socket
import ssl
import urllib.error
import urllib.request
from typing import Any

from .settings import HyphaGatewaySettings


def _embedded(settings: HyphaGatewaySettings) -> list[str]:
    from .server import hypha_installed

    if not hypha_installed():
        return [
            "embedded = true needs the Hypha server, which is not installed: "
            "pip install 'bioengine-gateway-hypha[server]' (or set server_url for proxy mode)"
        ]
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


def check_token(url: str, token: str, *, timeout: float = 5.0) -> str | None:
    """None unless the Hypha server at `url` rejects `token` (HTTP 401 to an authenticated GET
    of /public/info); what it said otherwise. Other answers are left to the connection."""
    request = urllib.request.Request(  # noqa: S310 - http(s) only
        url.rstrip("/") + "/public/info", headers={"Authorization": f"Bearer {token}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout):  # noqa: S310
            return None
    except urllib.error.HTTPError as exc:
        if exc.code != 401:
            return None  # e.g. 403: the token is valid but may not read `public`
        try:
            detail = json.loads(exc.read(4096) or b"{}").get("detail") or ""
        except (ValueError, AttributeError):
            detail = ""
        detail = " ".join(str(detail).replace(token, "**********").split())[:200]
        return f"the Hypha server at {url} refused the token ({detail or 'HTTP 401'})"
    except (urllib.error.URLError, OSError):
        return None  # check_server already said the server does not answer


def _token_problem(settings: HyphaGatewaySettings, context: Any) -> str | None:
    from bioengine_core.errors import ConfigError

    from .settings import read_secret

    if not (settings.token_env or settings.token_file) or not settings.server_url:
        return None
    try:
        token = read_secret(settings.token_env, settings.token_file, "token", context)
    except ConfigError:
        return None  # an unset variable / unreadable file is reported by the core's own check
    if token is None:
        return None
    refused = check_token(settings.server_url, token.get_secret_value())
    if refused is None:
        return None
    where = (
        f"environment variable {settings.token_env} (token_env)"
        if settings.token_env
        else f"file {settings.token_file} (token_file)"
    )
    return f"{refused}: put a valid token in {where}; a Hypha token expires, get a new one"


def preflight(*, settings: HyphaGatewaySettings, context: Any, offline: bool) -> list[str]:
    """Embedded: installed and the port is free (no network needed). Proxy: the server answers
    and accepts the token (online)."""
    if settings.embedded:
        return _embedded(settings)
    if offline or not settings.server_url:
        return []
    problem = check_server(settings.server_url)
    if problem:
        return [f"{problem}: check server_url = {settings.server_url!r}"]
    token = _token_problem(settings, context)
    return [token] if token else []


__all__ = ["check_server", "check_token", "preflight"]
