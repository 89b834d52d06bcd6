"""`dmmi serve`: the JSON API (FastAPI's test client and a real uvicorn server), the Gradio page's
function and configuration, app.py and the CLI, against a tiny trained checkpoint."""

import asyncio
import base64
import copy
import io
import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from starlette.requests import Request

from dmmi.cli import build_parser, main as cli
from dmmi.config import load_config
from dmmi.data.synthetic import generate
from dmmi.engine.train import train
from dmmi.errors import DmmiError
from dmmi.inference import Predictor
from dmmi.serve import (LISTEN_BACKLOG, RequestError, Service, create_app, decode_image, read_form,
                        make_server)

pytestmark = pytest.mark.timeout(180)
ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------- helpers (the browser test uses them too)


def make_tiny_checkpoint(root: Path) -> tuple[Path, Path]:
    """A 1-step dmmi_tiny model on a 16-image synthetic set -> (checkpoint, an image of the set)."""
    data = root / "synth"
    generate(data, n_images=16, seed=3, image_size=64)
    result = train(load_config("dmmi_tiny", [f"data.root={data}", f"train.output_dir={root / 'run'}",
                                             "train.max_steps=1", "data.val_split=null", "train.batch_size=4"]),
                   progress=False, log=lambda *a: None)
    return result.best_path, sorted((data / "images").iterdir())[0]


@contextmanager
def serving(predictor, **kwargs):
    """The real server (uvicorn) on a free localhost port, in a thread; yields the Server (``.url``, ``.service``)."""
    kwargs.setdefault("ui", False)
    server = make_server(predictor, "127.0.0.1", 0, quiet=True, **kwargs)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        for _ in range(600):
            if server.started or not thread.is_alive():
                break
            time.sleep(0.05)
        assert server.started, "the server did not start"
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@contextmanager
def running_server(predictor, **kwargs):
    """The server on a free localhost port, in a thread; yields its base URL."""
    with serving(predictor, **kwargs) as server:
        yield server.url


