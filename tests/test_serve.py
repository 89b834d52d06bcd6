"""`dmmi serve`: the JSON API, the page and the CLI, against a tiny trained checkpoint."""

import base64
import io
import json
import os
import struct
import threading
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

from dmmi.cli import main as cli
from dmmi.config import load_config
from dmmi.data.synthetic import generate
from dmmi.engine.train import train
from dmmi.errors import DmmiError
from dmmi.inference import Predictor
from dmmi.serve import LISTEN_BACKLOG, RequestError, decode_image, make_server, parse_multipart

pytestmark = pytest.mark.timeout(120)


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
    """The server on a free localhost port, in a thread; yields the server (``.url``, ``.app``)."""
    server = make_server(predictor, "127.0.0.1", 0, quiet=True, **kwargs)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
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


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def multipart(fields: list) -> tuple[bytes, str]:
    """[(name, str) or (name, (filename, bytes, content type))] -> (body, Content-Type)."""
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
    """-> (status, headers, body bytes), 4xx/5xx included."""
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


def decode_png(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def predictor(tiny):
    return Predictor.load(tiny[0], device="cpu")


@pytest.fixture(scope="module")
def base(predictor):
    with running_server(predictor) as url:
        yield url


@pytest.fixture(scope="module")
def photo(tiny):
    """A non-square RGB image (96 x 60), so width and height cannot be swapped unnoticed."""
    return Image.open(tiny[1]).convert("RGB").resize((96, 60))


# ---------------------------------------------------------------------------- API


def test_info(base):
    status, headers, data = request(base + "api/info")
    assert status == 200 and headers["Content-Type"] == "application/json"
    info = json.loads(data)
    assert info["model"] == {"preset": "dmmi_tiny", "image_size": 64, "device": "cpu"}
    assert info["examples"] and all(isinstance(t, str) and t for t in info["examples"])
    assert info["limits"]["request_mb"] > 0


def test_predict(base, photo, predictor):
    texts = ["the red circle", "all the shapes\n\n  the   blue star  ", "a purple dog"]
    status, out = post_predict(base, [("image", ("photo.png", png_bytes(photo), "image/png"))]
                               + [("text", t) for t in texts])
    assert status == 200, out
    assert out["image"] == {"width": 96, "height": 60}
    assert out["model"] == {"preset": "dmmi_tiny"}
    expected = ["the red circle", "all the shapes", "the blue star", "a purple dog"]  # lines, in order
    assert [r["text"] for r in out["results"]] == expected
    direct = predictor.predict(photo, expected)
    for result, pred in zip(out["results"], direct):
        assert set(result) == {"text", "no_target", "foreground", "overlay_png_base64", "mask_png_base64"}
        mask = decode_png(result["mask_png_base64"])
        assert mask.size == (96, 60) and mask.mode == "L"
        arr = np.asarray(mask)
        assert set(np.unique(arr)) <= {0, 255}
        assert np.array_equal(arr > 0, pred.mask)  # the same model, the same answer
        assert result["no_target"] == (not arr.any())
        assert result["foreground"] == pytest.approx((arr > 0).mean(), abs=1e-5)
        overlay = decode_png(result["overlay_png_base64"])
        assert overlay.size == (96, 60) and overlay.mode == "RGB"
        if result["no_target"]:
            assert np.array_equal(np.asarray(overlay), np.asarray(photo))


def test_predict_jpeg_and_concurrent_requests(base, photo):
    buf = io.BytesIO()
    photo.save(buf, format="JPEG", quality=90)
    fields = [("image", ("p.jpg", buf.getvalue(), "image/jpeg")), ("text", "the red circle")]
    answers = [None] * 3

    def ask(i):
        answers[i] = post_predict(base, fields)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(a is not None and a[0] == 200 for a in answers)
    masks = [a[1]["results"][0]["mask_png_base64"] for a in answers]
    assert masks[0] == masks[1] == masks[2]  # one model call at a time, deterministic


def test_predict_in_chunks_with_small_overlays(photo, predictor):
    texts = ["the red circle", "all the shapes", "the blue star"]
    fields = [("image", ("p.png", png_bytes(photo), "image/png")), ("overlay_max_side", "48")]
    fields += [("text", t) for t in texts]
    chunked = Predictor(predictor.model, predictor.cfg, device="cpu", tokenizer=predictor.tokenizer,
                        expressions_per_call=2)  # two expressions per model call
    with running_server(chunked) as url:
        status, out = post_predict(url, fields)
    assert status == 200, out
    assert [r["text"] for r in out["results"]] == texts
    for result, pred in zip(out["results"], predictor.predict(photo, texts)):
        assert np.array_equal(np.asarray(decode_png(result["mask_png_base64"])) > 0, pred.mask)  # full size
        assert decode_png(result["overlay_png_base64"]).size == (48, 30)  # shown downscaled


def _png(photo):
    return ("image", ("photo.png", png_bytes(photo), "image/png"))


def header_only_png(width: int, height: int) -> bytes:
    """A PNG whose header says width x height, with no pixel data to speak of."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


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
     "unknown form field(s) 'overlay_max_sid'"),
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
     "too many expressions"),
])
def test_bad_input_is_a_one_line_4xx(base, photo, case, fields, status, words):
    got, out = post_predict(base, fields(photo))
    assert got == status, (case, out)
    assert set(out) == {"error"} and words in out["error"], (case, out)
    assert "\n" not in out["error"] and "Traceback" not in out["error"]


def test_bad_requests(base, predictor):
    status, _, data = request(base + "api/predict", b'{"text": "a cat"}', "application/json")
    assert status == 415 and "multipart/form-data" in json.loads(data)["error"]
    status, _, data = request(base + "api/predict", b"--x\r\nno closing", "multipart/form-data; boundary=x")
    assert status == 400 and "malformed multipart" in json.loads(data)["error"]
    status, _, data = request(base + "api/predict")
    assert status == 405
    status, _, data = request(base + "api/other", b"", "text/plain")
    assert status == 404
    with running_server(predictor, max_request_mb=0.01) as small:
        body, ctype = multipart([("image", ("big.bin", os.urandom(20_000), "image/png")), ("text", "a cat")])
        status, _, data = request(small + "api/predict", body, ctype)
        assert status == 413 and "request too large" in json.loads(data)["error"]


def test_a_bug_is_a_one_line_500(photo, capsys):
    class Broken:
        cfg, size, device = type("Cfg", (), {"preset": "broken"})(), 64, "cpu"

        def predict(self, image, texts):
            raise RuntimeError("boom\nsecond line")

    with running_server(Broken()) as url:
        status, out = post_predict(url, [_png(photo), ("text", "a cat")])
        assert status == 500 and out == {"error": "internal error: RuntimeError: boom second line"}
        assert request(url + "api/info")[0] == 200  # still serving
    assert "Traceback" in capsys.readouterr().err  # the details stay on the console


def _ask(url: str, body: bytes, ctype: str, start: threading.Barrier):
    """POST at the same moment as the others -> (status, error text) or the exception's name."""
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
    """Python's default listen backlog of 5 reset most of such a burst (23 of 40 here)."""
    body, ctype = multipart([_png(photo), ("text", "the red circle")])
    expected = predictor.predict(photo, "the red circle").mask
    with serving(predictor) as server:
        start = threading.Barrier(40)
        with ThreadPoolExecutor(40) as pool:
            answers = list(pool.map(lambda _: _ask(server.url, body, ctype, start), range(40)))
        backlog = server.request_queue_size
    statuses = [a[0] for a in answers]
    assert all(s == 200 or s == 503 or (isinstance(s, int) and 400 <= s < 500) for s in statuses), statuses
    assert statuses.count(200) >= 8, statuses  # admitted ones are served (max_pending 32; the rest may be 503)
    for status, retry, payload in answers:
        if status == 200:
            assert np.array_equal(np.asarray(decode_png(payload["results"][0]["mask_png_base64"])) > 0, expected)
        else:
            assert retry == "1" and set(payload) == {"error"} and payload["error"].startswith("busy:")
    assert backlog == LISTEN_BACKLOG >= 128


def test_when_every_slot_is_taken_a_request_gets_a_one_line_503(photo, predictor):
    with serving(predictor, max_pending=2) as server:
        assert server.app.slots.acquire(blocking=False) and server.app.slots.acquire(blocking=False)
        try:
            body, ctype = multipart([_png(photo), ("text", "a cat")])
            status, headers, data = request(server.url + "api/predict", body, ctype)
            assert status == 503 and headers["Retry-After"] == "1"
            assert json.loads(data) == {"error": "busy: 2 requests in progress; try again in a moment"}
            assert request(server.url + "api/info")[0] == 200  # pages are not held up
        finally:
            server.app.slots.release()
            server.app.slots.release()
        assert post_predict(server.url, [_png(photo), ("text", "a cat")])[0] == 200


def test_uploads_are_decoded_inside_the_model_lock(photo, predictor, monkeypatch):
    """One decoded image at a time, whatever the number of concurrent uploads."""
    import dmmi.serve

    seen, real = [], dmmi.serve.decode_image
    with serving(predictor) as server:
        def decode_image(*args, **kwargs):
            seen.append(server.app.lock.locked())
            return real(*args, **kwargs)

        monkeypatch.setattr(dmmi.serve, "decode_image", decode_image)
        start = threading.Barrier(4)
        body, ctype = multipart([_png(photo), ("text", "a cat")])
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda _: _ask(server.url, body, ctype, start), range(4)))
    assert [a[0] for a in answers] == [200] * 4
    assert seen == [True] * 4


