"""The zoo's collection listing (`[sources.bioimageio] collection_url`): which models exist, for
catalog search. The last good copy is kept on disk, so offline sites and outages still list."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import ModelError
from .util import write_json

MAX_LISTING_BYTES = 64 << 20
"""A collection larger than this is refused (the public zoo's is a few MB)."""


def normalise(raw: Any) -> list[dict[str, Any]]:
    """The model entries of a collection document (`{"collection": [...]}` or a list), each
    reduced to plain strings: id, name, description, tags, versions."""
    items = raw.get("collection", []) if isinstance(raw, dict) else raw
    out = []
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, dict) or item.get("type", "model") != "model":
            continue
        mid = item.get("id") or item.get("alias")
        if not isinstance(mid, str) or not mid:
            continue
        tags = item.get("tags") if isinstance(item.get("tags"), list) else []
        versions = item.get("versions") if isinstance(item.get("versions"), list) else []
        out.append(
            {
                "id": mid[:100],
                "name": str(item.get("name") or mid)[:200],
                "description": str(item.get("description") or "")[:2000],
                "tags": [str(t)[:100] for t in tags[:100]],
                "versions": [str(v)[:40] for v in versions[:100]],
            }
        )
    return out


def fetch_listing(url: str, copy: Path, *, timeout: float, offline: bool) -> list[dict[str, Any]]:
    """The collection at `url` (saved to `copy`); the saved copy when offline or unreachable;
    ModelError when there is neither."""
    import httpx

    problem = "offline = true"
    if not offline and url:
        try:
            with httpx.stream("GET", url, timeout=timeout, follow_redirects=True) as resp:
                if resp.status_code != 200:
                    raise httpx.HTTPError(f"HTTP {resp.status_code}")
                body = bytearray()
                for chunk in resp.iter_bytes():
                    body += chunk
                    if len(body) > MAX_LISTING_BYTES:
                        raise httpx.HTTPError(f"larger than {MAX_LISTING_BYTES >> 20} MB")
            entries = normalise(json.loads(bytes(body)))
            write_json(copy, {"url": url, "collection": entries})
            return entries
        except (httpx.HTTPError, ValueError, RecursionError) as exc:
            problem = f"{url}: {exc}"
    try:
        return normalise(json.loads(copy.read_text()))
    except (OSError, ValueError):
        raise ModelError(
            f"cannot list the collection ({problem}) and no earlier copy is saved at {copy}"
        ) from None


__all__ = ["fetch_listing", "normalise"]