@contextmanager
def api_client(predictor, ui: bool = False, **service_kwargs):
    from fastapi.testclient import TestClient

    with TestClient(create_app(Service(predictor, quiet=True, **service_kwargs), ui=ui)) as client:
        yield client


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def multipart(fields: list) -> tuple[bytes, str]:
    """[(name, str) or (name, (filename, bytes, content type))] -> (body, Content-Type), bytes as given."""
    boundary = f"----dmmi{uuid.uuid4().hex}"
    out = io.BytesIO()
    for name, value in fields:
        out.write(f"--{boundary}\r\n".encode())
        if isinstance(value, tuple):
            filename, data, ctype = value
            out.write(f'Content-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                      f"Content-Type: {ctype}\r\n\r\n".encode())  # UTF-8 name as raw bytes, like browsers
            out.write(data)
        else:
            out.write(f'Content-Disposition: form-data; name="{name}"\r\n\r\n'.encode())
            out.write(value.encode("utf-8"))
        out.write(b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


def request(url: str, body: bytes | None = None, content_type: str | None = None, method: str | None = None):
    """urllib against a real server -> (status, headers, body bytes), 4xx/5xx included."""
    req = urllib.request.Request(url, data=body, method=method)
    if content_type:
        req.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def post_predict(base: str, fields: list):
    body, ctype = multipart(fields)
    status, _, data = request(base + "api/predict", body, ctype)
    return status, json.loads(data)


def client_predict(client, fields: list):
    body, ctype = multipart(fields)
    r = client.post("/api/predict", content=body, headers={"Content-Type": ctype})
    return r.status_code, r.json()


def decode_png(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def _png(photo):
    return ("image", ("photo.png", png_bytes(photo), "image/png"))


def header_only_png(width: int, height: int) -> bytes:
    """A PNG whose header says width x height, with no pixel data to speak of."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def predictor(tiny):
    return Predictor.load(tiny[0], device="cpu")


@pytest.fixture(scope="module")
def client(predictor):
    """The whole application (the page mounted at /) through FastAPI's test client."""
    with api_client(predictor, ui=True) as c:
        yield c


@pytest.fixture(scope="module")
def photo(tiny):
    """A non-square RGB image (96 x 60), so width and height cannot be swapped unnoticed."""
    return Image.open(tiny[1]).convert("RGB").resize((96, 60))


# ---------------------------------------------------------------------------- API


def test_info(client):
    r = client.get("/api/info")
    assert r.status_code == 200 and r.headers["Content-Type"] == "application/json"
    info = r.json()
    assert info["model"] == {"preset": "dmmi_tiny", "image_size": 64, "device": "cpu"}
    assert info["examples"] and all(isinstance(t, str) and t for t in info["examples"])
    assert info["limits"]["request_mb"] == 20.0 and info["limits"]["expressions"] == 16
    assert "synthetic set" in info["domain_note"]  # the tiny model was trained on the synthetic shapes


def test_predict(client, photo, predictor):
    texts = ["the red circle", "all the shapes\n\n  the   blue star  ", "a purple dog"]
    status, out = client_predict(client, [_png(photo)] + [("text", t) for t in texts])
    assert status == 200, out
    assert out["image"] == {"width": 96, "height": 60}
    assert out["model"] == {"preset": "dmmi_tiny"}
    expected = ["the red circle", "all the shapes", "the blue star", "a purple dog"]  # lines, in order
    assert [r["text"] for r in out["results"]] == expected
    direct = predictor.predict(photo, expected)
    for result, pred in zip(out["results"], direct):
        assert set(result) == {"text", "no_target", "foreground", "score", "overlay_png_base64", "mask_png_base64"}
        mask = decode_png(result["mask_png_base64"])
        assert mask.size == (96, 60) and mask.mode == "L"
        arr = np.asarray(mask)
        assert set(np.unique(arr)) <= {0, 255}
        assert np.array_equal(arr > 0, pred.mask)  # the same model, the same answer
        assert result["no_target"] == (not arr.any())
        assert result["foreground"] == pytest.approx((arr > 0).mean(), abs=1e-5)
        assert result["score"] == pytest.approx(pred.score, abs=1e-5) and 0 <= result["score"] <= 1
        overlay = decode_png(result["overlay_png_base64"])
        assert overlay.size == (96, 60) and overlay.mode == "RGB"
        if result["no_target"]:
            assert np.array_equal(np.asarray(overlay), np.asarray(photo))
        else:
            assert not np.array_equal(np.asarray(overlay), np.asarray(photo))


def test_a_no_target_overlay_says_so(predictor):
    nothing = Predictor(predictor.model, predictor.cfg, device="cpu", tokenizer=predictor.tokenizer,
                        min_area=0.999)  # every mask counts as no target
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (160, 256, 3), dtype=np.uint8))
    with api_client(nothing) as c:
        status, out = client_predict(c, [_png(image), ("text", "the red circle")])
    assert status == 200, out
    result, = out["results"]
    assert result["no_target"] and not np.asarray(decode_png(result["mask_png_base64"])).any()
    shown, plain = np.asarray(decode_png(result["overlay_png_base64"])), np.asarray(image)
    assert not np.array_equal(shown[:40, :120], plain[:40, :120])  # "no target" written top left
    assert np.array_equal(shown[60:], plain[60:])  # the rest of the image untouched


def test_predict_through_httpx_with_a_real_server_jpeg_and_small_overlays(photo, predictor):
    import httpx

    buf = io.BytesIO()
    photo.save(buf, format="JPEG", quality=90)
    texts = ["the red circle", "all the shapes", "the blue star"]
    chunked = Predictor(predictor.model, predictor.cfg, device="cpu", tokenizer=predictor.tokenizer,
                        expressions_per_call=2)  # two expressions per model call
    with running_server(chunked) as url:
        r = httpx.post(url + "api/predict", files={"image": ("p.jpg", buf.getvalue(), "image/jpeg")},
                       data={"text": texts, "overlay_max_side": "48"}, timeout=60)
    assert r.status_code == 200, r.text
    out = r.json()
    assert [x["text"] for x in out["results"]] == texts
    decoded = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    for result, pred in zip(out["results"], predictor.predict(decoded, texts)):
        assert np.array_equal(np.asarray(decode_png(result["mask_png_base64"])) > 0, pred.mask)  # full size
        assert decode_png(result["overlay_png_base64"]).size == (48, 30)  # shown downscaled


@pytest.mark.parametrize("case, fields, status, words", [
    ("no image", lambda p: [("text", "the red circle")], 400, "no image"),
    ("corrupt image", lambda p: [("image", ("x.png", b"\x89PNG\r\n\x1a\n" + b"\0garbage" * 50, "image/png")),
                                 ("text", "the red circle")], 400, "cannot read 'x.png'"),
    ("truncated image", lambda p: [("image", ("t.png", png_bytes(p)[:200], "image/png")),
                                   ("text", "the red circle")], 400, "cannot read 't.png'"),
    ("text file", lambda p: [("image", ("notes.txt", b"hello world", "text/plain")), ("text", "a cat")],
     400, "not an image"),
    ("utf-8 file name", lambda p: [("image", ("caf\u00e9.png", b"nope", "image/png")), ("text", "a cat")], 400,
     "cannot read 'caf\u00e9.png'"),
    ("bad overlay size", lambda p: [_png(p), ("text", "a cat"), ("overlay_max_side", "big")], 400,
     "'overlay_max_side' must be"),
    ("5000-digit overlay size", lambda p: [_png(p), ("text", "a cat"), ("overlay_max_side", "9" * 5000)], 400,
     "'overlay_max_side' must be one whole number from 0 to 65535"),
    ("overlay size over the limit", lambda p: [_png(p), ("text", "a cat"), ("overlay_max_side", "65536")], 400,
     "'overlay_max_side' must be"),
    ("superscript overlay size", lambda p: [_png(p), ("text", "a cat"), ("overlay_max_side", "\u00b2")], 400,
     "'overlay_max_side' must be"),
    ("negative overlay size", lambda p: [_png(p), ("text", "a cat"), ("overlay_max_side", "-1")], 400,
     "'overlay_max_side' must be"),
    ("two overlay sizes", lambda p: [_png(p), ("text", "a cat"), ("overlay_max_side", "1"),
                                     ("overlay_max_side", "2")], 400, "'overlay_max_side' must be one"),
    ("unknown field", lambda p: [_png(p), ("text", "a cat"), ("overlay_max_sid", "48")], 400,
     "unknown form field 'overlay_max_sid'"),
    ("unknown field before the image", lambda p: [("files", "x"), _png(p), ("text", "a cat")], 400,
     "unknown form field 'files'; the fields are image, text, overlay_max_side"),
    ("text not utf-8", lambda p: [_png(p), ("text", ("t.txt", b"a \xff cat", "text/plain"))], 400,
     "'text' field is not UTF-8"),
    ("image over the pixel cap", lambda p: [("image", ("huge.png", header_only_png(9000, 5000), "image/png")),
                                            ("text", "a cat")], 413, "'huge.png' is too large: 9000x5000"),
    ("empty file", lambda p: [("image", ("e.png", b"", "image/png")), ("text", "a cat")], 400, "is empty"),
    ("empty text", lambda p: [_png(p), ("text", "   ")], 400, "empty expression"),
    ("one empty text of two", lambda p: [_png(p), ("text", "the red circle"), ("text", "")], 400,
     "empty expression"),
    ("no text", lambda p: [_png(p)], 400, "no expression"),
    ("two images", lambda p: [_png(p), _png(p), ("text", "a cat")], 400, "one image per request"),
    ("too many", lambda p: [_png(p), ("text", "\n".join(f"shape {i}" for i in range(40)))], 400,
     "too many expressions: 40 (at most 16"),
    ("too long", lambda p: [_png(p), ("text", "a " * 200)], 400, "expression too long: 399 characters"),
    ("too many parts", lambda p: [_png(p)] + [("text", "a cat")] * 70, 400,
     "multipart form refused: Too many fields. Maximum number of fields is 64."),
    ("too many files", lambda p: [_png(p)] * 70 + [("text", "a cat")], 400, "Too many files"),
    ("a huge text field", lambda p: [_png(p), ("text", "a cat " * 20_000)], 400, "exceeded maximum size of 64KB"),
])
def test_bad_input_is_a_one_line_4xx(client, photo, case, fields, status, words):
    got, out = client_predict(client, fields(photo))
    assert got == status, (case, out)
    assert set(out) == {"error"} and words in out["error"], (case, out)
    assert "\n" not in out["error"] and "Traceback" not in out["error"]


def test_bad_requests(client, predictor):
    def post(body, ctype):
        r = client.post("/api/predict", content=body, headers={"Content-Type": ctype} if ctype else {})
        return r.status_code, r.json()

    status, out = post(b'{"text": "a cat"}', "application/json")
    assert status == 415 and "multipart/form-data" in out["error"]
    assert post(b"", None)[0] == 415
    status, out = post(b"--x\r\nno closing", "multipart/form-data; boundary=x")
    assert status == 400 and out["error"] == "multipart form refused: Invalid multipart data."
    status, out = post(b"--x\r\nContent-Disposition: form-data; name=\"text\"\r\n\r\na cat",
                       "multipart/form-data; boundary=x")
    assert status == 400 and "cut off" in out["error"]
    status, out = post(b"--x--\r\n", "multipart/form-data")
    assert status == 400 and "without a boundary" in out["error"]
    r = client.get("/api/predict")
    assert r.status_code == 405 and r.json() == {"error": "use POST for /api/predict"}
    r = client.post("/api/info")
    assert r.status_code == 405 and r.json() == {"error": "use GET for /api/info"}
    r = client.post("/api/other", content=b"")
    assert r.status_code == 404 and r.json() == {"error": "not found: POST /api/other"}


def test_request_size_limit(predictor, photo):
    body, ctype = multipart([("image", ("big.bin", os.urandom(20_000), "image/png")), ("text", "a cat")])
    with api_client(predictor, max_request_bytes=10_000) as small:
        r = small.post("/api/predict", content=body, headers={"Content-Type": ctype})
        assert r.status_code == 413
        assert r.json()["error"] == f"request too large: {len(body) / 2**20:.3g} MB (at most 0.00954 MB)"
        # a chunked body (no Content-Length) is counted as it arrives
        r = small.post("/api/predict", content=iter([body[:6000], body[6000:]]), headers={"Content-Type": ctype})
        assert "content-length" not in r.request.headers
        assert r.status_code == 413 and "request too large: more than" in r.json()["error"]
        # under the limit, chunked: answered
        body, ctype = multipart([_png(photo), ("text", "a cat")])
        assert len(body) < 10_000
        r = small.post("/api/predict", content=iter([body[:100], body[100:]]), headers={"Content-Type": ctype})
        assert r.status_code == 200 and r.json()["results"][0]["text"] == "a cat"
    with running_server(predictor, max_request_mb=0.01) as url:  # refused from the header on the real server
        status, _, data = request(url + "api/predict", body + b"x" * 20_000, ctype)
        assert status == 413 and "request too large" in json.loads(data)["error"]


def test_a_bug_is_a_one_line_500(photo, capsys):
    class Broken:
        cfg, size, device = type("Cfg", (), {"preset": "broken"})(), 64, "cpu"

        def predict(self, image, texts):
            raise RuntimeError("boom\nsecond line")

    with api_client(Broken()) as c:
        status, out = client_predict(c, [_png(photo), ("text", "a cat")])
        assert status == 500 and out == {"error": "internal error: RuntimeError: boom second line"}
        assert c.get("/api/info").status_code == 200  # still serving
    assert "Traceback" in capsys.readouterr().err  # the details stay on the console


def _ask(url: str, body: bytes, ctype: str, start: threading.Barrier):
    """POST at the same moment as the others -> (status, Retry-After, payload) or the exception's name."""
    req = urllib.request.Request(url + "api/predict", data=body)
    req.add_header("Content-Type", ctype)
    start.wait(30)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, None, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Retry-After"), json.loads(e.read())
    except OSError as e:  # ConnectionResetError, timeouts, refused connections
        return type(e).__name__, None, str(e)


def test_a_burst_of_40_concurrent_requests_is_answered_not_reset(photo, predictor):
    body, ctype = multipart([_png(photo), ("text", "the red circle")])
    expected = predictor.predict(photo, "the red circle").mask
    with serving(predictor, max_pending=8) as server:
        start = threading.Barrier(40)
        with ThreadPoolExecutor(40) as pool:
            answers = list(pool.map(lambda _: _ask(server.url, body, ctype, start), range(40)))
    statuses = [a[0] for a in answers]
    assert all(s in (200, 503) for s in statuses), statuses  # answered, none reset
    assert statuses.count(200) >= 8, statuses
    for status, retry, payload in answers:
        if status == 200:
            assert np.array_equal(np.asarray(decode_png(payload["results"][0]["mask_png_base64"])) > 0, expected)
        else:
            assert retry == "1" and payload == {"error": "busy: 8 requests in progress; try again in a moment"}
    assert LISTEN_BACKLOG >= 128


def test_when_every_slot_is_taken_a_request_gets_a_one_line_503(photo, predictor):
    with serving(predictor, max_pending=2) as server:
        slots = server.service.slots
        assert slots.acquire(blocking=False) and slots.acquire(blocking=False)
        try:
            body, ctype = multipart([_png(photo), ("text", "a cat")])
            status, headers, data = request(server.url + "api/predict", body, ctype)
            assert status == 503 and headers["Retry-After"] == "1"
            assert json.loads(data) == {"error": "busy: 2 requests in progress; try again in a moment"}
            assert request(server.url + "api/info")[0] == 200  # other routes are not held up
        finally:
            slots.release()
            slots.release()
        assert post_predict(server.url, [_png(photo), ("text", "a cat")])[0] == 200


def test_uploads_are_decoded_and_run_inside_the_one_model_lock(photo, predictor, monkeypatch):
    """One decoded image and one model run at a time, whatever the number of concurrent uploads."""
    import dmmi.serve

    seen, running, real = [], [], dmmi.serve.decode_image
    with serving(predictor) as server:
        def decode_image(*args, **kwargs):
            seen.append(server.service.lock.locked())
            running.append(1)
            time.sleep(0.05)  # others arrive meanwhile
            assert len(running) == 1, "two model runs at once"
            running.pop()
            return real(*args, **kwargs)

        monkeypatch.setattr(dmmi.serve, "decode_image", decode_image)
        start = threading.Barrier(4)
        body, ctype = multipart([_png(photo), ("text", "a cat")])
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda _: _ask(server.url, body, ctype, start), range(4)))
    assert [a[0] for a in answers] == [200] * 4
    assert seen == [True] * 4