def test_the_pixel_cap_is_configurable_and_decoding_is_the_shared_loader(photo, predictor):
    with running_server(predictor, max_pixels=96 * 60 - 1) as url:
        status, out = post_predict(url, [_png(photo), ("text", "a cat")])
        assert status == 413 and "96x60" in out["error"] and "\n" not in out["error"]
        assert json.loads(request(url + "api/info")[2])["limits"]["pixels"] == 96 * 60 - 1
    grey = np.array([[0, 257, 32768, 65535]], np.uint16)
    assert np.asarray(decode_image(png_bytes(Image.fromarray(grey)), "g16.png"))[0, :, 0].tolist() == [0, 1, 128, 255]
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    photo.save(buf, format="JPEG", exif=exif.tobytes())
    assert decode_image(buf.getvalue(), "phone.jpg").size == (60, 96)  # upright
    with pytest.raises(DmmiError, match="max_pixels"):
        make_server(predictor, "127.0.0.1", 0, max_pixels=0)


def test_multipart_keeps_bytes_exactly():
    blob = bytes(range(256)) * 4 + b"\r\n\r\n--\r\n" + b"\r" + b"\n"
    body, ctype = multipart([("image", ("a b.png", blob, "image/png")), ("text", "line 1\r\nline 2"),
                             ("text", "caf\u00e9")])
    parts = parse_multipart(body, ctype)
    assert [(p.name, p.filename) for p in parts] == [("image", "a b.png"), ("text", None), ("text", None)]
    assert parts[0].data == blob and parts[0].content_type == "image/png"
    assert parts[1].data == b"line 1\r\nline 2" and parts[2].data.decode() == "caf\u00e9"
    with pytest.raises(RequestError, match="boundary"):
        parse_multipart(body, "multipart/form-data")


