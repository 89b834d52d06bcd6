"""The Gradio page of ``dmmi serve``: an image and expressions (one per line) -> overlays,
downloadable masks and, per expression, "no target" or the foreground share and a confidence.

Built by :func:`mount_ui` on the FastAPI app of :mod:`dmmi.serve`, sharing its model lock and
limits. It renders with no network: the theme uses the system's fonts (nothing from Google
Fonts), analytics are off, server-side rendering (Node) is off. A model trained on dmmi's
synthetic shapes gets "try a sample image" examples (a few freshly generated synthetic images in
a temporary folder) and its domain note on the page.
"""

from __future__ import annotations

import atexit
import html
import os
import pickle
import shutil
import tempfile
from collections import deque
from pathlib import Path
from typing import Optional

from dmmi.engine.checkpoint import slug
from dmmi.serve import (GENERIC_EXAMPLES, MAX_EXPRESSIONS, OVERLAY_MAX_SIDE, RequestError, Service, mb,
                        read_expressions)

SANS = ["ui-sans-serif", "system-ui", "-apple-system", "Segoe UI", "Roboto", "Helvetica Neue", "Arial", "sans-serif"]
MONO = ["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "Liberation Mono", "monospace"]
SAMPLES = 4  # synthetic sample images offered
KEEP_RESULTS = 16  # mask folders of the latest runs kept on disk (Gradio copies what it serves into its cache)
CSS = """
#results table { width: 100%; border-collapse: collapse; }
#results th, #results td { text-align: left; padding: 4px 8px; border-bottom: 1px solid var(--border-color-primary); }
#results td.num { font-variant-numeric: tabular-nums; }
#domain-note { color: var(--body-text-color-subdued); }
/* gallery captions wrap instead of ending in an ellipsis ("foregrou...") */
#overlays .caption-label { white-space: normal; overflow: visible; max-width: calc(100% - 2 * var(--block-label-margin)); opacity: 0.9; }
#overlays .caption { white-space: normal; overflow: visible; }
"""


def theme():
    """Gradio's default look with system fonts only: no font is fetched from anywhere."""
    import gradio as gr

    return gr.themes.Default(font=SANS, font_mono=MONO)


def sample_examples(folder: Path, n: int = SAMPLES, seed: int = 11) -> list[list[str]]:
    """``n`` synthetic images written under ``folder`` -> Examples rows [image path, expressions]:
    per image one expression for one object, one for many and one for none (those it has)."""
    from dmmi.data.synthetic import REFS_FILE, generate, ref_type
    from dmmi.inference import SYNTHETIC_SIDE

    generate(folder, n_images=n, seed=seed, image_size=SYNTHETIC_SIDE, min_objects=3, refs_per_image=6)
    refs = pickle.loads((folder / "synthetic" / REFS_FILE).read_bytes())
    rows = []
    for name in sorted({r["file_name"] for r in refs}):
        mine = [r for r in refs if r["file_name"] == name]
        texts = []
        for kind in ("one", "many", "zero"):
            found = [r for r in mine if ref_type(r) == kind]
            if found:
                texts.append(found[0]["sentences"][0]["sent"])
        rows.append([str(folder / "images" / name), "\n".join(texts)])
    return rows


def _caption(pred) -> str:
    score = getattr(pred, "score", None)
    what = "no target" if pred.no_target else f"foreground {100 * pred.foreground:.1f}%"
    return f"\u201c{pred.text}\u201d \u2014 {what}" + ("" if score is None else f" \u00b7 confidence {score:.2f}")


def _table(rows: list[tuple[str, str, str]]) -> str:
    """(expression, result, confidence) rows -> an HTML table, every value escaped."""
    body = "".join(f"<tr><td class='expr'>{html.escape(t)}</td><td class='what'>{html.escape(w)}</td>"
                   f"<td class='num'>{html.escape(c)}</td></tr>" for t, w, c in rows)
    return ("<table><thead><tr><th>expression</th><th>result</th><th>confidence</th></tr></thead>"
            f"<tbody>{body}</tbody></table>")


class Segmenter:
    """The page's one event: (image file, expressions) -> gallery, table, mask files, status line."""

    def __init__(self, service: Service, workdir: Path):
        self.service, self.workdir = service, workdir
        self.recent: deque = deque()
        self.runs = 0

    def __call__(self, image_path: Optional[str], text: Optional[str]):
        import gradio as gr

        if not image_path:
            raise gr.Error("Choose an image first (or click a sample below).", print_exception=False)
        try:
            texts = read_expressions([text or ""])
            data = Path(image_path).read_bytes()
            if len(data) > self.service.max_request_bytes:
                raise RequestError(f"image too large: {mb(len(data))} MB "
                                   f"(at most {mb(self.service.max_request_bytes)} MB)")
            self.runs += 1
            out = self.workdir / f"run{self.runs:06d}"
            out.mkdir(parents=True)
            gallery, rows, files = [], [], []

            def emit(pred, tinted, mask):
                n = len(files)
                path = out / f"{n:02d}_{slug(pred.text)}_mask.png"
                mask.save(path, format="PNG", compress_level=3)
                files.append(str(path))
                gallery.append((tinted, _caption(pred)))
                score = getattr(pred, "score", None)
                rows.append((pred.text, "no target" if pred.no_target else f"foreground {100 * pred.foreground:.1f}%",
                             "" if score is None else f"{score:.2f}"))

            width, height = self.service.segment(data, Path(image_path).name, texts, OVERLAY_MAX_SIDE, emit)
        except RequestError as e:
            raise gr.Error(str(e), print_exception=False) from None
        self._prune(out)
        status = f"{len(rows)} result{'s' if len(rows) != 1 else ''} for a {width}\u00d7{height} image"
        return gallery, _table(rows), files, status

    def _prune(self, latest: Path) -> None:
        self.recent.append(latest)
        while len(self.recent) > KEEP_RESULTS:
            shutil.rmtree(self.recent.popleft(), ignore_errors=True)


def build_blocks(service: Service, workdir: Path):
    """The gr.Blocks of the page (not mounted)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    info = service.info()["model"]
    note = service.domain_note
    segment = Segmenter(service, workdir / "masks")
    with gr.Blocks(title="dmmi \u2014 referring image segmentation", analytics_enabled=False,
                   delete_cache=(3600, 3600)) as blocks:
        gr.Markdown("# dmmi \u2014 referring image segmentation\n"
                    "Type one or more expressions, one per line: each gets the mask of every object it refers "
                    "to \u2014 zero, one or many.", elem_id="intro")
        gr.Markdown(f"Model **{html.escape(info['preset'])}** on {html.escape(info['device'])} "
                    f"({info['image_size']} px input)", elem_id="model")
        if note:
            gr.Markdown(html.escape(note), elem_id="domain-note")
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="filepath", label="Image", sources=["upload", "clipboard"], height=360,
                                 elem_id="image")
                texts = gr.Textbox(label=f"Expressions, one per line (at most {MAX_EXPRESSIONS})", lines=4,
                                   max_lines=MAX_EXPRESSIONS, elem_id="texts",
                                   placeholder="the red circle\nall the blue shapes")
                button = gr.Button("Segment", variant="primary", elem_id="segment")
                if service.synthetic:
                    gr.Examples(sample_examples(workdir / "samples"), inputs=[image, texts],
                                label="Try a sample image", cache_examples=False, elem_id="samples")
                else:
                    gr.Examples([[t] for t in GENERIC_EXAMPLES], inputs=[texts], label="Example expressions",
                                cache_examples=False, elem_id="examples")
            with gr.Column():
                status = gr.Markdown("", elem_id="status")
                gallery = gr.Gallery(label="Overlays", columns=2, format="png", object_fit="contain",
                                     height="auto", elem_id="overlays", interactive=False)
                table = gr.HTML("", elem_id="results")
                masks = gr.File(label="Masks (PNG, 255 = referred)", file_count="multiple", interactive=False,
                                elem_id="masks")
        button.click(segment, [image, texts], [gallery, table, masks, status], api_name="segment",
                     concurrency_limit=1)
    blocks.queue(max_size=service.max_pending, default_concurrency_limit=1)
    return blocks


def mount_ui(app, service: Service, workdir: Optional[Path] = None):
    """Mount the page at ``/`` of the FastAPI ``app``; its files live in ``workdir`` (default: a
    temporary folder removed at exit)."""
    import gradio as gr

    if workdir is None:
        workdir = Path(tempfile.mkdtemp(prefix="dmmi-serve-"))
        atexit.register(shutil.rmtree, workdir, True)
    blocks = build_blocks(service, workdir)
    app.state.blocks = blocks
    return gr.mount_gradio_app(app, blocks, path="/", theme=theme(), css=CSS, footer_links=["gradio", "settings"],
                               run_history=False, max_file_size=service.max_request_bytes, ssr_mode=False,
                               show_error=True)
