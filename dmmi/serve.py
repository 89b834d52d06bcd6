"""``dmmi serve``: segment your own images from a web page, or through a small JSON API.

    dmmi serve --checkpoint runs/demo/best.pt          # then open http://127.0.0.1:7860

Standard library only (``http.server``): the model is loaded once and every request that
runs it holds one lock for its whole heavy part (parsing the form, decoding the image, the
model, encoding the PNGs), so requests are answered one at a time and concurrent uploads
cannot multiply memory, while pages and static files are still served in parallel. At most
``max_pending`` predict requests are admitted at once (their bodies, at most ``--max-mb``
each, are the only memory that waits for the lock); more get ``503`` with ``Retry-After``.
The listen backlog (``request_queue_size``) holds bursts of connections instead of resetting
them.

Routes
------
``GET /``                 the page (``dmmi/web/index.html`` with its ``app.js`` / ``style.css``)
``GET /api/info``         ``{"model": {"preset", "image_size", "device"}, "examples": [...], "limits": {...}}``
``POST /api/predict``     multipart/form-data: one ``image`` file and one or more ``text``
                          fields (a field may hold several expressions, one per line) ->
                          ``{"results": [{"text", "no_target", "foreground",
                          "overlay_png_base64", "mask_png_base64"}], "image": {"width",
                          "height"}, "model": {"preset"}}``; results follow the expressions'
                          order; masks are 8-bit grey PNGs (255 = referred) at the image's size;
                          overlays are downscaled to at most ``overlay_max_side`` px (an optional
                          field, a whole number 0-65535, default 1280; 0 = the image's size).
                          Any other field name is refused. Images above ``--max-pixels`` (default
                          40 million) are refused from their header, before decoding (413).
Bad input gets a 4xx status and ``{"error": "one line"}``.
"""

from __future__ import annotations

import base64
import io
import json
import math
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from email.parser import HeaderParser
from email.policy import HTTP
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional
from urllib.parse import urlsplit

import numpy as np

from dmmi.data.images import DEFAULT_MAX_PIXELS, ImageTooLarge, check_max_pixels, load_image
from dmmi.errors import DmmiError

WEB_DIR = Path(__file__).parent / "web"
STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                ".css": "text/css; charset=utf-8", ".png": "image/png", ".svg": "image/svg+xml",
                ".ico": "image/x-icon"}

MAX_REQUEST_MB = 20.0  # whole multipart body
MAX_PIXELS = DEFAULT_MAX_PIXELS  # decoded image: width * height (--max-pixels)
MAX_EXPRESSIONS = 16
MAX_EXPRESSION_CHARS = 300
OVERLAY_MAX_SIDE = 1280  # overlays are for looking at: larger images are shown downscaled
OVERLAY_SIDE_LIMIT = 65535  # the largest overlay_max_side accepted
OVERLAY_COLOR = (0, 220, 255)  # cyan: stands out on red, green, blue and yellow objects alike
MAX_PENDING = 32  # predict requests admitted at once (reading, waiting for the model, running)
LISTEN_BACKLOG = 128  # connections the kernel holds before accept (Python's default is 5)
FIELDS = ("image", "text", "overlay_max_side")  # the form fields of /api/predict

# chips on the page; the synthetic set's vocabulary when the model was trained on it
SYNTHETIC_EXAMPLES = ("the red circle", "all the blue shapes", "both squares", "the leftmost shape",
                      "the small green triangle and the big star", "the purple dog")
GENERIC_EXAMPLES = ("the man on the left", "all the people", "the two dogs", "the cup on the table",
                    "everything that is red", "the giraffe")


class RequestError(Exception):
    """Bad input: answered with ``status`` and ``{"error": message}`` (one line)."""

    def __init__(self, message: str, status: int = HTTPStatus.BAD_REQUEST):
        super().__init__(" ".join(str(message).split()))
        self.status = int(status)


# ---------------------------------------------------------------------------- multipart


@dataclass
class Part:
    name: str
    data: bytes
    filename: Optional[str] = None
    content_type: Optional[str] = None


def _header_params(content_type: str) -> tuple[str, dict]:
    """'multipart/form-data; boundary=x' -> ('multipart/form-data', {'boundary': 'x'})."""
    msg = HeaderParser(policy=HTTP).parsestr(f"Content-Type: {content_type}\r\n\r\n")
    return msg.get_content_type(), dict(msg["content-type"].params)


