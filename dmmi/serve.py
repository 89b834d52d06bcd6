"""``dmmi serve``: segment your own images from a web page (Gradio), or through a small JSON API.

    dmmi serve --model runs/demo/model          # then open http://127.0.0.1:7860

One FastAPI application served by uvicorn: the Gradio page (:mod:`dmmi.serve_ui`) is mounted
at ``/`` and the JSON routes below sit beside it. The model is loaded once; every model run,
from the page or the API, holds one lock for its whole heavy part (decoding the image, the
model, encoding the PNGs), so requests are answered one at a time and concurrent uploads
cannot multiply decoded images. At most ``max_pending`` API requests are admitted at once
(their bodies, at most ``--max-mb`` each, are the only memory that waits for the lock); more
get ``503`` with ``Retry-After``. Gradio and FastAPI are imported only when a server is built,
so the rest of the ``dmmi`` command stays quick to start.

Routes
------
``GET /``                 the Gradio page (no request leaves the server: system fonts, analytics off)
``GET /api/info``         ``{"model": {"preset", "image_size", "device"}, "examples": [...],
                          "domain_note": str | null, "limits": {...}}``
``POST /api/predict``     multipart/form-data: one ``image`` file and one or more ``text``
                          fields (a field may hold several expressions, one per line) ->
                          ``{"results": [{"text", "no_target", "foreground", "score",
                          "overlay_png_base64", "mask_png_base64"}], "image": {"width",
                          "height"}, "model": {"preset"}}``; results follow the expressions'
                          order; ``score`` is the model's confidence (the largest foreground
                          probability); masks are 8-bit grey PNGs (255 = referred) at the image's
                          size; overlays are downscaled to at most ``overlay_max_side`` px (an
                          optional field, a whole number 0-65535, default 1280; 0 = the image's
                          size). Any other field name is refused. Bodies above ``--max-mb`` are
                          refused from their Content-Length (413), images above ``--max-pixels``
                          (default 40 million) from their header, before decoding (413).
Bad input gets a 4xx status and ``{"error": "one line"}``.
"""

from __future__ import annotations

import base64
import gc
import io
import math
import os
import signal
import socket
import sys
import threading
import traceback
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Callable, Optional

import numpy as np

from dmmi.data.images import DEFAULT_MAX_PIXELS, ImageTooLarge, check_max_pixels, load_image
from dmmi.errors import DmmiError

MAX_REQUEST_MB = 20.0  # whole multipart body (--max-mb); also the largest upload on the page
MAX_PIXELS = DEFAULT_MAX_PIXELS  # decoded image: width * height (--max-pixels)
MAX_EXPRESSIONS = 16
MAX_EXPRESSION_CHARS = 300
MAX_PARTS = 64  # form files and fields per request: a few images / texts too many still get a precise error
MAX_FIELD_BYTES = 64 * 1024  # one plain (non-file) form field: MAX_EXPRESSIONS lines of MAX_EXPRESSION_CHARS fit
OVERLAY_MAX_SIDE = 1280  # overlays are for looking at: larger images are shown downscaled
OVERLAY_SIDE_LIMIT = 65535  # the largest overlay_max_side accepted
MAX_PENDING = 32  # predict requests admitted at once (reading, waiting for the model, running)
LISTEN_BACKLOG = 128  # connections the kernel holds before accept
FIELDS = ("image", "text", "overlay_max_side")  # the form fields of /api/predict

# example expressions; the synthetic set's vocabulary when the model was trained on it
SYNTHETIC_EXAMPLES = ("the red circle", "all the blue shapes", "both squares", "the leftmost shape",
                      "the small green triangle and the big star", "the purple dog")
GENERIC_EXAMPLES = ("the man on the left", "all the people", "the two dogs", "the cup on the table",
                    "everything that is red", "the giraffe")


class RequestError(Exception):
    """Bad input: answered with ``status`` and ``{"error": message}`` (one line)."""

    def __init__(self, message: str, status: int = HTTPStatus.BAD_REQUEST, headers: Optional[dict] = None):
        super().__init__(" ".join(str(message).split()))
        self.status = int(status)
        self.headers = headers or {}


# ---------------------------------------------------------------------------- input