# ---------------------------------------------------------------------------- page


def test_page_and_static_files(base):
    status, headers, page = request(base)
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    html = page.decode()
    assert "<title>" in html and 'src="app.js"' in html and 'href="style.css"' in html
    assert "http://" not in html and "https://" not in html  # offline: nothing from a CDN
    for name, kind in [("app.js", "text/javascript"), ("style.css", "text/css")]:
        status, headers, data = request(base + name)
        assert status == 200 and headers["Content-Type"].startswith(kind) and data
        assert b"http://" not in data and b"https://" not in data
    for bad in ["nothing.js", "../serve.py", "%2e%2e/serve.py", "web/index.html", ".hidden"]:
        assert request(base + bad)[0] == 404, bad
    status, headers, body = request(base, method="HEAD")
    assert status == 200 and body == b"" and int(headers["Content-Length"]) == len(page)


# ---------------------------------------------------------------------------- CLI


def test_cli_serve_starts_answers_and_stops(tiny, monkeypatch, capsys):
    import dmmi.serve

    servers, real = [], dmmi.serve.make_server
    monkeypatch.setattr(dmmi.serve, "make_server", lambda *a, **k: servers.append(real(*a, **k)) or servers[-1])
    code = []
    thread = threading.Thread(target=lambda: code.append(cli(["serve", "--checkpoint", str(tiny[0]), "--port", "0",
                                                              "--device", "cpu"])), daemon=True)
    thread.start()
    try:
        for _ in range(600):
            if servers or not thread.is_alive():
                break
            thread.join(0.05)
        assert servers, "the server did not start"
        url = servers[0].url
        status, _, data = request(url + "api/info")
        assert status == 200 and json.loads(data)["model"]["preset"] == "dmmi_tiny"
    finally:
        for server in servers:
            server.shutdown()
        thread.join(30)
    assert code == [0]
    out = capsys.readouterr().out
    assert "dmmi_tiny on cpu" in out and f"open {url}" in out


def test_cli_serve_errors(tmp_path, capsys):
    assert cli(["serve", "--checkpoint", str(tmp_path / "missing.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dmmi: error:") and "\n" not in err
    assert cli(["serve", "--checkpoint", str(tmp_path / "missing.pt"), "--port", "70000"]) == 2
    assert "--port" in capsys.readouterr().err
    assert cli(["serve", "--checkpoint", str(tmp_path / "missing.pt"), "--max-pixels", "0"]) == 2
    assert "--max-pixels must be a whole number" in capsys.readouterr().err
    assert cli(["serve", "--checkpoint", str(tmp_path / "missing.pt"), "--max-pending", "0"]) == 2
    assert "--max-pending must be >= 1" in capsys.readouterr().err
    assert cli(["serve", "--checkpoint", str(tmp_path / "missing.pt"), "--max-mb", "inf"]) == 2
    assert "--max-mb must be a number > 0" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cli_serve_cuda_hint_names_its_own_option(tiny, capsys):
    assert cli(["serve", "--checkpoint", str(tiny[0]), "--device", "cuda", "--port", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no CUDA device" in err and err.endswith("use --device cpu") and "\n" not in err