def parse_multipart(body: bytes, content_type: str) -> list[Part]:
    """Split a multipart/form-data body (RFC 7578) into its parts, bytes kept exactly."""
    kind, params = _header_params(content_type or "")
    if kind != "multipart/form-data":
        raise RequestError("send the form as multipart/form-data (an 'image' file and 'text' fields)",
                           HTTPStatus.UNSUPPORTED_MEDIA_TYPE)
    boundary = params.get("boundary")
    if not boundary or len(boundary) > 200:
        raise RequestError("multipart body without a boundary in its Content-Type")
    delimiter = b"\r\n--" + boundary.encode("latin-1")
    sections = (b"\r\n" + body).split(delimiter)
    if len(sections) < 2:
        raise RequestError("malformed multipart body: no part found")
    parts: list[Part] = []
    closed = False
    for section in sections[1:]:  # sections[0] is the preamble
        if section.startswith(b"--"):
            closed = True
            break
        head_end = section.find(b"\r\n")  # rest of the delimiter line (transport padding)
        block = section[head_end + 2:] if head_end >= 0 else b""
        raw_headers, sep, data = block.partition(b"\r\n\r\n")
        if not sep:
            raise RequestError("malformed multipart body: a part has no header/body separator")
        # browsers send UTF-8 file names as raw bytes
        headers = HeaderParser(policy=HTTP).parsestr(raw_headers.decode("utf-8", errors="replace") + "\r\n\r\n")
        disposition = headers.get("content-disposition")
        if disposition is None or disposition.content_disposition != "form-data":
            raise RequestError("malformed multipart body: a part is not form-data")
        name = disposition.params.get("name")
        if name is None:
            raise RequestError("malformed multipart body: a part has no name")
        filename = disposition.params.get("filename")
        ctype = headers.get_content_type() if headers.get("content-type") else None
        parts.append(Part(name=str(name), data=data, filename=filename, content_type=ctype))
    if not closed:
        raise RequestError("malformed multipart body: it was cut off (no closing boundary)")
    return parts


# ---------------------------------------------------------------------------- requests


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


def _png_base64(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=3)
    return base64.b64encode(buf.getvalue()).decode("ascii")


@dataclass
class App:
    """What the handlers share: the predictor, its lock and the limits."""

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

    def info(self) -> dict:
        cfg = self.predictor.cfg
        synthetic = getattr(getattr(cfg, "data", None), "dataset", None) == "synthetic"
        return {
            "model": {"preset": self.preset, "image_size": int(self.predictor.size),
                      "device": str(self.predictor.device)},
            "examples": list(SYNTHETIC_EXAMPLES if synthetic else GENERIC_EXAMPLES),
            "limits": {"request_mb": round(self.max_request_bytes / 2**20, 1),
                       "megapixels": None if self.max_pixels is None else round(self.max_pixels / 1e6, 1),
                       "pixels": self.max_pixels, "pending_requests": self.max_pending,
                       "expressions": MAX_EXPRESSIONS, "expression_chars": MAX_EXPRESSION_CHARS,
                       "overlay_max_side": OVERLAY_MAX_SIDE},
        }

    def predict(self, body: bytes, content_type: str) -> dict:
        """The whole request under the lock: one form, one image and its masks in memory at a time."""
        with self.lock:
            return self._predict(body, content_type)

    def _predict(self, body: bytes, content_type: str) -> dict:
        from PIL import Image

        from dmmi.visualize import overlay

        parts = parse_multipart(body, content_type)
        unknown = sorted({p.name for p in parts} - set(FIELDS))
        if unknown:
            raise RequestError(f"unknown form field(s) {', '.join(repr(n[:40]) for n in unknown[:5])}; "
                               f"the fields are {', '.join(FIELDS)}")
        images = [p for p in parts if p.name == "image"]
        if not images:
            raise RequestError("no image: add an 'image' file to the form")
        if len(images) > 1:
            raise RequestError(f"one image per request, got {len(images)}")
        texts = read_expressions([_text(p) for p in parts if p.name == "text"])
        overlay_side = _int_field(parts, "overlay_max_side", OVERLAY_MAX_SIDE, OVERLAY_SIDE_LIMIT)
        image = decode_image(images[0].data, images[0].filename, self.max_pixels)
        del parts, images  # the parts' copies of the upload
        width, height = image.size
        shown = image
        if overlay_side and max(width, height) > overlay_side:
            scale = overlay_side / max(width, height)
            shown = image.resize((max(1, round(width * scale)), max(1, round(height * scale))),
                                 Image.Resampling.BILINEAR)
        # one full-size mask at a time; a plain predict(image, texts) -> list works too (test doubles)
        run = getattr(self.predictor, "iter_predict", None) or self.predictor.predict
        results = []
        try:
            for pred in run(image, texts):
                mask = Image.fromarray(pred.mask.astype("uint8") * 255, mode="L")
                shown_mask = mask if shown is image else mask.resize(shown.size, Image.Resampling.NEAREST)
                results.append({
                    "text": pred.text,
                    "no_target": bool(pred.no_target),
                    "foreground": round(float(pred.foreground), 6),
                    "overlay_png_base64": _png_base64(overlay(shown, np.asarray(shown_mask) > 0, color=OVERLAY_COLOR,
                                                              outline_width=max(2, round(max(shown.size) / 160)))),
                    "mask_png_base64": _png_base64(mask),
                })
                del pred, mask, shown_mask
        except DmmiError as e:
            raise RequestError(str(e)) from None
        return {"results": results, "image": {"width": width, "height": height},
                "model": {"preset": self.preset}}


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