def read_expressions(fields: list[str]) -> list[str]:
    """Every ``text`` field, split into lines; blank lines are dropped, a blank field is an error."""
    if not fields:
        raise RequestError("no expression: add a 'text' field, e.g. \"the dog on the left\"")
    texts: list[str] = []
    for value in fields:
        lines = [" ".join(line.split()) for line in value.splitlines()]
        lines = [line for line in lines if line]
        if not lines:
            raise RequestError("empty expression: type some words, e.g. \"the dog on the left\"")
        texts += lines
    if len(texts) > MAX_EXPRESSIONS:
        raise RequestError(f"too many expressions: {len(texts)} (at most {MAX_EXPRESSIONS} per request)")
    for t in texts:
        if len(t) > MAX_EXPRESSION_CHARS:
            raise RequestError(f"expression too long: {len(t)} characters (at most {MAX_EXPRESSION_CHARS})")
    return texts


def decode_image(data: bytes, filename: Optional[str] = None, max_pixels: Optional[int] = MAX_PIXELS):
    """Uploaded bytes -> RGB PIL image (:func:`dmmi.data.images.load_image`: upright by its EXIF
    orientation, any mode to 8-bit RGB, more than ``max_pixels`` refused before decoding: 413)."""
    what = f"'{filename}'" if filename else "the upload"
    if not data:
        raise RequestError(f"{what} is empty: choose an image file (PNG, JPEG, WebP, ...)")
    try:
        return load_image(data, max_pixels=max_pixels, where=what)
    except ImageTooLarge as e:
        raise RequestError(str(e), HTTPStatus.REQUEST_ENTITY_TOO_LARGE) from None
    except DmmiError as e:
        raise RequestError(f"{e}; choose a PNG, JPEG or WebP file") from None


@dataclass
class Part:
    """One form part of a multipart body: its field name, its bytes as sent and, for a file, its name."""

    name: str
    data: bytes
    filename: Optional[str] = None
    content_type: Optional[str] = None


async def drain(request, budget: int) -> None:
    """Read and drop what is left of a request's body (at most ``budget`` bytes)."""
    from starlette.requests import ClientDisconnect

    try:
        while budget > 0:
            message = await request.receive()
            if message["type"] != "http.request":
                return
            budget -= len(message.get("body", b""))
            if not message.get("more_body", False):
                return
    except ClientDisconnect:
        pass


