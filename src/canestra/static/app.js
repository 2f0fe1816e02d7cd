// canestra web page: pick or drop an image, POST it to /v1/predict, draw the top-5 as bars.
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

  function render(data) {
    errorBox.hidden = true;
    $("prediction").textContent = data.prediction;
    $("probability").textContent = (100 * data.probability).toFixed(1) + "%";
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
      const pct = document.createElement("span");
      pct.className = "pct";
      pct.textContent = (100 * p).toFixed(1) + "%";
      li.append(label, track, pct);
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
    if (m) $("model-info").textContent = m.classes.length + " classes · model " + m.model_version;
  }).catch(() => {});
})();
