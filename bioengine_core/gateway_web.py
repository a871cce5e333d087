"""The HTTP gateway's browser side: CORS for pages on allowed origins, the web page at `/`
(static files from `bioengine_core/web/`), and the routes the page needs beyond the public API:
a model's sample input as `.npy`, "try it" on an uploaded image file, and the model's own test.

The page uses the same API as any client; these routes go through the gateway's guard (tokens,
roles) and its body limits like every other. Uploaded files are decoded here (`.npy` without
pickles, PNG with Pillow, TIFF with tifffile), mapped onto the model's input axes, and refused
with a 4xx naming the model, input and axis when they do not fit.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

import numpy as np
from aiohttp import web

from .errors import InferenceError, ModelNotFoundError
from .http_guard import error, read_body

ALLOWED_METHODS = ("GET", "POST")
ALLOWED_HEADERS = ("authorization", "content-type", "inference-header-content-length")
EXPOSED_HEADERS = "Inference-Header-Content-Length, Retry-After, X-Output-Id"
_TYPES = {
    ".html": "text/html",
    ".css": "text/css",
    ".js": "text/javascript",
    ".svg": "image/svg+xml",
}
_FILE_RE = re.compile(r"^[a-z0-9_-]{1,40}\.(html|css|js|svg)$")
MAX_PIXELS = 64 << 20
"""Most elements a decoded upload may have (a bound on decompression bombs)."""


def cors_middleware(origins: list[str]):
    """Answer preflights from `origins` and mark answers to them readable; others get no CORS
    header at all (never `*`, never credentials)."""
    allowed = frozenset(origins)

    @web.middleware
    async def cors(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        ok = origin is not None and origin in allowed
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            method = request.headers["Access-Control-Request-Method"].strip()
            asked = request.headers.get("Access-Control-Request-Headers", "")
            wanted = {h.strip().lower() for h in asked.split(",") if h.strip()}
            if not ok or method not in ALLOWED_METHODS or not wanted <= set(ALLOWED_HEADERS):
                resp = error(
                    403, "cross-origin request not allowed from this origin, method or headers"
                )
                if allowed:
                    resp.headers["Vary"] = "Origin"
                return resp
            return web.Response(
                status=204,
                headers={
                    "Access-Control-Allow-Origin": origin or "",
                    "Access-Control-Allow-Methods": ", ".join(ALLOWED_METHODS),
                    "Access-Control-Allow-Headers": "Authorization, Content-Type, "
                    "Inference-Header-Content-Length",
                    "Access-Control-Max-Age": "600",
                    "Vary": "Origin",
                },
            )
        try:
            resp = await handler(request)
        except web.HTTPException as exc:
            _mark(exc.headers, origin if ok else None, bool(allowed))
            raise
        if not resp.prepared:
            _mark(resp.headers, origin if ok else None, bool(allowed))
        return resp

    return cors


def _mark(headers: Any, origin: str | None, enabled: bool) -> None:
    if enabled:
        headers["Vary"] = "Origin"
    if origin:
        headers["Access-Control-Allow-Origin"] = origin
        headers["Access-Control-Expose-Headers"] = EXPOSED_HEADERS


class WebRoutes:
    """Handlers of the page and its helper routes, for an `HttpGateway`."""

    def __init__(self, gateway: Any) -> None:
        self.gateway = gateway
        folder = resources.files("bioengine_core") / "web"
        self.files = {p.name: p for p in folder.iterdir() if _FILE_RE.fullmatch(p.name)}

    def add_to(self, router: web.UrlDispatcher) -> None:
        """Register the page and its routes."""
        router.add_get("/", self.index)
        router.add_get("/web/{name}", self.static)
        router.add_get("/bioengine/models/{model}/sample", self.sample)
        router.add_post("/bioengine/models/{model}/try", self.try_it)
        router.add_post("/bioengine/models/{model}/test", self.test)

    @property
    def service(self) -> Any:
        return self.gateway.service

    async def index(self, request: web.Request) -> web.Response:
        return self._file("index.html")

    async def static(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in self.files:
            return error(404, "no such file")
        return self._file(name)

    def _file(self, name: str) -> web.Response:
        body = self.files[name].read_bytes()
        resp = web.Response(body=body, content_type=_TYPES["." + name.rsplit(".", 1)[1]])
        resp.headers["Cache-Control"] = "no-cache"
        resp.headers["X-Content-Type-Options"] = "nosniff"
        if name.endswith(".html"):
            resp.headers["Content-Security-Policy"] = (
                "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; "
                "script-src 'self'; connect-src 'self'; frame-ancestors 'none'"
            )
        return resp

    async def _info(self, request: web.Request) -> Any:
        model = await self.gateway._known(request)
        info = next((m for m in self.service.list_models() if m.id == model), None)
        if info is None:
            raise ModelNotFoundError(model, self.service.model_ids())
        return info

    async def sample(self, request: web.Request) -> web.Response:
        """The model's first test input as `.npy`."""
        info = await self._info(request)
        samples = await self.service.sample_inputs(info.id)
        if not samples:
            return error(404, f"model '{info.id}' has no test input")
        tid, array = next(iter(samples.items()))
        return _npy(array, {"X-Input-Id": tid})

    async def test(self, request: web.Request) -> web.Response:
        """The model's own test: `{"passed", "outputs": {id: error figures}, ...}`."""
        info = await self._info(request)
        report = await self.service.test_model(info.id)
        return web.json_response(report, dumps=lambda d: json.dumps(d, default=str))

    async def try_it(self, request: web.Request) -> web.StreamResponse:
        """Run the model on an uploaded `.npy`, PNG or TIFF file; the first output as `.npy`."""
        info = await self._info(request)
        if len(info.inputs) != 1:
            return error(
                400, f"model '{info.id}' takes {len(info.inputs)} inputs; the page runs one"
            )
        spec = info.inputs[0]
        gw = self.gateway
        read = await read_body(request, gw.settings, gw.budget)
        if isinstance(read, web.StreamResponse):
            return read
        body, reserved = read
        try:
            image, kind = decode(bytes(body))
        finally:
            del body
            gw.budget.release(reserved)
        array = fit(image, kind, info.id, spec)
        outputs = await self.service.infer(info.id, {spec["id"]: array})
        oid = info.outputs[0]["id"] if info.outputs else next(iter(outputs))
        return _npy(np.asarray(outputs[oid]), {"X-Output-Id": oid})