async def read_form(request, limit: int, allowed: tuple[str, ...] = FIELDS, max_parts: int = MAX_PARTS) -> list[Part]:
    """A multipart/form-data request -> its parts in order (Starlette's form parser on
    python-multipart), or a one-line RequestError: not multipart (415), a body over ``limit`` bytes
    whatever its Content-Length says (413, counted as it arrives), more than ``max_parts`` parts, a
    malformed or cut-off body, a field name outside ``allowed``."""
    from python_multipart.multipart import parse_options_header
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException
    from starlette.formparsers import MultiPartException
    from starlette.requests import Request

    kind, params = parse_options_header(request.headers.get("content-type", ""))
    if kind.lower() != b"multipart/form-data":
        raise RequestError("send the form as multipart/form-data (an 'image' file and 'text' fields)",
                           HTTPStatus.UNSUPPORTED_MEDIA_TYPE)
    boundary = params.get(b"boundary")
    if not boundary or len(boundary) > 200:
        raise RequestError("multipart body without a boundary in its Content-Type")
    closing = b"--" + boundary + b"--"
    seen, tail, done = 0, b"", False

    async def counted_receive():
        nonlocal seen, tail, done
        message = await request.receive()
        if message["type"] == "http.request":
            chunk = message.get("body", b"")
            seen, done = seen + len(chunk), not message.get("more_body", False)
            if seen > limit:  # no (or a false) Content-Length
                raise RequestError(f"request too large: more than {mb(limit)} MB", HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
            tail = (tail + chunk)[-(len(closing) + 4):]  # where the closing boundary must be
        return message

    try:
        form = await Request(request.scope, counted_receive).form(
            max_files=max_parts, max_fields=max_parts, max_part_size=MAX_FIELD_BYTES)
    except (HTTPException, MultiPartException) as e:  # HTTPException: Starlette's 400 inside an app
        if not done:  # the rest of a bad form, so that the client reads the answer
            await drain(request, limit - seen)
        raise RequestError(f"multipart form refused: {getattr(e, 'detail', None) or e.message}") from None
    try:
        if closing not in tail:  # python-multipart ends quietly where the body stops
            raise RequestError("malformed multipart body: it was cut off (no closing boundary)")
        parts = []
        for name, value in form.multi_items():
            if name not in allowed:
                raise RequestError(f"unknown form field {name[:40]!r}; the fields are {', '.join(allowed)}")
            if isinstance(value, UploadFile):
                parts.append(Part(name, await value.read(), value.filename, value.content_type))
            else:  # a plain field: Starlette has decoded it (UTF-8)
                parts.append(Part(name, value.encode("utf-8")))
        return parts
    finally:
        await form.close()


def _text(part: Part) -> str:
    try:
        return part.data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestError(f"a 'text' field is not UTF-8 text (byte {e.start}); send the expressions as UTF-8")


def _int_field(parts: list[Part], name: str, default: int, limit: int) -> int:
    """The one whole number 0..limit in field ``name`` (ASCII digits), or ``default`` if absent."""
    values = [p.data.decode("utf-8", errors="replace").strip() for p in parts if p.name == name]
    if not values:
        return default
    value = values[0]
    if len(values) > 1 or not (value.isascii() and value.isdigit()) or len(value) > len(str(limit)) \
            or int(value) > limit:
        shown = ", ".join(repr(v[:20] + ("..." if len(v) > 20 else "")) for v in values[:3])
        raise RequestError(f"'{name}' must be one whole number from 0 to {limit} (0: full size), got {shown}")
    return int(value)


def mb(n: int) -> str:
    """Bytes as MB for messages: '20', '1.5', '0.00954' (three significant digits)."""
    return f"{n / 2**20:.3g}"


def _png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def _png_base64(image) -> str:
    return base64.b64encode(_png_bytes(image)).decode("ascii")


# ---------------------------------------------------------------------------- the shared model


@dataclass
class Service:
    """What the page and the API share: the predictor, its lock and the limits."""

    predictor: object
    max_request_bytes: int = int(MAX_REQUEST_MB * 1024 * 1024)
    quiet: bool = False
    max_pixels: Optional[int] = MAX_PIXELS
    max_pending: int = MAX_PENDING
    lock: threading.Lock = field(default_factory=threading.Lock)  # the model and the big buffers
    slots: threading.BoundedSemaphore = field(init=False)  # admitted predict requests

    def __post_init__(self) -> None:
        self.slots = threading.BoundedSemaphore(self.max_pending)

    @property
    def preset(self) -> str:
        return str(getattr(self.predictor.cfg, "preset", "custom"))

    @property
    def synthetic(self) -> bool:
        """Whether the model was trained on dmmi's synthetic shapes."""
        return getattr(getattr(self.predictor.cfg, "data", None), "dataset", None) == "synthetic"

    @property
    def domain_note(self) -> Optional[str]:
        note = getattr(self.predictor, "domain_note", None)  # Predictor's one line, where it has one
        return note if isinstance(note, str) and note else None

    def info(self) -> dict:
        return {
            "model": {"preset": self.preset, "image_size": int(self.predictor.size),
                      "device": str(self.predictor.device)},
            "examples": list(SYNTHETIC_EXAMPLES if self.synthetic else GENERIC_EXAMPLES),
            "domain_note": self.domain_note,
            "limits": {"request_mb": round(self.max_request_bytes / 2**20, 1),
                       "megapixels": None if self.max_pixels is None else round(self.max_pixels / 1e6, 1),
                       "pixels": self.max_pixels, "pending_requests": self.max_pending,
                       "expressions": MAX_EXPRESSIONS, "expression_chars": MAX_EXPRESSION_CHARS,
                       "overlay_max_side": OVERLAY_MAX_SIDE},
        }

    def segment(self, data: bytes, filename: Optional[str], texts: list[str], overlay_side: int,
                emit: Callable) -> tuple[int, int]:
        """Under the lock: decode ``data``, run the model on ``texts`` and call
        ``emit(prediction, overlay, mask)`` per expression, in order (overlay: RGB PIL image at most
        ``overlay_side`` px, 0: full size; mask: 'L' PIL image at the image's size, 255 = referred),
        one full-size mask at a time. -> the image's (width, height)."""
        with self.lock:
            return self._segment(data, filename, texts, overlay_side, emit)

    def _segment(self, data, filename, texts, overlay_side, emit) -> tuple[int, int]:
        from PIL import Image

        from dmmi.visualize import overlay

        image = decode_image(data, filename, self.max_pixels)
        del data
        width, height = image.size
        shown = image
        if overlay_side and max(width, height) > overlay_side:
            scale = overlay_side / max(width, height)
            shown = image.resize((max(1, round(width * scale)), max(1, round(height * scale))),
                                 Image.Resampling.BILINEAR)
        # one full-size mask at a time; a plain predict(image, texts) -> list works too (test doubles)
        run = getattr(self.predictor, "iter_predict", None) or self.predictor.predict
        try:
            for pred in run(image, texts):
                mask = Image.fromarray(pred.mask.astype("uint8") * 255, mode="L")
                shown_mask = mask if shown is image else mask.resize(shown.size, Image.Resampling.NEAREST)
                tinted = overlay(shown, np.asarray(shown_mask) > 0, label_empty=True)  # 'no target' written when empty
                emit(pred, tinted, mask)
                del pred, mask, shown_mask, tinted
        except DmmiError as e:
            raise RequestError(str(e)) from None
        return width, height

    def predict_parts(self, parts: list[Part]) -> dict:
        """The parts of a /api/predict form -> its JSON answer (RequestError for bad input)."""
        images = [p for p in parts if p.name == "image"]
        if not images:
            raise RequestError("no image: add an 'image' file to the form")
        if len(images) > 1:
            raise RequestError(f"one image per request, got {len(images)}")
        texts = read_expressions([_text(p) for p in parts if p.name == "text"])
        overlay_side = _int_field(parts, "overlay_max_side", OVERLAY_MAX_SIDE, OVERLAY_SIDE_LIMIT)
        upload = images[0]
        parts.clear()  # the upload's bytes now live in `upload` only
        results = []

        def emit(pred, tinted, mask):
            score = getattr(pred, "score", None)
            results.append({
                "text": pred.text,
                "no_target": bool(pred.no_target),
                "foreground": round(float(pred.foreground), 6),
                "score": None if score is None else round(float(score), 6),
                "overlay_png_base64": _png_base64(tinted),
                "mask_png_base64": _png_base64(mask),
            })

        width, height = self.segment(upload.data, upload.filename, texts, overlay_side, emit)
        return {"results": results, "image": {"width": width, "height": height},
                "model": {"preset": self.preset}}


# ---------------------------------------------------------------------------- the application


def create_app(service: Service, *, ui: bool = True):
    """The FastAPI application: ``/api/info``, ``/api/predict`` and (``ui``) the Gradio page at ``/``."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.requests import ClientDisconnect

    app = FastAPI(title="dmmi serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    headers = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}

    def error(status: int, message: str, extra: Optional[dict] = None) -> JSONResponse:
        return JSONResponse({"error": " ".join(str(message).split())}, status_code=int(status),
                            headers={**headers, **(extra or {})})

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):  # 404 / 405 of the JSON routes, in the same one-line shape
        return error(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}")

    async def api_info(request):
        return JSONResponse(service.info(), headers=headers)

    async def api_predict(request):
        limit = service.max_request_bytes
        length = request.headers.get("content-length")
        if length is not None and length.strip().isdigit() and int(length) > limit:  # refused unread
            return error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                         f"request too large: {mb(int(length))} MB (at most {mb(limit)} MB)",
                         {"Connection": "close"})
        if not service.slots.acquire(blocking=False):  # full: say so now instead of queueing bodies
            await drain(request, limit)
            return error(HTTPStatus.SERVICE_UNAVAILABLE, f"busy: {service.max_pending} requests in progress; "
                         "try again in a moment", {"Retry-After": "1"})
        try:
            parts = await read_form(request, limit)
            payload = await run_in_threadpool(service.predict_parts, parts)
        except RequestError as e:
            return error(e.status, str(e), e.headers)
        except ClientDisconnect:
            return error(HTTPStatus.BAD_REQUEST, "the request body was cut off (the client went away)")
        except Exception as e:  # a bug: say so in one line, keep the traceback on the console
            traceback.print_exc(file=sys.stderr)
            return error(HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error: {type(e).__name__}: {e}")
        finally:
            service.slots.release()
        return JSONResponse(payload, headers=headers)

    methods = {"/api/info": "GET", "/api/predict": "POST"}

    async def api_unknown(request):
        path = request.url.path
        if path in methods:  # a known route, another method
            return error(HTTPStatus.METHOD_NOT_ALLOWED, f"use {methods[path]} for {path}", {"Allow": methods[path]})
        return error(HTTPStatus.NOT_FOUND, f"not found: {request.method} {path}")

    # plain Starlette routes (the request as it came), before the page's mount at /
    app.add_route("/api/info", api_info, methods=["GET", "HEAD"])
    app.add_route("/api/predict", api_predict, methods=["POST"])
    app.add_route("/api/{rest:path}", api_unknown, methods=["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH"])

    if ui:
        from dmmi.serve_ui import mount_ui

        mount_ui(app, service)
    return app


class Server:
    """uvicorn serving ``app`` on an already bound socket: ``serve_forever()`` (blocks), ``shutdown()``."""

    def __init__(self, app, sock: socket.socket, quiet: bool = False):
        import uvicorn

        self.app, self.socket = app, sock
        self.service: Service = app.state.service
        config = uvicorn.Config(app, log_level="warning" if quiet else "info", access_log=not quiet,
                                lifespan="on", timeout_keep_alive=30, backlog=LISTEN_BACKLOG,
                                timeout_graceful_shutdown=10)
        self.uvicorn = uvicorn.Server(config)
        self.stopped = threading.Event()

    @property
    def server_address(self) -> tuple[str, int]:
        return self.socket.getsockname()[:2]

    @property
    def url(self) -> str:
        host, port = self.server_address
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}/"

    @property
    def started(self) -> bool:
        return bool(self.uvicorn.started)

    def serve_forever(self) -> None:
        """Serve until :meth:`shutdown` (or, in the main thread, SIGINT / SIGTERM: uvicorn's own
        handlers stop it gracefully and then raise the signal again for the caller)."""
        try:
            self.uvicorn.run(sockets=[self.socket])
        finally:
            self.stopped.set()

    def shutdown(self, timeout: float = 15.0) -> None:
        self.uvicorn.should_exit = True
        self.stopped.wait(timeout)

    def server_close(self) -> None:
        self.socket.close()


def make_server(predictor, host: str = "127.0.0.1", port: int = 7860, *, max_request_mb: float = MAX_REQUEST_MB,
                quiet: bool = False, max_pixels: Optional[int] = MAX_PIXELS, max_pending: int = MAX_PENDING,
                ui: bool = True) -> Server:
    """Build the app and bind (port 0 picks a free one) without serving yet; call ``serve_forever()``."""
    max_pixels = check_max_pixels(max_pixels)
    if isinstance(max_pending, bool) or not isinstance(max_pending, int) or max_pending < 1:
        raise DmmiError(f"max_pending must be a whole number >= 1, got {max_pending!r}")
    if not (max_request_mb > 0 and math.isfinite(max_request_mb)):
        raise DmmiError(f"max_request_mb must be a number > 0, got {max_request_mb!r}")
    service = Service(predictor, max_request_bytes=int(max_request_mb * 1024 * 1024), quiet=quiet,
                      max_pixels=max_pixels, max_pending=max_pending)
    sock = bind(host, port)
    try:
        app = create_app(service, ui=ui)
        return Server(app, sock, quiet=quiet)
    except BaseException:
        sock.close()
        raise


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (IPv4 or IPv6), or a one-line DmmiError."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise DmmiError(f"cannot listen on {host}:{port}: unknown address ({e.strerror or e})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(LISTEN_BACKLOG)
    except OSError as e:
        sock.close()
        raise DmmiError(f"cannot listen on {host}:{port}: {e.strerror or e}"
                        f"{' (try another --port)' if port else ''}") from None
    sock.set_inheritable(True)
    return sock


# ---------------------------------------------------------------------------- CLI

EPILOG = """\
examples:
  dmmi serve --model runs/demo/model                    # open http://127.0.0.1:7860
  dmmi serve --model my-dmmi/ --port 8080 --device cpu  # a model directory (or a Hub repo id)
  dmmi serve --model my-dmmi/ --host 0.0.0.0            # reachable from other machines
  curl -F image=@photo.jpg -F text="the red circle" -F text="all the people" \\
       http://127.0.0.1:7860/api/predict                # the JSON API
"""


def register(subparsers) -> None:
    import argparse

    from dmmi.engine.commands import decision_options

    p = subparsers.add_parser("serve", help="a web page (and JSON API) to segment your own images",
                              description="Serve a trained model: a web page (Gradio) at / and a JSON API at\n"
                                          "/api/predict (multipart: an 'image' file, one or more 'text' fields).",
                              epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", "--model", dest="checkpoint", required=True, metavar="MODEL",
                   help="a trained model: best.pt / a .safetensors file, a model directory or a Hub repo id")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860; 0 picks a free one)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--reference", action="store_true", help="fp32 reference mode instead of the fast mode")
    decision_options(p)  # --threshold, --min-area
    p.add_argument("--max-mb", type=float, default=MAX_REQUEST_MB, metavar="MB",
                   help=f"largest request or upload accepted, in MB (default {MAX_REQUEST_MB:g})")
    p.add_argument("--max-pixels", type=int, default=MAX_PIXELS, metavar="N",
                   help=f"largest image accepted, width x height (default {MAX_PIXELS:,})")
    p.add_argument("--max-pending", type=int, default=MAX_PENDING, metavar="N",
                   help=f"predict requests admitted at once; more get 503 (default {MAX_PENDING})")
    p.add_argument("--quiet", action="store_true", help="no request log on the console")
    p.set_defaults(func=cmd_serve)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def check_args(args) -> None:
    """The options' values, before the model loads (one-line DmmiError)."""
    from dmmi.engine.commands import check_decision

    if not 0 <= args.port <= 65535:
        raise DmmiError(f"--port must be in 0-65535, got {args.port}")
    if not (args.max_mb > 0 and math.isfinite(args.max_mb)):  # NaN and inf too
        raise DmmiError(f"--max-mb must be a number > 0, got {args.max_mb:g}")
    check_max_pixels(args.max_pixels, "--max-pixels")
    if args.max_pending < 1:
        raise DmmiError(f"--max-pending must be >= 1, got {args.max_pending}")
    check_decision(args)  # --threshold, --min-area


def serve(server: Server, host: str) -> int:
    """Print where to go and serve until Ctrl+C / SIGTERM (both stop cleanly: exit status 0)."""
    info = server.service.info()["model"]
    shown = server.url if host not in ("0.0.0.0", "::", "") else f"http://localhost:{server.server_address[1]}/"
    print(f"dmmi serve: {info['preset']} on {info['device']} ({info['image_size']} px input)")
    note = server.service.domain_note
    if note:
        print(note)
        server.service.predictor.domain_noted = True  # said once: not again on the first photo
    print(f"open {shown}  (API: POST {shown}api/predict; Ctrl+C to stop)", flush=True)
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if main else None  # uvicorn re-raises it after stopping
    # what is loaded now (the model, Gradio, their modules) stays: the collector skips it from here
    # on, while serving and in the interpreter's final collections (a quick exit on SIGTERM)
    gc.freeze()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
        server.server_close()
    print("dmmi serve: stopped", flush=True)
    return 0


def cmd_serve(args) -> int:
    from dmmi.engine.distributed import resolve_device
    from dmmi.inference import Predictor

    check_args(args)
    device = resolve_device(args.device, option="--device", fix="--device cpu")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    predictor = Predictor.load(args.checkpoint, device=device, fast=not args.reference, max_pixels=args.max_pixels,
                               threshold=args.threshold, min_area=args.min_area)
    server = make_server(predictor, args.host, args.port, max_request_mb=args.max_mb, max_pixels=args.max_pixels,
                         max_pending=args.max_pending, quiet=args.quiet)
    return serve(server, args.host)
