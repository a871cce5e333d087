"""A BioImage Model Zoo emulator: a real HTTP server, in a thread, that serves packages in the
URL layouts the public zoo uses today, with fault injection for tests.

Layouts served (all on one host, `http://127.0.0.1:PORT`):

- Hypha artifact manager (bioimage.io's backend, bioimageio.spec's default
  `collection_http_pattern`): `/bioimage-io/artifacts/{id}/files/{path}?version=V`,
  `/bioimage-io/artifacts/{id}` (artifact record with its versions),
  `/bioimage-io/artifacts/bioimage.io/children` (the collection listing) and
  `/bioimage-io/artifacts/{id}/create-zip-file?version=V` (the package as a zip).
- The S3 collection (bioimageio.spec's `id_map` / `id_map_draft`):
  `/public-datasets/bioimage.io/id_map.json`, `.../id_map_draft.json`, `.../collection.json`
  and `/public-datasets/bioimage.io/{id}/{version}/files/{path}`.
- Zenodo's records API for DOIs `10.5281/zenodo.N`: `/api/records/N` and
  `/api/records/N/files/{name}/content`.

Faults: `tamper` (served bytes differ from the declared sha256), `drop` (the connection closes
mid-body for the next N requests of a file), `slow` (a delay before answering), `publish_raw`
(a malformed description) and any unknown id (404). Every request is logged in `requests`.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import threading
import time
import zipfile
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

import yaml

HYPHA = "/bioimage-io/artifacts"
S3 = "/public-datasets/bioimage.io"
ZENODO = "/api/records"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _add_hashes(node: Any, files: dict[str, bytes]) -> None:
    """Fill in `sha256` next to every `source` naming a packaged file (as the zoo's upload does)."""
    if isinstance(node, dict):
        src = node.get("source")
        if isinstance(src, str) and src in files and "sha256" not in node:
            node["sha256"] = _sha(files[src])
        for value in node.values():
            _add_hashes(value, files)
    elif isinstance(node, list):
        for value in node:
            _add_hashes(value, files)


@dataclass
class Published:
    """One version of a package as the emulator serves it."""

    id: str
    version: str
    files: dict[str, bytes]
    rdf_name: str = "rdf.yaml"
    doi: str | None = None

    @property
    def rdf(self) -> bytes:
        return self.files[self.rdf_name]

    def zip_bytes(self) -> bytes:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            for name, data in self.files.items():
                zf.writestr(name, data)
        return buf.getvalue()


@dataclass
class Faults:
    """Injected faults, keyed by (id, file name)."""

    tampered: set[tuple[str, str]] = field(default_factory=set)
    drops: dict[tuple[str, str], int] = field(default_factory=dict)
    delays: dict[tuple[str, str], float] = field(default_factory=dict)


class ZooEmulator:
    """The emulator: `publish` packages, `start()`, point the zoo settings at `url`."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self.host = host
        self.port = port
        self.versions: dict[str, list[Published]] = {}
        self.faults = Faults()
        self.requests: list[str] = []
        self._records: dict[str, Published] = {}
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ settings
    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def settings(self) -> dict[str, Any]:
        """`[sources.bioimageio]` settings that point BioEngine at this emulator."""
        return {
            "collection_http_pattern": f"{self.url}{HYPHA}/{{bioimageio_id}}/files/rdf.yaml",
            "id_map": f"{self.url}{S3}/id_map.json",
            "id_map_draft": f"{self.url}{S3}/id_map_draft.json",
            "collection_url": f"{self.url}{S3}/collection.json",
            "zenodo_api": f"{self.url}/api",
        }

    def toml(self, **extra: Any) -> str:
        """The `[sources.bioimageio]` section for a site config."""
        lines = ["[sources.bioimageio]"]
        for key, value in {**self.settings(), **extra}.items():
            lines.append(f"{key} = {json.dumps(value)}")
        return "\n".join(lines) + "\n"

    def file_url(self, model_id: str, name: str, version: str | None = None) -> str:
        """The Hypha URL of one file of a published package."""
        query = f"?version={version}" if version else ""
        return f"{self.url}{HYPHA}/{model_id}/files/{name}{query}"

    def zip_url(self, model_id: str, version: str | None = None) -> str:
        query = f"?version={version}" if version else ""
        return f"{self.url}{HYPHA}/{model_id}/create-zip-file{query}"

    # ------------------------------------------------------------------ publishing
    def publish(
        self,
        folder: Path,
        model_id: str,
        *,
        version: str = "1",
        doi: str | None = None,
        edit: Any = None,
    ) -> Published:
        """Publish a package folder as `model_id` version `version` (rdf.yaml with `id`,
        `version` and the sha256 of every packaged file filled in, as the zoo's upload does).
        `edit(data)` may change the description first; `doi` `10.5281/zenodo.N` makes it
        reachable through the Zenodo API."""
        files = {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file()}
        rdf_name = "bioimageio.yaml" if "bioimageio.yaml" in files else "rdf.yaml"
        data = yaml.safe_load(files.pop(rdf_name))
        data["id"] = model_id
        data["version"] = version
        _add_hashes(data, files)
        if edit is not None:
            edit(data)
        files["rdf.yaml"] = yaml.safe_dump(data, sort_keys=False).encode()
        return self._add(Published(model_id, version, files, "rdf.yaml", doi))

    def publish_raw(
        self, model_id: str, files: dict[str, bytes], *, version: str = "1", doi: str | None = None
    ) -> Published:
        """Publish files as they are (e.g. a malformed `rdf.yaml`)."""
        return self._add(Published(model_id, version, dict(files), "rdf.yaml", doi))

    def _add(self, pub: Published) -> Published:
        with self._lock:
            self.versions.setdefault(pub.id, []).append(pub)
            if pub.doi:
                self._records[pub.doi.rsplit(".", 1)[-1]] = pub
        return pub

    # ------------------------------------------------------------------ faults
    def tamper(self, model_id: str, name: str) -> None:
        """Serve `name` of `model_id` with one byte changed (its sha256 no longer matches)."""
        self.faults.tampered.add((model_id, name))

    def drop(self, model_id: str, name: str, times: int = 1) -> None:
        """Close the connection halfway through the body of the next `times` requests."""
        self.faults.drops[(model_id, name)] = times

    def slow(self, model_id: str, name: str, delay: float) -> None:
        """Wait `delay` seconds before answering requests for `name` of `model_id`."""
        self.faults.delays[(model_id, name)] = delay

    def clear_faults(self) -> None:
        self.faults = Faults()

    # ------------------------------------------------------------------ server
    def start(self) -> ZooEmulator:
        emulator = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802
                emulator._handle(self)

            def do_HEAD(self) -> None:  # noqa: N802
                emulator._handle(self, head=True)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer((self.host, self.port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> ZooEmulator:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ------------------------------------------------------------------ routing
    def _latest(self, model_id: str, version: str | None) -> Published | None:
        found = self.versions.get(model_id) or []
        if version:
            version = version.removeprefix("v")
            found = [p for p in found if p.version == version]
        return found[-1] if found else None

    def _listing(self) -> list[dict[str, Any]]:
        out = []
        for model_id, pubs in sorted(self.versions.items()):
            latest = pubs[-1]
            try:
                manifest = yaml.safe_load(latest.rdf) or {}
            except yaml.YAMLError:
                manifest = {}
            manifest = manifest if isinstance(manifest, dict) else {}
            out.append(
                {
                    "id": model_id,
                    "alias": model_id,
                    "name": manifest.get("name", model_id),
                    "type": manifest.get("type", "model"),
                    "tags": manifest.get("tags", []),
                    "rdf_source": f"{self.url}{S3}/{model_id}/{latest.version}/files/rdf.yaml",
                    "doi": latest.doi,
                    "concept_doi": None,
                    "versions": [p.version for p in pubs],
                }
            )
        return out

    def _id_map(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for model_id, pubs in sorted(self.versions.items()):
            for pub in pubs:
                entry = {
                    "source": f"{self.url}{S3}/{model_id}/{pub.version}/files/rdf.yaml",
                    "sha256": _sha(pub.rdf),
                }
                out[f"{model_id}/{pub.version}"] = entry
                out[model_id] = entry
        return out

    def _handle(self, req: BaseHTTPRequestHandler, head: bool = False) -> None:
        parsed = urlparse(req.path)
        path = unquote(parsed.path)
        query = {k: v[-1] for k, v in parse_qs(parsed.query).items()}
        req.head_only = head  # type: ignore[attr-defined]
        with self._lock:
            if not head:
                self.requests.append(req.path)
        parts = [p for p in path.split("/") if p]
        try:
            if path == f"{S3}/id_map.json":
                return self._json(req, self._id_map())
            if path == f"{S3}/id_map_draft.json":
                return self._json(req, {})
            if path == f"{S3}/collection.json":
                return self._json(req, {"collection": self._listing()})
            if path.startswith(S3 + "/") and len(parts) >= 6 and parts[4] == "files":
                pub = self._latest(parts[2], parts[3])
                return self._file(req, pub, "/".join(parts[5:]))
            if path == f"{HYPHA}/bioimage.io/children":
                return self._json(req, self._listing())
            if path.startswith(HYPHA + "/") and len(parts) >= 3:
                pub = self._latest(parts[2], query.get("version"))
                if len(parts) == 3 and pub is not None:
                    versions = [{"version": f"v{p.version}"} for p in self.versions[parts[2]]]
                    manifest = yaml.safe_load(pub.rdf) if parts[2] else {}
                    return self._json(
                        req, {"alias": parts[2], "manifest": manifest, "versions": versions}
                    )
                if len(parts) == 4 and parts[3] == "create-zip-file" and pub is not None:
                    return self._send(req, 200, pub.zip_bytes(), "application/zip", pub, "zip")
                if len(parts) >= 5 and parts[3] == "files":
                    return self._file(req, pub, "/".join(parts[4:]))
            if path.startswith(ZENODO + "/") and len(parts) >= 3:
                pub = self._records.get(parts[2])
                if pub is not None and len(parts) == 3:
                    base = f"{self.url}{ZENODO}/{parts[2]}/files"
                    files = [
                        {"key": n, "size": len(d), "links": {"self": f"{base}/{n}/content"}}
                        for n, d in pub.files.items()
                    ]
                    return self._json(req, {"id": int(parts[2]), "files": files})
                if pub is not None and len(parts) == 6 and parts[5] == "content":
                    return self._file(req, pub, parts[4])
            self._send(req, 404, b'{"detail": "not found"}', "application/json")
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _json(self, req: BaseHTTPRequestHandler, data: Any) -> None:
        self._send(req, 200, json.dumps(data).encode(), "application/json")

    def _file(self, req: BaseHTTPRequestHandler, pub: Published | None, name: str) -> None:
        if pub is None or name not in pub.files:
            return self._send(req, 404, b'{"detail": "not found"}', "application/json")
        data = pub.files[name]
        if (pub.id, name) in self.faults.tampered:
            data = bytes([data[0] ^ 0xFF]) + data[1:] if data else b"x"
        self._send(req, 200, data, "application/octet-stream", pub, name)

    def _send(
        self,
        req: BaseHTTPRequestHandler,
        status: int,
        body: bytes,
        ctype: str,
        pub: Published | None = None,
        name: str = "",
    ) -> None:
        if getattr(req, "head_only", False):
            req.send_response(status)
            req.send_header("Content-Type", ctype)
            req.send_header("Content-Length", str(len(body)))
            req.end_headers()
            return
        key = (pub.id, name) if pub else ("", "")
        delay = self.faults.delays.get(key, 0.0)
        if delay:
            time.sleep(delay)
        drop = False
        with self._lock:
            if self.faults.drops.get(key, 0) > 0:
                self.faults.drops[key] -= 1
                drop = True
        req.send_response(status)
        req.send_header("Content-Type", ctype)
        req.send_header("Content-Length", str(len(body)))
        if drop:
            req.send_header("Connection", "close")
        req.end_headers()
        if drop:
            req.wfile.write(body[: len(body) // 2])
            req.wfile.flush()
            req.close_connection = True
            req.connection.shutdown(2)
            return
        req.wfile.write(body)


def bundled_zoo(emulator: ZooEmulator | None = None) -> ZooEmulator:
    """An emulator (not started) publishing the bundled packages under zoo-style ids:
    `affable-shark` (unet2d_nuclei_broad, versions 1 and 2, DOI 10.5281/zenodo.5764892) and
    `tiny-affine` (DOI 10.5281/zenodo.1000001)."""
    from ..bundled import bundled_path

    zoo = emulator or ZooEmulator()
    unet = bundled_path("unet2d_nuclei_broad")
    zoo.publish(unet, "affable-shark", version="1")
    zoo.publish(unet, "affable-shark", version="2", doi="10.5281/zenodo.5764892")
    zoo.publish(bundled_path("tiny_affine"), "tiny-affine", doi="10.5281/zenodo.1000001")
    return zoo


def copy_package(src: Path, dst: Path) -> Path:
    """A writable copy of a package folder (for tests that change one)."""
    shutil.copytree(src, dst)
    return dst


__all__ = ["Published", "ZooEmulator", "bundled_zoo", "copy_package"]
