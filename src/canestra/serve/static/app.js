// canestra web page: pick or drop an image, POST it to /v1/predict, show family and variety
// ("Apple — Apple Red 2 (93.0 %)") or "Unknown", and draw the top-5 as bars.
// The preview is a local blob: URL; the image only leaves the browser in the request.
// A service started with --feedback-dir (GET /v1/model says "feedback": true) also shows "Wrong? Tell us":
// the right answer and a consent box whose text comes from the service; nothing is sent without it.
// A service started with --api-keys-file answers 401 without a key: the page then shows a key
// field; the key is kept in sessionStorage (this tab only, gone when it closes) and sent as a Bearer token.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const drop = $("drop"), input = $("file"), preview = $("preview");
  const result = $("result"), errorBox = $("error");
  const keyForm = $("key-form"), keyInput = $("api-key");
  const KEY = "canestra-api-key";
  let previewUrl = null, lastFile = null, needsKey = false;
  let feedbackOn = false, lastImageId = null;

  const storedKey = () => sessionStorage.getItem(KEY) || "";
  const authHeaders = () => (storedKey() ? { Authorization: "Bearer " + storedKey() } : {});

  function askForKey() {
    keyForm.hidden = false;
    keyInput.value = storedKey();
  }

  // Plain words for the refusals that are about access, not about the image.
  function accessProblem(resp) {
    if (resp.status === 401) {
      needsKey = true;
      askForKey();
      return storedKey() ? "The API key was not accepted: check it and enter it again above."
        : "This service needs an API key: enter it above.";
    }
    if (resp.status === 429) {
      const wait = resp.headers.get("Retry-After") || "a few";
      return "Too many requests from this device: wait " + wait + " s and try again.";
    }
    return null;
  }

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
    lastImageId = data.image_id;
    $("feedback").hidden = !feedbackOn;
    $("feedback").open = false;
    $("feedback-form").reset();
    $("feedback-note").textContent = "";
    result.hidden = false;
  }

  // The corrections a service takes (GET /v1/feedback): its consent text and the labels it knows.
  function loadFeedbackInfo() {
    fetch("/v1/feedback", { headers: authHeaders() }).then((r) => (r.ok ? r.json() : null)).then((info) => {
      feedbackOn = !!info;
      if (!info) return;
      $("feedback-consent-text").textContent = info.consent_text;
      const list = $("feedback-labels");
      list.replaceChildren();
      for (const name of [...info.families, ...info.varieties]) {
        const option = document.createElement("option");
        option.value = name;
        list.appendChild(option);
      }
      $("privacy-note").textContent = "Images are processed in memory and not stored, unless you send a "
        + "correction and agree to it being kept.";
    }).catch(() => {});
  }

  async function sendFeedback(withFile) {
    const form = new FormData();
    form.append("label", $("feedback-label").value.trim());
    form.append("consent", $("feedback-consent").checked ? "true" : "false");
    if (withFile) form.append("file", lastFile); else form.append("image_id", lastImageId);
    return fetch("/v1/feedback", { method: "POST", body: form, headers: authHeaders() });
  }

  $("feedback-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const note = $("feedback-note");
    if (!$("feedback-consent").checked) {
      note.textContent = "Tick the box first: nothing is sent without your consent.";
      return;
    }
    try {
      // The id of the photo just classified; a worker that did not score it answers 404: send the photo.
      let resp = await sendFeedback(false);
      if (resp.status === 404 && lastFile) resp = await sendFeedback(true);
      const data = await resp.json().catch(() => ({}));
      note.textContent = resp.ok ? "Thank you: stored as " + data.label + "."
        : (accessProblem(resp) || data.detail || ("the service answered " + resp.status));
    } catch (err) {
      note.textContent = "cannot reach the service: " + err.message;
    }
  });

  async function classify(file) {
    if (!file) return;
    lastFile = file;
    if (previewUrl) URL.revokeObjectURL(previewUrl);
    previewUrl = URL.createObjectURL(file);
    preview.src = previewUrl;
    preview.hidden = false;
    drop.setAttribute("aria-busy", "true");
    const form = new FormData();
    form.append("file", file);
    try {
      const resp = await fetch("/v1/predict", { method: "POST", body: form, headers: authHeaders() });
      const data = await resp.json().catch(() => ({}));
      if (!resp.ok) {
        showError(accessProblem(resp) || data.detail || ("the service answered " + resp.status));
      } else {
        needsKey = false;
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

  function loadModelInfo() {
    fetch("/v1/model", { headers: authHeaders() }).then((r) => {
      if (r.status === 401) {
        needsKey = true;
        askForKey();
      }
      return r.ok ? r.json() : null;
    }).then((m) => {
      if (!m) return;
      if (m.feedback) loadFeedbackInfo();  // this service takes corrections: show "Wrong? Tell us"
      const families = (m.families || []).length;
      $("model-info").textContent = m.classes.length + " classes" + (families ? " in " + families + " families" : "")
        + " · model " + m.model_version;
    }).catch(() => {});
  }

  keyForm.addEventListener("submit", (e) => {
    e.preventDefault();
    const key = keyInput.value.trim();
    if (key) sessionStorage.setItem(KEY, key); else sessionStorage.removeItem(KEY);
    errorBox.hidden = true;
    loadModelInfo();
    if (needsKey && lastFile) classify(lastFile);  // the image refused for want of a key: send it again
  });

  if (storedKey()) askForKey();
  loadModelInfo();
})();
