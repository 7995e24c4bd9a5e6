// dllm-jax playground: plain JS, no dependencies, no build step.
//
// Talks to this server's own OpenAI API: GET /v1/models (the model, its family defaults and
// algorithms) and a streamed POST /v1/chat/completions (or /v1/completions) with the opt-in
// extension "stream_trace": true. Each streamed chunk then carries "dllm_trace":
//   {index, start, token_ids, tokens, commit_step, confidence, nfe, gen_length, block_length}
// (the tokens its text covers, each with the forward pass that committed it and that commit's
// confidence), and the usage chunk {"nfe": total}. The canvas is drawn from those.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const KEY_STORE = "dllm-playground-api-key";   // sessionStorage: this tab only
  const KNOBS = ["algorithm", "max_tokens", "block_length", "steps", "threshold", "factor", "temperature", "seed"];
  const INTEGER = new Set(["max_tokens", "block_length", "steps", "seed"]);
  const DEMO_PROMPT = "What is 47+35?";
  const VIRIDIS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];

  const state = {
    card: null,          // /v1/models data[0]
    controller: null,    // AbortController of the running request
    cells: [],           // canvas cells: {el, block, filled, id, text, step, conf}
    blocks: [],          // block elements
    layout: null,        // [gen_length, block_length]
    queue: [],           // animation: groups of cell indices to reveal together
    timer: null,
    drained: null,       // resolve() of the promise waiting for the queue to empty
    run: 0,
  };

  // ---- small helpers -------------------------------------------------------------------------

  function apiKey() { return sessionStorage.getItem(KEY_STORE) || ""; }

  function headers(json) {
    const h = {};
    if (json) h["Content-Type"] = "application/json";
    const key = apiKey();
    if (key) h["Authorization"] = "Bearer " + key;
    return h;
  }

  function setStatus(stateName, text) {
    const el = $("status");
    el.dataset.state = stateName;
    el.textContent = text;
  }

  function clearError() {
    const el = $("error");
    el.hidden = true;
    el.textContent = "";
    for (const name of KNOBS.concat(["prompt", "api-key"])) $(name).removeAttribute("aria-invalid");
  }

  // An OpenAI error body {"error": {message, type, param, code}} (or anything else) as text.
  function showError(status, body, extra) {
    const el = $("error");
    el.textContent = "";
    const err = body && typeof body === "object" && body.error ? body.error : null;
    const title = document.createElement("span");
    title.className = "error-title";
    const kind = err && err.type ? " " + err.type : "";
    const code = err && err.code ? " (" + err.code + ")" : "";
    title.textContent = (status ? "Error " + status : "Error") + kind + code;
    el.appendChild(title);
    const msg = document.createElement("span");
    msg.className = "error-message";
    msg.textContent = err ? String(err.message) : (typeof body === "string" ? body : JSON.stringify(body));
    el.appendChild(msg);
    const notes = [];
    if (err && err.param) notes.push("Field: " + err.param);
    if (extra) notes.push(extra);
    if (notes.length) {
      const n = document.createElement("span");
      n.className = "error-note";
      n.textContent = "\n" + notes.join(" · ");
      el.appendChild(n);
    }
    el.hidden = false;
    if (err && err.param) {
      const field = String(err.param).split(/[.[]/)[0];
      const target = field === "messages" || field === "prompt" ? $("prompt")
        : field === "generation_algorithm" ? $("algorithm") : (KNOBS.includes(field) ? $(field) : null);
      if (target) target.setAttribute("aria-invalid", "true");
    }
    if (status === 401) {
      $("key-box").open = true;
      $("key-box").dataset.needed = "true";
      $("api-key").setAttribute("aria-invalid", "true");
    }
  }

  async function readError(res) {
    const text = await res.text();
    let body = text;
    try { body = JSON.parse(text); } catch (e) { /* not JSON: shown as text */ }
    let extra = null;
    if (res.status === 429) extra = "The server is busy; retry after " + (res.headers.get("Retry-After") || "a few") + " s.";
    if (res.status === 503) extra = "The server is not ready (loading or warming up); try again shortly.";
    if (res.status === 413) extra = "Shorten the prompt or lower max tokens.";
    if (res.status === 401) extra = "Enter the server's API key below (API key).";
    return [body, extra];
  }

  function fmt(x, digits) {
    return Number.isFinite(x) ? x.toFixed(digits) : "–";
  }

  function color(conf) {
    const t = Math.min(1, Math.max(0, Number(conf) || 0)) * (VIRIDIS.length - 1);
    const i = Math.min(VIRIDIS.length - 2, Math.floor(t));
    const f = t - i;
    const c = VIRIDIS[i].map((v, k) => Math.round(v + f * (VIRIDIS[i + 1][k] - v)));
    const luminance = (0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]) / 255;
    return ["rgb(" + c.join(",") + ")", luminance > 0.55 ? "#111" : "#fff"];
  }

  function visible(text) {
    if (text === "") return "∅";
    return text.replace(/ /g, "·").replace(/\n/g, "↵").replace(/\t/g, "⇥").replace(/\r/g, "␍")
      .replace(/[\u0000-\u001f\u007f]/g, (ch) => "\\x" + ch.charCodeAt(0).toString(16).padStart(2, "0"));
  }

  // ---- the model card and its defaults ----------------------------------------------------------

  async function loadModel() {
    let res;
    try {
      res = await fetch("/v1/models", { headers: headers(false) });
    } catch (e) {
      setStatus("error", "Cannot reach the server (" + e.message + "); retrying…");
      setTimeout(loadModel, 2000);
      return;
    }
    if (res.status === 401) {
      const [body, extra] = await readError(res);
      $("model-name").textContent = "(API key needed)";
      showError(401, body, extra);
      setStatus("idle", "This server needs an API key.");
      $("api-key").focus();
      return;
    }
    if (res.status === 503) {
      const [body] = await readError(res);
      const msg = body && body.error ? body.error.message : "not ready";
      setStatus("loading", "Server: " + msg + "; waiting…");
      setTimeout(loadModel, 1000);
      return;
    }
    if (!res.ok) {
      const [body, extra] = await readError(res);
      showError(res.status, body, extra);
      return;
    }
    const list = await res.json();
    const card = list.data && list.data[0];
    if (!card) { showError(null, "the server lists no model"); return; }
    state.card = card;
    clearError();
    if ($("key-box").dataset.needed === "true") $("key-box").open = false;
    $("key-box").dataset.needed = "false";
    $("model-name").textContent = card.id;
    const meta = $("model-meta");
    meta.textContent = "";
    const bits = [card.family, "context " + card.max_model_len];
    if (list.data.length > 1) bits.push("also " + list.data.slice(1).map((c) => c.id).join(", "));
    meta.appendChild(document.createTextNode("(" + bits.join(", ") + ") "));
    if (card.demo) {
      const badge = document.createElement("span");
      badge.className = "demo-badge";
      badge.textContent = "demo model";
      meta.appendChild(badge);
      // The demo model knows two tasks (additions of two numbers 0-99, counting); the default
      // prompt would get a fragment from it, so start from an addition unless the prompt was edited.
      if ($("prompt").value === $("prompt").defaultValue) $("prompt").value = DEMO_PROMPT;
    }
    const select = $("algorithm");
    select.textContent = "";
    for (const [name, description] of Object.entries(card.algorithms || {})) {
      const opt = document.createElement("option");
      opt.value = name;
      opt.textContent = name;
      opt.title = description;
      select.appendChild(opt);
    }
    applyDefaults();
    setStatus("idle", "Ready.");
    $("run").disabled = false;
  }

  function applyDefaults() {
    const d = (state.card && state.card.defaults) || {};
    const value = (v) => (v === null || v === undefined || typeof v === "string" && !/^[\d.]+$/.test(v) ? "" : String(v));
    $("algorithm").value = d.algorithm || $("algorithm").value;
    $("max_tokens").value = value(d.max_tokens);
    $("block_length").value = value(d.block_length);
    $("steps").value = "";   // default: gen_length
    $("threshold").value = value(d.threshold);
    $("factor").value = value(d.factor);
    $("temperature").value = value(d.temperature);
    $("seed").value = "";
  }

  // ---- the request ------------------------------------------------------------------------------

  function knobValue(name) {
    const raw = $(name).value.trim();
    if (raw === "") return undefined;
    if (name === "algorithm") return raw;
    const num = Number(raw);
    // not a number: sent as typed, so the server (the one judge of valid settings) names the field
    return Number.isFinite(num) && /^[-+]?(\d+\.?\d*|\.\d+)(e[-+]?\d+)?$/i.test(raw) ? num : raw;
  }

  function requestBody() {
    const body = {};
    if (state.card) body.model = state.card.id;
    const prompt = $("prompt").value;
    if ($("endpoint").value === "chat") body.messages = [{ role: "user", content: prompt }];
    else body.prompt = prompt;
    for (const name of KNOBS) {
      const v = knobValue(name);
      if (v !== undefined) body[name] = v;
    }
    body.stream = true;
    body.stream_options = { include_usage: true };
    body.stream_trace = true;
    return body;
  }

  function intOr(v, fallback) {
    return Number.isInteger(v) && v > 0 ? v : fallback;
  }

  async function run(event) {
    if (event) event.preventDefault();
    if (state.controller) return;
    clearError();
    const body = requestBody();
    $("request-json").textContent = JSON.stringify(body, null, 2);
    const d = (state.card && state.card.defaults) || {};
    const bl = intOr(body.block_length, intOr(d.block_length, 32));
    const maxTokens = intOr(body.max_tokens, intOr(d.max_tokens, 128));
    buildCanvas(Math.ceil(maxTokens / bl) * bl, bl);
    resetStats();
    const runId = ++state.run;
    const controller = new AbortController();
    state.controller = controller;
    $("run").disabled = true;
    $("stop").disabled = false;
    $("replay").disabled = true;
    setStatus("running", "Running…");
    const t0 = performance.now();
    const result = { text: "", tokens: null, nfe: null, finish: null, firstText: null, error: false };
    const path = $("endpoint").value === "chat" ? "/v1/chat/completions" : "/v1/completions";
    try {
      const res = await fetch(path, { method: "POST", headers: headers(true), body: JSON.stringify(body),
                                      signal: controller.signal });
      if (!res.ok) {
        const [errBody, extra] = await readError(res);
        showError(res.status, errBody, extra);
        result.error = true;
        clearCanvas();
      } else {
        await readStream(res, result, t0);
      }
    } catch (e) {
      if (e.name === "AbortError") {
        result.error = true;
        setStatus("idle", "Stopped.");
      } else {
        showError(null, "Request failed: " + e.message);
        result.error = true;
      }
    }
    const wall = (performance.now() - t0) / 1000;
    await drain();
    if (runId !== state.run) return;
    state.controller = null;
    $("run").disabled = false;
    $("stop").disabled = true;
    markActive();
    if (result.error) {
      if ($("status").textContent !== "Stopped.") setStatus("error", "Failed (see the error above).");
      return;
    }
    finishCanvas();
    const tokens = result.tokens !== null ? result.tokens : state.cells.filter((c) => c.filled).length;
    showStats(tokens, result.nfe, wall, result.firstText, result.finish);
    $("replay").disabled = false;
    setStatus("done", "Done: " + tokens + " tokens, " + (result.nfe === null ? "?" : result.nfe) +
              " forward passes, " + wall.toFixed(2) + " s.");
  }

  // Server-sent events over fetch (EventSource cannot POST): "data: {...}\n\n" ... "data: [DONE]".
  async function readStream(res, result, t0) {
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (value) buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const raw = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of raw.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") return;
          onChunk(JSON.parse(data), result, t0);
        }
      }
      if (done) return;
    }
  }

  function onChunk(chunk, result, t0) {
    if (chunk.error) {  // an error after the stream started (sent in-band)
      const status = { invalid_request_error: 400, rate_limit_error: 429, service_unavailable: 503,
                       server_error: 500 }[chunk.error.type] || null;
      showError(status, chunk);
      result.error = true;
      return;
    }
    const choice = chunk.choices && chunk.choices[0];
    if (choice) {
      const text = choice.delta ? choice.delta.content : choice.text;
      if (text) {
        if (result.firstText === null) result.firstText = (performance.now() - t0) / 1000;
        result.text += text;
        $("output").textContent += text;
      }
      if (choice.finish_reason) result.finish = choice.finish_reason;
    }
    const trace = chunk.dllm_trace;
    if (trace) {
      if (trace.token_ids) onTrace(trace);
      if (typeof trace.nfe === "number") result.nfe = trace.nfe;
    }
    if (chunk.usage) result.tokens = chunk.usage.completion_tokens;
  }

  // ---- the canvas -------------------------------------------------------------------------------

  function buildCanvas(genLength, blockLength) {
    stopAnimation();
    const canvas = $("canvas");
    canvas.textContent = "";
    state.cells = [];
    state.blocks = [];
    state.layout = [genLength, blockLength];
    const nBlocks = Math.ceil(genLength / blockLength);
    for (let b = 0; b < nBlocks; b++) {
      const block = document.createElement("div");
      block.className = "block";
      block.dataset.block = String(b);
      const label = document.createElement("span");
      label.className = "block-label";
      label.textContent = "block " + (b + 1);
      block.appendChild(label);
      const cells = document.createElement("div");
      cells.className = "cells";
      cells.style.setProperty("--cols", String(Math.min(blockLength, 16)));
      for (let j = 0; j < blockLength && b * blockLength + j < genLength; j++) {
        const el = document.createElement("div");
        el.className = "cell masked";
        el.dataset.pos = String(b * blockLength + j);
        cells.appendChild(el);
        state.cells.push({ el, block: b, filled: false, id: null, text: "", step: null, conf: null });
      }
      block.appendChild(cells);
      canvas.appendChild(block);
      state.blocks.push(block);
    }
    markActive();
    canvas.setAttribute("aria-label", "Canvas of " + genLength + " positions in " + nBlocks + " blocks of " +
                        blockLength + ", all masked");
  }

  function clearCanvas() {
    stopAnimation();
    $("canvas").textContent = "";
    state.cells = [];
    state.blocks = [];
    state.layout = null;
    $("canvas").setAttribute("aria-label", "No canvas");
  }

  function onTrace(trace) {
    if (!state.layout || trace.gen_length !== state.layout[0] || trace.block_length !== state.layout[1]) {
      if (!state.cells.some((c) => c.filled) && state.queue.length === 0) {
        buildCanvas(trace.gen_length, trace.block_length);
      }
    }
    const groups = new Map();  // commit step -> cell indices committed at it
    trace.token_ids.forEach((id, k) => {
      const pos = trace.start + k;
      const cell = state.cells[pos];
      if (!cell) return;
      cell.id = id;
      cell.text = trace.tokens ? trace.tokens[k] : String(id);
      cell.step = trace.commit_step[k];
      cell.conf = trace.confidence[k];
      const step = cell.step === undefined ? 0 : cell.step;
      if (!groups.has(step)) groups.set(step, []);
      groups.get(step).push(pos);
    });
    for (const step of [...groups.keys()].sort((a, b) => a - b)) state.queue.push(groups.get(step));
    pump();
  }

  function delay() { return Number($("animate").value) || 0; }

  function pump() {
    if (state.timer !== null) return;
    const tick = () => {
      state.timer = null;
      const group = state.queue.shift();
      if (group) {
        for (const pos of group) fill(pos, true);
        markActive();
      }
      if (state.queue.length) {
        state.timer = setTimeout(tick, delay());
      } else if (state.drained) {
        const done = state.drained;
        state.drained = null;
        done();
      }
    };
    if (delay() === 0) {
      while (state.queue.length) for (const pos of state.queue.shift()) fill(pos, false);
      markActive();
      if (state.drained) { const done = state.drained; state.drained = null; done(); }
      return;
    }
    state.timer = setTimeout(tick, 0);
  }

  function drain() {
    if (!state.queue.length && state.timer === null) return Promise.resolve();
    return new Promise((resolve) => { state.drained = resolve; });
  }

  function stopAnimation() {
    if (state.timer !== null) clearTimeout(state.timer);
    state.timer = null;
    state.queue = [];
    if (state.drained) { const done = state.drained; state.drained = null; done(); }
  }

  function cellLabel(cell) {
    return $("cell-label").value === "step" ? String(cell.step) : visible(cell.text);
  }

  function fill(pos, fresh) {
    const cell = state.cells[pos];
    if (!cell) return;
    cell.filled = true;
    const [bg, ink] = color(cell.conf);
    const el = cell.el;
    el.className = "cell filled" + (fresh ? " fresh" : "");
    el.style.backgroundColor = bg;
    el.style.setProperty("--cell-ink", ink);
    el.textContent = cellLabel(cell);
    el.title = "position " + pos + ": " + JSON.stringify(cell.text) + " (id " + cell.id + ")\ncommitted at forward " +
      cell.step + ", confidence " + fmt(cell.conf, 3);
  }

  function unfill(cell) {
    cell.filled = false;
    cell.el.className = "cell masked";
    cell.el.style.backgroundColor = "";
    cell.el.textContent = "";
    cell.el.removeAttribute("title");
  }

  function markActive() {
    const first = state.cells.find((c) => !c.filled);
    const running = state.controller !== null;
    state.blocks.forEach((b, i) => b.classList.toggle("active", running && first !== undefined && first.block === i));
  }

  function finishCanvas() {
    let filled = 0;
    for (const cell of state.cells) {
      if (cell.filled) filled++;
      else if (cell.id === null) {
        cell.el.className = "cell unused";
        cell.el.title = "not returned (after the end of the text, or past max tokens)";
      }
    }
    markActive();
    if (state.layout) {
      $("canvas").setAttribute("aria-label", "Canvas of " + state.layout[0] + " positions in blocks of " +
                               state.layout[1] + "; " + filled + " tokens returned");
    }
  }

  function replay() {
    if (state.controller || !state.cells.length) return;
    stopAnimation();
    const filled = state.cells.map((c, i) => [c, i]).filter(([c]) => c.filled);
    for (const [c] of filled) unfill(c);
    const groups = new Map();
    for (const [c, i] of filled) {
      if (!groups.has(c.step)) groups.set(c.step, []);
      groups.get(c.step).push(i);
    }
    for (const step of [...groups.keys()].sort((a, b) => a - b)) state.queue.push(groups.get(step));
    pump();
  }

  function relabel() {
    for (const cell of state.cells) if (cell.filled) cell.el.textContent = cellLabel(cell);
  }

  // ---- numbers under the canvas ----------------------------------------------------------------

  function resetStats() {
    $("output").textContent = "";
    for (const id of ["nfe", "tokens", "tpf", "wall", "tps", "ttfc", "finish"]) $("stat-" + id).textContent = "–";
  }

  function showStats(tokens, nfe, wall, firstText, finish) {
    $("stat-nfe").textContent = nfe === null ? "–" : String(nfe);
    $("stat-tokens").textContent = String(tokens);
    $("stat-tpf").textContent = nfe ? fmt(tokens / nfe, 2) : "–";
    $("stat-wall").textContent = fmt(wall, 2) + " s";
    $("stat-tps").textContent = wall > 0 ? fmt(tokens / wall, 1) : "–";
    $("stat-ttfc").textContent = firstText === null ? "–" : fmt(firstText, 2) + " s";
    $("stat-finish").textContent = finish || "–";
  }

  // ---- wiring -----------------------------------------------------------------------------------

  function saveKey() {
    const key = $("api-key").value.trim();
    if (key) sessionStorage.setItem(KEY_STORE, key);
    else sessionStorage.removeItem(KEY_STORE);
    $("api-key").value = "";
    $("key-note").textContent = key ? "Key set for this tab." : "No key set.";
    clearError();
    loadModel();
  }

  function init() {
    $("run").disabled = true;
    $("run-form").addEventListener("submit", run);
    $("prompt").addEventListener("keydown", (e) => {
      if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) run(e);
    });
    document.addEventListener("keydown", (e) => {
      if (e.key === "Escape" && state.controller) state.controller.abort();
    });
    $("stop").addEventListener("click", () => { if (state.controller) state.controller.abort(); });
    $("defaults").addEventListener("click", applyDefaults);
    $("replay").addEventListener("click", replay);
    $("cell-label").addEventListener("change", relabel);
    $("save-key").addEventListener("click", saveKey);
    $("api-key").addEventListener("keydown", (e) => { if (e.key === "Enter") { e.preventDefault(); saveKey(); } });
    $("forget-key").addEventListener("click", () => {
      sessionStorage.removeItem(KEY_STORE);
      $("key-note").textContent = "Key forgotten.";
    });
    if (apiKey()) $("key-note").textContent = "Key set for this tab.";
    setStatus("loading", "Loading the model card…");
    loadModel();
  }

  document.addEventListener("DOMContentLoaded", init);
})();
