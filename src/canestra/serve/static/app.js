// canestra web page: pick or drop an image, POST it to /v1/predict, show family and variety
// ("Apple — Apple Red 2 (93.0 %)") or "Unknown", and draw the top-5 as bars.
// The preview is a local blob: URL; the image only leaves the browser in the request.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const drop = $("drop"), input = $("file"), preview = $("preview");
  const result = $("result"), errorBox = $("error");
  let previewUrl = null;

  function showError(message) {
    result.hidden = true;
    preview.hidden = true;
    errorBox.textContent = message;
    errorBox.hidden = false;
  }

  const pct = (p) => (100 * p).toFixed(1) + "\u00a0%";  // no-break space: "100.0 %" stays on one line

  function render(data) {
    errorBox.hidden = true;
    // "unknown" (with an empty family) = the image resembles no class the model was trained on.
    const unknown = data.prediction === "unknown" && !data.family;
    $("unknown").hidden = !unknown;
    $("answer").hidden = unknown;
    result.classList.toggle("is-unknown", unknown);
    // The family is shown before the variety unless they read the same ("Banana", or a family-level answer).
    const showFamily = !unknown && data.family && data.family !== data.prediction;
    $("family").textContent = showFamily ? data.family : "";
    $("sep").textContent = showFamily ? " — " : "";
    $("prediction").textContent = unknown ? "" : data.prediction;
    $("probability").textContent = unknown ? "" : "(" + pct(data.probability) + ")";
    $("family-line").hidden = !showFamily;
    $("family-line").textContent = showFamily
      ? data.family + " (all its varieties together): " + pct(data.family_probability) : "";
    $("top5-title").textContent = unknown ? "Closest classes the model knows" : "Most likely classes";
    const list = $("top5");
    list.replaceChildren();
    for (const [name, p] of data.top5) {
      const li = document.createElement("li");
      const label = document.createElement("span");
      label.className = "name";
      label.textContent = name;
      label.title = name;
      const track = document.createElement("span");
      track.className = "track";
      const fill = document.createElement("span");
      fill.className = "fill";
      fill.style.display = "block";
      fill.style.width = (100 * p).toFixed(1) + "%";
      track.appendChild(fill);
      const value = document.createElement("span");
      value.className = "pct";
      value.textContent = pct(p);
      li.append(label, track, value);
      list.appendChild(li);
    }
    $("timing").textContent = "model " + data.model_version + " · " + data.timing_ms.toFixed(1) + " ms";
    result.hidden = false;
  }

  async function classify(file) {
    if (!file) return;
    if (previewUrl) URL.revokeObjectURL(previewUrl);
    previewUrl = URL.createObjectURL(file);
    preview.src = previewUrl;
    preview.hidden = false;
    drop.setAttribute("aria-busy", "true");
    const form = new FormData();
    form.append("file", file);
    try {
      const resp = await fetch("/v1/predict", { method: "POST", body: form });
      const data = await resp.json().catch(() => ({}));
      if (!resp.ok) {
        showError(data.detail || ("the service answered " + resp.status));
      } else {
        render(data);
      }
    } catch (e) {
      showError("cannot reach the service: " + e.message);
    } finally {
      drop.removeAttribute("aria-busy");
    }
  }

  input.addEventListener("change", () => classify(input.files[0]));
  for (const ev of ["dragenter", "dragover"]) {
    drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.add("over"); });
  }
  for (const ev of ["dragleave", "drop"]) {
    drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.remove("over"); });
  }
  drop.addEventListener("drop", (e) => {
    const file = e.dataTransfer && e.dataTransfer.files[0];
    classify(file);
  });
  // Dropping a file anywhere else must not make the browser navigate away to it.
  window.addEventListener("dragover", (e) => e.preventDefault());
  window.addEventListener("drop", (e) => e.preventDefault());

  fetch("/v1/model").then((r) => r.ok ? r.json() : null).then((m) => {
    if (!m) return;
    const families = (m.families || []).length;
    $("model-info").textContent = m.classes.length + " classes" + (families ? " in " + families + " families" : "")
      + " · model " + m.model_version;
  }).catch(() => {});
})();