class Handler(BaseHTTPRequestHandler):
    server_version = "dmmi-serve"
    protocol_version = "HTTP/1.1"
    timeout = 120  # seconds a client may stay silent mid-request (or idle between keep-alive requests)
    app: App  # set on the subclass made by make_server

    # -- plumbing
    def _send(self, status: int, body: bytes, content_type: str, headers: Optional[dict] = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, payload: dict, headers: Optional[dict] = None) -> None:
        self._send(status, json.dumps(payload).encode("utf-8"), "application/json", headers)

    def _error(self, status: int, message: str, headers: Optional[dict] = None) -> None:
        self._json(status, {"error": " ".join(message.split())}, headers)

    def _drain(self, length: int) -> bool:
        """Read and drop ``length`` body bytes (so closing does not reset the connection)."""
        while length > 0:
            chunk = self.rfile.read(min(length, 1 << 16))
            if not chunk:
                return False
            length -= len(chunk)
        return True

    def log_message(self, format, *args) -> None:  # noqa: A002 (the base class's name)
        if not self.app.quiet:
            sys.stderr.write(f"[{time.strftime('%H:%M:%S')}] {self.address_string()} {format % args}\n")

    # -- routes
    def do_GET(self) -> None:  # noqa: N802
        path = urlsplit(self.path).path
        if path == "/api/info":
            return self._json(HTTPStatus.OK, self.app.info())
        if path == "/api/predict":
            return self._error(HTTPStatus.METHOD_NOT_ALLOWED, "use POST for /api/predict")
        name = "index.html" if path in ("/", "/index.html") else path.lstrip("/")
        static = WEB_DIR / name
        # only plain files directly in dmmi/web/, no paths
        if "/" in name or "\\" in name or name.startswith(".") or not static.is_file() \
                or static.suffix not in STATIC_TYPES:
            return self._error(HTTPStatus.NOT_FOUND, f"not found: {path}")
        self._send(HTTPStatus.OK, static.read_bytes(), STATIC_TYPES[static.suffix])

    do_HEAD = do_GET

    def handle_expect_100(self) -> bool:
        """Refuse a too-large upload before the client sends it (curl asks first)."""
        length = self.headers.get("Content-Length", "")
        if length.strip().isdigit() and int(length) > self.app.max_request_bytes:
            self.close_connection = True
            self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"request too large: {int(length) / 2**20:.1f} MB "
                        f"(at most {self.app.max_request_bytes / 2**20:.1f} MB)")
            return False
        return super().handle_expect_100()

    def do_POST(self) -> None:  # noqa: N802
        path = urlsplit(self.path).path
        if path != "/api/predict":
            self.close_connection = True
            return self._error(HTTPStatus.NOT_FOUND, f"not found: POST {path}")
        length = self.headers.get("Content-Length")
        if length is None or not length.strip().isdigit():
            self.close_connection = True
            return self._error(HTTPStatus.LENGTH_REQUIRED, "send a Content-Length header")
        length = int(length)
        limit = self.app.max_request_bytes
        if length > limit:
            self.close_connection = True  # the body is not read
            return self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                               f"request too large: {length / 2**20:.1f} MB (at most {limit / 2**20:.1f} MB)")
        if not self.app.slots.acquire(blocking=False):  # full: say so now instead of queueing bodies
            self.close_connection = True
            if self._drain(length):
                self._error(HTTPStatus.SERVICE_UNAVAILABLE, f"busy: {self.app.max_pending} requests in progress; "
                            "try again in a moment", {"Retry-After": "1"})
            return
        try:
            body = self.rfile.read(length)
            if len(body) < length:
                self.close_connection = True
                return self._error(HTTPStatus.BAD_REQUEST, "request body cut off before Content-Length bytes")
            try:
                payload = self.app.predict(body, self.headers.get("Content-Type", ""))
            except RequestError as e:
                return self._error(e.status, str(e))
            except Exception as e:  # a bug: say so in one line, keep the traceback on the console
                traceback.print_exc(file=sys.stderr)
                return self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error: {type(e).__name__}: {e}")
        finally:
            self.app.slots.release()
        self._json(HTTPStatus.OK, payload)


class DmmiServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = LISTEN_BACKLOG  # a burst of connections waits in the kernel, not reset

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"


def make_server(predictor, host: str = "127.0.0.1", port: int = 7860, *, max_request_mb: float = MAX_REQUEST_MB,
                quiet: bool = False, max_pixels: Optional[int] = MAX_PIXELS,
                max_pending: int = MAX_PENDING) -> DmmiServer:
    """Bind (port 0 picks a free one) without serving yet; call ``serve_forever()``."""
    max_pixels = check_max_pixels(max_pixels)
    if isinstance(max_pending, bool) or not isinstance(max_pending, int) or max_pending < 1:
        raise DmmiError(f"max_pending must be a whole number >= 1, got {max_pending!r}")
    app = App(predictor, max_request_bytes=int(max_request_mb * 1024 * 1024), quiet=quiet, max_pixels=max_pixels,
              max_pending=max_pending)
    handler = type("DmmiHandler", (Handler,), {"app": app})
    try:
        server = DmmiServer((host, port), handler)
    except OSError as e:
        raise DmmiError(f"cannot listen on {host}:{port}: {e.strerror or e}"
                        f"{' (try another --port)' if port else ''}") from None
    server.app = app
    return server


# ---------------------------------------------------------------------------- CLI


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="a web page (and JSON API) to segment your own images")
    p.add_argument("--checkpoint", "--model", dest="checkpoint", required=True, metavar="MODEL",
                   help="a trained model: best.pt / a .safetensors file, a model directory or a Hub repo id")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860; 0 picks a free one)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--reference", action="store_true", help="fp32 reference mode instead of the fast mode")
    p.add_argument("--max-mb", type=float, default=MAX_REQUEST_MB,
                   help=f"largest request accepted, in MB (default {MAX_REQUEST_MB:g})")
    p.add_argument("--max-pixels", type=int, default=MAX_PIXELS, metavar="N",
                   help=f"largest image accepted, width x height (default {MAX_PIXELS:,})")
    p.add_argument("--max-pending", type=int, default=MAX_PENDING, metavar="N",
                   help=f"predict requests admitted at once; more get 503 (default {MAX_PENDING})")
    p.set_defaults(func=cmd_serve)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def cmd_serve(args) -> int:
    from dmmi.engine.distributed import resolve_device
    from dmmi.inference import Predictor

    if not 0 <= args.port <= 65535:
        raise DmmiError(f"--port must be in 0-65535, got {args.port}")
    if not (args.max_mb > 0 and math.isfinite(args.max_mb)):  # NaN and inf too
        raise DmmiError(f"--max-mb must be a number > 0, got {args.max_mb:g}")
    check_max_pixels(args.max_pixels, "--max-pixels")
    if args.max_pending < 1:
        raise DmmiError(f"--max-pending must be >= 1, got {args.max_pending}")
    if not (WEB_DIR / "index.html").is_file():
        raise DmmiError(f"the web page is missing from the installation: {WEB_DIR / 'index.html'}")
    device = resolve_device(args.device, option="--device", fix="--device cpu")
    predictor = Predictor.load(args.checkpoint, device=device, fast=not args.reference, max_pixels=args.max_pixels)
    server = make_server(predictor, args.host, args.port, max_request_mb=args.max_mb, max_pixels=args.max_pixels,
                         max_pending=args.max_pending)
    info = server.app.info()["model"]
    shown = server.url if args.host not in ("0.0.0.0", "::") else f"http://localhost:{server.server_address[1]}/"
    print(f"dmmi serve: {info['preset']} on {info['device']} ({info['image_size']} px input)")
    print(f"open {shown}  (API: POST {shown}api/predict; Ctrl+C to stop)", flush=True)
    if threading.current_thread() is threading.main_thread():  # `kill` / a container stop: as Ctrl+C
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("\ndmmi serve: stopped")
    finally:
        server.server_close()
    return 0