def _npy(array: np.ndarray, headers: dict[str, str]) -> web.Response:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    resp = web.Response(body=buf.getvalue(), content_type="application/octet-stream")
    resp.headers.update(headers)
    return resp


def decode(data: bytes) -> tuple[np.ndarray, str]:
    """(array, kind) of an uploaded file: kind is "npy", "png" or "tiff"."""

    def bad(message: str) -> InferenceError:
        return InferenceError(message, status=400)

    if data.startswith(b"\x93NUMPY"):
        try:
            array = np.load(io.BytesIO(data), allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise bad(f"the .npy file cannot be read: {str(exc)[:200]}") from None
        if not isinstance(array, np.ndarray) or array.dtype.kind not in "biuf":
            raise bad("the .npy file must hold one array of numbers")
        return array, "npy"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        try:
            from PIL import Image  # Pillow and tifffile come with bioimageio.spec
        except ImportError:
            raise bad("PNG files need Pillow on the server; send .npy") from None

        try:
            with Image.open(io.BytesIO(data)) as img:
                if img.width * img.height > MAX_PIXELS:
                    raise bad(f"the PNG has {img.width}x{img.height} pixels; too many")
                if img.mode == "P":
                    img = img.convert("RGBA" if "transparency" in img.info else "RGB")
                return np.asarray(img), "png"
        except InferenceError:
            raise
        except Exception as exc:  # Pillow raises many kinds on broken files
            raise bad(f"the PNG file cannot be read: {str(exc)[:200]}") from None
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        try:
            import tifffile
        except ImportError:
            raise bad("TIFF files need tifffile on the server; send .npy or PNG") from None
        try:
            with tifffile.TiffFile(io.BytesIO(data)) as tif:
                series = tif.series[0]
                if int(np.prod(series.shape)) > MAX_PIXELS:
                    raise bad(f"the TIFF has shape {tuple(series.shape)}; too many elements")
                return np.asarray(series.asarray()), "tiff"
        except InferenceError:
            raise
        except Exception as exc:
            raise bad(f"the TIFF file cannot be read: {str(exc)[:200]}") from None
    raise bad("send a .npy, PNG or TIFF file")


def fit(image: np.ndarray, kind: str, model_id: str, spec: dict[str, Any]) -> np.ndarray:
    """`image` arranged as the model input `spec` wants (axes, dtype), or a 400 naming the
    model, input and axis that do not fit."""
    axes: list[str] = list(spec["axes"])
    shape: list[int] = list(spec["shape"])
    name = f"model '{model_id}' input '{spec['id']}'"
    where = {a: i for i, a in enumerate(axes)}
    channels = shape[where["channel"]] if "channel" in where else 1
    if image.ndim == len(axes) and kind != "png":
        arranged = image
    elif image.ndim == len(axes) - 1 and "batch" in where and kind != "png":
        arranged = np.expand_dims(image, where["batch"])
    else:
        # an image without batch/channel axes: name its axes, then move them into place
        space = [a for a in axes if a not in ("batch", "channel")]
        if kind == "png" and image.ndim == 3:
            have = ["y", "x", "channel"]
        elif image.ndim == len(space):
            have = list(space)
        elif image.ndim == len(space) + 1 and "channel" in where:
            have = ["channel", *space]
        else:
            raise InferenceError(
                f"{name} has axes {','.join(axes)}; the image has {image.ndim} axes "
                f"(shape {list(image.shape)}) that cannot be matched to them",
                status=400,
            )
        if "channel" in have and "channel" in where:
            got = image.shape[have.index("channel")]
            if channels > 0 and got != channels:
                kind_text = {3: " (RGB)", 4: " (RGBA)"}.get(got, "") if kind == "png" else ""
                raise InferenceError(
                    f"{name} wants {channels} channel(s) on axis 'channel'; the image has "
                    f"{got}{kind_text}",
                    status=400,
                )
        elif "channel" in have:
            raise InferenceError(
                f"{name} has no axis 'channel'; the image has {image.shape[have.index('channel')]}"
                " channels",
                status=400,
            )
        missing = [a for a in axes if a not in have]
        if any(a not in ("batch", "channel") for a in missing) or any(a not in where for a in have):
            raise InferenceError(
                f"{name} has axes {','.join(axes)}; the image's axes {','.join(have)} do not fit",
                status=400,
            )
        if "channel" in missing and channels not in (1, -1):
            raise InferenceError(
                f"{name} wants {channels} channels on axis 'channel'; the image has 1",
                status=400,
            )
        arranged = image
        for a in missing:
            arranged = arranged[..., None]
            have.append(a)
        arranged = np.transpose(arranged, [have.index(a) for a in axes])
    for i, (size, want) in enumerate(zip(arranged.shape, shape, strict=True)):
        # spatial sizes are the service's to judge: it tiles images of any size
        if want > 0 and size != want and axes[i] in ("batch", "channel"):
            raise InferenceError(
                f"{name} wants size {want} on axis '{axes[i]}'; the image has {size}",
                status=400,
            )
    return np.ascontiguousarray(arranged.astype(spec.get("dtype") or "float32", copy=False))


__all__ = ["WebRoutes", "cors_middleware", "decode", "fit"]