def test_the_pixel_cap_is_configurable_and_decoding_is_the_shared_loader(photo, predictor):
    with api_client(predictor, max_pixels=96 * 60 - 1) as c:
        status, out = client_predict(c, [_png(photo), ("text", "a cat")])
        assert status == 413 and "96x60" in out["error"] and "\n" not in out["error"]
        assert c.get("/api/info").json()["limits"]["pixels"] == 96 * 60 - 1
    grey = np.array([[0, 257, 32768, 65535]], np.uint16)
    assert np.asarray(decode_image(png_bytes(Image.fromarray(grey)), "g16.png"))[0, :, 0].tolist() == [0, 1, 128, 255]
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    photo.save(buf, format="JPEG", exif=exif.tobytes())
    assert decode_image(buf.getvalue(), "phone.jpg").size == (60, 96)  # upright
    with pytest.raises(DmmiError, match="max_pixels"):
        make_server(predictor, "127.0.0.1", 0, max_pixels=0)
    with pytest.raises(DmmiError, match="max_pending"):
        make_server(predictor, "127.0.0.1", 0, max_pending=0)


def test_read_form_keeps_bytes_exactly_in_any_chunking():
    blob = bytes(range(256)) * 4 + b"\r\n\r\n--\r\n" + b"\r" + b"\n"
    body, ctype = multipart([("image", ("a b.png", blob, "image/png")), ("text", "line 1\r\nline 2"),
                             ("text", "caf\u00e9")])

    def read(body: bytes, ctype: str, size: int, limit: int = 10**6):
        chunks = [body[i:i + size] for i in range(0, len(body), size)] or [b""]
        messages = iter([{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
                         for i, c in enumerate(chunks)])

        async def receive():
            return next(messages)

        scope = {"type": "http", "method": "POST", "path": "/api/predict", "headers": [(b"content-type", ctype.encode())]}
        return asyncio.run(read_form(Request(scope, receive), limit))

    for size in (len(body), 7, 1):
        parts = read(body, ctype, size)
        assert [(p.name, p.filename) for p in parts] == [("image", "a b.png"), ("text", None), ("text", None)]
        assert parts[0].data == blob and parts[0].content_type == "image/png"
        assert parts[1].data == b"line 1\r\nline 2" and parts[2].data.decode() == "caf\u00e9"
    with pytest.raises(RequestError, match="boundary"):
        read(body, "multipart/form-data", 100)
    with pytest.raises(RequestError, match="multipart/form-data") as e:
        read(b"a=1", "application/x-www-form-urlencoded", 100)
    assert e.value.status == 415
    with pytest.raises(RequestError, match="cut off"):  # every part whole, the closing boundary missing
        read(body[:body.rindex(b"--" + ctype.split("=")[1].encode())], ctype, 50)
    with pytest.raises(RequestError, match="request too large: more than") as e:  # counted, whatever the header
        read(body, ctype, 100, limit=len(body) - 1)
    assert e.value.status == 413


def test_the_server_binds_where_asked_and_says_so_when_it_cannot(predictor):
    with serving(predictor) as server:
        assert server.server_address[0] == "127.0.0.1"
        port = server.server_address[1]
        with pytest.raises(DmmiError, match=f"cannot listen on 127.0.0.1:{port}: .*try another --port"):
            make_server(predictor, "127.0.0.1", port, ui=False)


# ---------------------------------------------------------------------------- the page


def test_page_is_gradio_offline_and_analytics_off(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/html")
    config = client.get("/config").json()
    assert config["analytics_enabled"] is False and config["title"].startswith("dmmi")
    assert not any(str(s).startswith(("http://", "https://", "//")) for s in config["stylesheets"])
    css = client.get("/theme.css").text
    assert "ui-sans-serif" in css and "googleapis" not in css and "@import" not in css
    labels = {c.get("props", {}).get("label") for c in config["components"]}
    assert {"Image", "Overlays", "Masks (PNG, 255 = referred)", "Try a sample image"} <= labels  # synthetic model
    texts = " ".join(str(c.get("props", {}).get("value")) for c in config["components"])
    assert "zero, one or many" in texts and "dmmi_tiny" in texts


def _page_config(predictor):
    with api_client(predictor, ui=True) as c:
        return c.get("/config").json()


def test_page_domain_note_and_examples_follow_the_model(predictor):
    labels = lambda cfg: {c.get("props", {}).get("label") for c in cfg["components"]}  # noqa: E731
    values = lambda cfg: " ".join(str(c.get("props", {}).get("value")) for c in cfg["components"])  # noqa: E731
    synthetic = _page_config(predictor)  # the tiny model: trained on the synthetic shapes
    assert "synthetic set" in values(synthetic) and "Try a sample image" in labels(synthetic)
    plain = copy.copy(predictor)
    plain.cfg = copy.deepcopy(predictor.cfg)
    plain.cfg.data.dataset = "ref-zom"
    plain.domain_note = None
    cfg = _page_config(plain)
    assert "Try a sample image" not in labels(cfg) and "Example expressions" in labels(cfg)
    assert "synthetic set" not in values(cfg)
    bare = copy.copy(predictor)  # a predictor without the attribute at all still serves
    del bare.domain_note
    assert not hasattr(bare, "domain_note") and Service(bare).domain_note is None


def test_sample_images_are_synthetic_scenes_with_expressions(tmp_path):
    from dmmi.serve_ui import sample_examples

    rows = sample_examples(tmp_path, n=3)
    assert len(rows) == 3
    for path, texts in rows:
        image = Image.open(path)
        assert image.size[0] == image.size[1] and image.mode == "RGB"
        lines = texts.split("\n")
        assert 1 <= len(lines) <= 3 and all(line.strip() for line in lines)


def test_the_page_function_segments_with_the_shared_lock(tiny, predictor, photo, tmp_path, monkeypatch):
    import gradio as gr

    import dmmi.serve
    from dmmi.serve_ui import Segmenter

    service = Service(predictor, quiet=True)
    segment = Segmenter(service, tmp_path / "masks")
    path = tmp_path / "photo.png"
    photo.save(path)
    seen, real = [], dmmi.serve.decode_image
    monkeypatch.setattr(dmmi.serve, "decode_image",
                        lambda *a, **k: seen.append(service.lock.locked()) or real(*a, **k))
    texts = ["the red circle", "a <b>bold</b> | dog"]
    gallery, table, files, status = segment(str(path), "\n".join(texts) + "\n\n")
    assert seen == [True]
    assert status == "2 results for a 96\u00d760 image"
    direct = predictor.predict(photo, texts)
    assert len(gallery) == len(files) == 2
    for (overlay, caption), file, pred in zip(gallery, files, direct):
        assert overlay.size == (96, 60)
        assert caption.startswith(f"\u201c{pred.text}\u201d \u2014 ")
        assert ("no target" in caption) == pred.no_target and f"confidence {pred.score:.2f}" in caption
        assert np.array_equal(np.asarray(Image.open(file)) > 0, pred.mask)
    assert "&lt;b&gt;bold&lt;/b&gt; | dog" in table and "<b>" not in table  # escaped
    with pytest.raises(gr.Error, match="Choose an image first"):
        segment(None, "a cat")
    with pytest.raises(gr.Error, match="empty expression"):
        segment(str(path), "  \n ")
    with pytest.raises(gr.Error, match="too many expressions"):
        segment(str(path), "\n".join(["a cat"] * 17))
    bad = tmp_path / "notes.png"
    bad.write_bytes(b"hello")
    with pytest.raises(gr.Error, match="cannot read 'notes.png'"):
        segment(str(bad), "a cat")
    small = Segmenter(Service(predictor, quiet=True, max_pixels=100), tmp_path / "m2")
    with pytest.raises(gr.Error, match="too large"):
        small(str(path), "a cat")


# ---------------------------------------------------------------------------- CLI and app.py


def test_cli_serve_starts_answers_and_stops(tiny, monkeypatch, capsys):
    import dmmi.serve

    servers, real = [], dmmi.serve.make_server
    monkeypatch.setattr(dmmi.serve, "make_server", lambda *a, **k: servers.append(real(*a, **k)) or servers[-1])
    code = []
    thread = threading.Thread(target=lambda: code.append(cli(["serve", "--checkpoint", str(tiny[0]), "--port", "0",
                                                              "--device", "cpu", "--quiet"])), daemon=True)
    thread.start()
    try:
        for _ in range(1200):
            if (servers and servers[0].started) or not thread.is_alive():
                break
            thread.join(0.05)
        assert servers and servers[0].started, "the server did not start"
        url = servers[0].url
        status, _, data = request(url + "api/info")
        assert status == 200 and json.loads(data)["model"]["preset"] == "dmmi_tiny"
        status, headers, page = request(url)
        assert status == 200 and headers["Content-Type"].startswith("text/html") and b"gradio" in page.lower()
    finally:
        for server in servers:
            server.shutdown()
        thread.join(30)
    assert code == [0]
    out = capsys.readouterr().out
    assert "dmmi_tiny on cpu" in out and f"open {url}" in out and "dmmi serve: stopped" in out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_cli_serve_stops_cleanly_on_a_signal(tiny, sig):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "dmmi.cli", "serve", "--checkpoint", str(tiny[0]), "--port", "0",
                             "--device", "cpu", "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=ROOT)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("open "):
                break
        assert lines and lines[-1].startswith("open http://127.0.0.1:"), (lines, proc.stderr.read())
        url = lines[-1].split()[1]
        for _ in range(100):  # uvicorn accepts once its startup is done
            try:
                if request(url + "api/info")[0] == 200:
                    break
            except OSError:
                time.sleep(0.1)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "dmmi serve: stopped" in out and "Traceback" not in err


def test_cli_serve_errors(tmp_path, capsys):
    missing = str(tmp_path / "missing.pt")
    assert cli(["serve", "--checkpoint", missing]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dmmi: error:") and "\n" not in err
    for option, value, words in [("--port", "70000", "--port"), ("--max-pixels", "0", "--max-pixels must be a whole"),
                                 ("--max-pending", "0", "--max-pending must be >= 1"),
                                 ("--max-mb", "inf", "--max-mb must be a number > 0"),
                                 ("--threshold", "2", "--threshold must be"), ("--min-area", "1", "--min-area must")]:
        assert cli(["serve", "--checkpoint", missing, option, value]) == 2, option
        err = capsys.readouterr().err.strip()
        assert words in err and "\n" not in err, (option, err)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cli_serve_cuda_hint_names_its_own_option(tiny, capsys):
    assert cli(["serve", "--checkpoint", str(tiny[0]), "--device", "cuda", "--port", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no CUDA device" in err and err.endswith("use --device cpu") and "\n" not in err


def test_cli_serve_help_has_every_option_explained_and_examples():
    parser = build_parser()
    serve = next(a for a in parser._actions if a.dest == "command").choices["serve"]
    for action in serve._actions:
        assert action.help, action.option_strings
    assert serve.epilog.startswith("examples:") and "curl -F image=@" in serve.epilog
    text = serve.format_help()
    assert "examples:\n  dmmi serve --model" in text  # the epilog kept as written


def test_the_cli_does_not_import_gradio_or_fastapi():
    code = ("import sys; from dmmi.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('gradio', 'fastapi', 'uvicorn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr


def test_app_py_without_a_model_says_so_in_one_line(tmp_path):
    env = {**os.environ, "DMMI_MODEL": str(tmp_path / "nothing-here")}
    out = subprocess.run([sys.executable, str(ROOT / "app.py")], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=120)
    assert out.returncode == 2 and out.stdout == ""
    err = out.stderr.strip()
    assert "\n" not in err and err.startswith("app.py: no model at") and "DMMI_MODEL" in err
    env.pop("DMMI_MODEL")
    out = subprocess.run([sys.executable, str(ROOT / "app.py")], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=120)  # the default ./model is absent here too
    assert out.returncode == 2 and "no model at 'model'" in out.stderr


def test_space_template_names_app_py_and_the_tested_gradio():
    """space/README.md's front matter is what a Space reads: the SDK, its version, the entry point."""
    import yaml

    text = (ROOT / "space" / "README.md").read_text(encoding="utf-8")
    assert text.startswith("---\n")
    front = yaml.safe_load(text.split("---\n")[1])
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    assert front["sdk"] == "gradio" and front["sdk_version"] == pins["gradio"]  # the version the tests ran
    assert (ROOT / front["app_file"]).is_file() and front["license"] == "mit"
    requirements = (ROOT / "space" / "requirements.txt").read_text().splitlines()
    assert [line for line in requirements if line.startswith("dmmi @ git+")]  # dmmi is not on PyPI


def test_app_py_builds_the_same_server(tiny, monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("dmmi_space_app", ROOT / "app.py")
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    monkeypatch.setenv("DMMI_MODEL", str(tiny[0]))
    assert app.model_source() == str(tiny[0]) and not app.missing(str(tiny[0]))
    assert not app.missing("owner/name") and app.missing("no/such/dir")
    server = app.build(app.model_source(), "127.0.0.1", 0, "cpu")
    try:
        assert server.service.preset == "dmmi_tiny" and server.url.startswith("http://127.0.0.1:")
        paths = {getattr(r, "path", None) for r in server.app.routes}
        assert {"/api/info", "/api/predict"} <= paths and hasattr(server.app.state, "blocks")
    finally:
        server.server_close()
