"""Hugging Face Space entry point: the ``dmmi serve`` page and JSON API for one model.

    DMMI_MODEL=my-dmmi/ python app.py       # a model directory or a Hub repo id (default ./model)

Environment: ``DMMI_MODEL`` (default ``model``), ``DMMI_DEVICE`` (default ``auto``),
``GRADIO_SERVER_NAME`` / ``GRADIO_SERVER_PORT`` (default 127.0.0.1:7860; Spaces set 0.0.0.0).
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

DEFAULT_MODEL = "model"
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # owner/name


def model_source() -> str:
    return os.environ.get("DMMI_MODEL", "").strip() or DEFAULT_MODEL


def missing(model: str) -> bool:
    """Nothing to load: no such file or folder, and not a Hub repo id either."""
    return not Path(model).exists() and not REPO_ID.match(model)


def build(model: str, host: str = "127.0.0.1", port: int = 7860, device: str = "auto"):
    """The bound, not yet serving, :class:`dmmi.serve.Server` for ``model``."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from dmmi.engine.distributed import resolve_device
    from dmmi.inference import Predictor
    from dmmi.serve import make_server

    predictor = Predictor.load(model, device=resolve_device(device, option="DMMI_DEVICE", fix="DMMI_DEVICE=cpu"))
    return make_server(predictor, host, port)


def main() -> int:
    model = model_source()
    if missing(model):
        print(f"app.py: no model at {model!r}: set DMMI_MODEL to a model directory or a Hub repo id "
              "(make one with: dmmi convert runs/demo/best.pt --out model/)", file=sys.stderr)
        return 2
    from dmmi.errors import DmmiError
    from dmmi.serve import serve

    host = os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1")
    port = os.environ.get("GRADIO_SERVER_PORT", "7860")
    try:
        if not port.isdigit() or int(port) > 65535:
            raise DmmiError(f"GRADIO_SERVER_PORT must be a port number 0-65535, got {port!r}")
        server = build(model, host, int(port), os.environ.get("DMMI_DEVICE", "auto"))
    except DmmiError as e:
        print(f"app.py: error: {e}", file=sys.stderr)
        return 2
    return serve(server, host)


if __name__ == "__main__":
    sys.exit(main())
