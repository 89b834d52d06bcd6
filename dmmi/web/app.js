// dmmi serve: the page's logic. No libraries; talks to /api/info and /api/predict.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const form = $("form"), drop = $("drop"), fileInput = $("file"), preview = $("preview");
  const hint = $("drop-hint"), fileName = $("file-name"), texts = $("texts"), chips = $("chips");
  const button = $("segment"), errorLine = $("error"), status = $("status"), results = $("results");
  let chosen = null;        // the File to send
  let previewUrl = null;

  function showError(message) {
    errorLine.textContent = message;
    errorLine.hidden = !message;
  }

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;  // never innerHTML: expressions are user text
    return node;
  }

  // ---- the image: click, keyboard, drag and drop, paste
  function choose(file) {
    if (!file) return;
    showError("");
    chosen = file;
    fileName.textContent = file.name + " (" + Math.max(1, Math.round(file.size / 1024)) + " KB)";
    if (previewUrl) URL.revokeObjectURL(previewUrl);
    previewUrl = URL.createObjectURL(file);
    preview.onload = () => { preview.hidden = false; hint.hidden = true; drop.classList.add("has-image"); };
    preview.onerror = () => { preview.hidden = true; hint.hidden = false; drop.classList.remove("has-image"); };
    preview.src = previewUrl;
  }

  drop.addEventListener("click", () => fileInput.click());
  drop.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") { e.preventDefault(); fileInput.click(); }
  });
  fileInput.addEventListener("change", () => choose(fileInput.files[0]));
  ["dragenter", "dragover"].forEach((type) => drop.addEventListener(type, (e) => {
    e.preventDefault(); drop.classList.add("over");
  }));
  ["dragleave", "drop"].forEach((type) => drop.addEventListener(type, (e) => {
    e.preventDefault(); drop.classList.remove("over");
  }));
  drop.addEventListener("drop", (e) => choose(e.dataTransfer.files[0]));
  document.addEventListener("paste", (e) => {
    const item = Array.from(e.clipboardData ? e.clipboardData.files : []).find((f) => f.type.startsWith("image/"));
    if (item) choose(item);
  });

  // ---- expressions
  function expressions() {
    return texts.value.split("\n").map((s) => s.trim()).filter((s) => s.length > 0);
  }

  function addExample(text) {
    const current = expressions();
    if (!current.includes(text)) {
      texts.value = current.concat([text]).join("\n");
    }
    texts.focus();
  }

  texts.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); form.requestSubmit(); }
  });

  // ---- results
  function card(result, index) {
    const c = el("article", "card" + (result.no_target ? " none" : ""));
    c.dataset.index = String(index);
    const figure = el("div", "shot");
    const img = el("img", "overlay");
    img.alt = "overlay for: " + result.text;
    img.src = "data:image/png;base64," + result.overlay_png_base64;
    figure.appendChild(img);
    c.appendChild(figure);
    c.appendChild(el("p", "expr", "\u201c" + result.text + "\u201d"));
    const meta = el("div", "meta");
    const badge = result.no_target
      ? el("span", "badge zero", "no target")
      : el("span", "badge hit", "foreground " + (100 * result.foreground).toFixed(1) + "%");
    meta.appendChild(badge);
    const link = el("a", "download", "mask PNG");
    link.href = "data:image/png;base64," + result.mask_png_base64;
    link.download = "mask_" + (index + 1) + "_" + result.text.replace(/[^a-z0-9]+/gi, "_").slice(0, 40) + ".png";
    meta.appendChild(link);
    c.appendChild(meta);
    return c;
  }

  function render(payload) {
    results.replaceChildren(...payload.results.map(card));
  }

  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    showError("");
    const lines = expressions();
    if (!chosen) { showError("Choose an image first: drop one on the box or click it."); return; }
    if (lines.length === 0) {
      showError("Type at least one expression (one per line), e.g. \u201cthe red circle\u201d.");
      texts.focus();
      return;
    }
    const data = new FormData();
    data.append("image", chosen, chosen.name || "image");
    lines.forEach((line) => data.append("text", line));
    button.disabled = true;
    form.classList.add("busy");
    status.textContent = "Segmenting " + lines.length + (lines.length === 1 ? " expression\u2026" : " expressions\u2026");
    const started = performance.now();
    try {
      const response = await fetch("api/predict", { method: "POST", body: data });
      let payload = null;
      try { payload = await response.json(); } catch (_) { payload = null; }
      if (!response.ok) {
        const reason = payload && payload.error ? payload.error : "the server answered " + response.status;
        throw new Error(reason);
      }
      render(payload);
      const seconds = ((performance.now() - started) / 1000).toFixed(1);
      status.textContent = payload.results.length + (payload.results.length === 1 ? " result" : " results") +
        " for a " + payload.image.width + "\u00d7" + payload.image.height + " image in " + seconds + " s";
    } catch (err) {
      status.textContent = "";
      const message = err && err.message ? err.message : String(err);
      showError(message === "Failed to fetch" ? "Cannot reach the server: is `dmmi serve` still running?" : message);
    } finally {
      button.disabled = false;
      form.classList.remove("busy");
    }
  });

  // ---- model info and example chips
  fetch("api/info").then((r) => r.json()).then((info) => {
    const m = info.model;
    $("model").textContent = "model " + m.preset + " \u00b7 " + m.device + " \u00b7 " + m.image_size +
      " px input \u00b7 dmmi (DMMI, ICCV 2023)";
    chips.replaceChildren(...info.examples.map((text) => {
      const chip = el("button", "chip", text);
      chip.type = "button";
      chip.addEventListener("click", () => addExample(text));
      return chip;
    }));
  }).catch(() => { $("model").textContent = "dmmi: cannot reach the server"; });
})();
