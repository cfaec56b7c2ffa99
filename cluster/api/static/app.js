// expertmesh chat page: plain JavaScript, no build step, nothing loaded from outside this server.
// It speaks the same OpenAI-compatible API as any other client: GET /v1/models for the model
// card, POST /v1/chat/completions with `stream: true`, read as server-sent events.
"use strict";

const KEY_STORE = "expertmesh.api-key"; // sessionStorage: the key goes away with the tab

const ui = Object.fromEntries(
  [
    "model-info", "new-chat", "settings", "settings-form", "system", "temperature", "top-p",
    "max-tokens", "seed", "key-row", "api-key", "save-key", "status", "log", "composer",
    "attachments", "input", "show-experts", "attach-row", "attach", "stop", "send",
  ].map((id) => [id.replace(/-(.)/g, (_, c) => c.toUpperCase()), document.getElementById(id)]),
);

const state = {
  card: null, // the model card from /v1/models: id, capabilities, num_experts, moe_layers
  needsKey: false, // /v1/models answered 401 without a key
  history: [], // the conversation sent with every request: [{role, content}]
  inflight: null, // {controller, answer} while an answer streams
  images: [], // data URLs attached to the next message (vision models only)
};

// -- talking to the server ----------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message, retryAfterS = null) {
    super(message);
    this.status = status; // null for an error event inside a stream (the status was 200)
    this.retryAfterS = retryAfterS;
  }
}

function apiKey() {
  return sessionStorage.getItem(KEY_STORE) || "";
}

function authHeaders() {
  const key = apiKey();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

// 429 and 503 say when to come back: retry-after-ms is finer than Retry-After's whole seconds.
function retryAfterSeconds(headers) {
  const ms = Number(headers.get("retry-after-ms") ?? NaN);
  if (Number.isFinite(ms)) return ms / 1000;
  const s = Number(headers.get("retry-after") ?? NaN);
  return Number.isFinite(s) ? s : null;
}

// The server words its errors in OpenAI's body, {"error": {"message", "type", "code"}}: show
// that message as it is rather than a generic one.
async function errorOf(res) {
  let message = res.statusText || "the request failed";
  try {
    message = (await res.json())?.error?.message || message;
  } catch {
    // not JSON (a proxy's page, say): keep the status text
  }
  return new ApiError(res.status, message, retryAfterSeconds(res.headers));
}

function describe(err) {
  if (err instanceof TypeError) return `Cannot reach the server: ${err.message}`; // fetch's
  if (!(err instanceof ApiError)) return `Error: ${err.message}`;
  const head = err.status === null ? "Error" : `Error ${err.status}`;
  const retry = err.retryAfterS === null ? "" : ` (retry after ${fmtSeconds(err.retryAfterS)})`;
  return `${head}: ${err.message}${retry}`;
}

// Server-sent events from a fetch body: events end with a blank line; this server puts one
// `data:` line in each, JSON or [DONE].
async function* sseEvents(body) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    const events = buffer.split(/\r?\n\r?\n/);
    buffer = events.pop(); // the last piece is not a whole event yet
    for (const event of events) {
      const data = event
        .split(/\r?\n/)
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).replace(/^ /, ""))
        .join("\n");
      if (data === "[DONE]") return;
      if (data) yield JSON.parse(data);
    }
  }
}

// Does the server want a key? /v1/models answers 401 without one: then show the key field.
async function loadModel() {
  let res = null;
  if (!state.needsKey) {
    res = await fetch("/v1/models");
    state.needsKey = res.status === 401;
    ui.keyRow.hidden = !state.needsKey;
  }
  if (state.needsKey) {
    if (!apiKey()) {
      showModel(null);
      setStatus("This server needs an API key: enter it under Settings.");
      ui.settings.open = true;
      return;
    }
    res = await fetch("/v1/models", { headers: authHeaders() });
  }
  if (!res.ok) throw await errorOf(res);
  state.card = (await res.json()).data?.[0] ?? null;
  showModel(state.card);
  const chat = state.card?.capabilities?.chat !== false;
  setStatus(chat ? "" : "This model has no tokenizer, hence no chat: it serves /v1/completions on token ids.");
}

function showModel(card) {
  const caps = card?.capabilities ?? {};
  ui.attachRow.hidden = !caps.vision; // text-only models: no attach control
  ui.showExperts.disabled = caps.routed_experts === false;
  if (!card) {
    ui.modelInfo.textContent = "model: unknown until the server accepts a key";
    return;
  }
  const moe = card.moe_layers ? `, ${card.moe_layers.length} MoE layers` : "";
  const experts = card.num_experts ? `${card.num_experts} experts, top-${card.top_k}${moe}` : "";
  ui.modelInfo.textContent = experts ? `${card.id} · ${experts}` : card.id;
}

function setStatus(text) {
  ui.status.textContent = text;
  ui.status.hidden = !text;
}

// -- a request ----------------------------------------------------------------------------------

// Empty fields are left out, so the server's own defaults apply.
function samplingFields() {
  const fields = {
    temperature: ui.temperature,
    top_p: ui.topP,
    max_tokens: ui.maxTokens,
    seed: ui.seed,
  };
  const out = {};
  for (const [name, input] of Object.entries(fields)) {
    if (input.value.trim() !== "") out[name] = Number(input.value);
  }
  return out;
}

function requestBody(withExperts) {
  const system = ui.system.value.trim();
  const messages = system ? [{ role: "system", content: system }] : [];
  const body = {
    model: state.card?.id ?? "",
    messages: [...messages, ...state.history],
    stream: true,
    stream_options: { include_usage: true }, // tokens, active parameters, FLOPs
    ...samplingFields(),
  };
  // opt-in per answer: plain chat carries no routing payload
  if (withExperts) body.return_routed_experts = true;
  return body;
}

function userContent(text, images) {
  if (!images.length) return text;
  const parts = text ? [{ type: "text", text }] : [];
  return [...parts, ...images.map((url) => ({ type: "image_url", image_url: { url } }))];
}

async function send() {
  if (state.inflight) return; // one answer at a time
  const text = ui.input.value;
  if (!text.trim() && !state.images.length) return;
  if (!ui.settingsForm.checkValidity()) {
    ui.settings.open = true; // the browser can only point at a field it shows
    ui.settingsForm.reportValidity();
    return;
  }
  const images = state.images;
  // the turn remembers its conversation: New chat may replace it while this answer streams
  const turn = { text, images, history: state.history };
  turn.history.push({ role: "user", content: userContent(text, images) });
  turn.bubble = renderUser(text, images);
  ui.input.value = "";
  setImages([]);
  const withExperts = ui.showExperts.checked && !ui.showExperts.disabled;
  const answer = new AnswerView(ui.log, withExperts ? state.card || {} : null);
  await stream(answer, requestBody(withExperts), turn);
}

async function stream(answer, body, turn) {
  const controller = new AbortController();
  state.inflight = { controller, answer };
  setBusy(true);
  const t0 = performance.now();
  try {
    const res = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json", ...authHeaders() },
      body: JSON.stringify(body),
      signal: controller.signal, // abort closes the stream; the server then ends the request
    });
    if (!res.ok) throw await errorOf(res);
    for await (const chunk of sseEvents(res.body)) {
      // after the 200 status line, the server reports an error as an event of its own
      if (chunk.error) throw new ApiError(null, chunk.error.message);
      answer.take(chunk, performance.now() - t0);
    }
    answer.end("done");
  } catch (err) {
    if (err.name === "AbortError") {
      answer.end("stopped");
    } else {
      answer.fail(describe(err));
      if (err.status === 401) askForKey();
    }
  } finally {
    keepTurn(answer, turn);
    state.inflight = null;
    setBusy(false);
    ui.input.focus();
  }
}

// A finished answer, or one stopped after some text, joins the conversation. A turn that got
// nothing leaves it, and its text goes back into the box to be sent again.
function keepTurn(answer, turn) {
  if (answer.state === "done" || answer.text) {
    turn.history.push({ role: "assistant", content: answer.text });
    return;
  }
  turn.history.pop();
  if (turn.history !== state.history) return; // New chat: that conversation is gone
  turn.bubble.classList.add("unsent");
  turn.bubble.querySelector(".who").textContent = "You (not sent)";
  if (!ui.input.value) ui.input.value = turn.text;
  if (!state.images.length) setImages(turn.images);
}

function askForKey() {
  state.needsKey = true;
  ui.keyRow.hidden = false;
  ui.settings.open = true;
}

function stop() {
  state.inflight?.controller.abort();
}

function newChat() {
  stop();
  state.history = [];
  ui.log.replaceChildren();
  setStatus("");
  ui.input.focus();
}

function setBusy(busy) {
  ui.stop.hidden = !busy;
  ui.send.disabled = busy;
  ui.log.setAttribute("aria-busy", String(busy));
}

// -- the conversation ---------------------------------------------------------------------------

function make(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text; // text only: nothing from the model is HTML
  return node;
}

// Follow the stream only when the reader is at the bottom already.
function appendAndFollow(parent, child) {
  const log = ui.log;
  const atBottom = log.scrollHeight - log.scrollTop - log.clientHeight < 48;
  if (child) parent.append(child);
  if (atBottom) log.scrollTop = log.scrollHeight;
}

function renderUser(text, images) {
  const article = make("article", "msg user");
  article.append(make("h2", "who", "You"), make("div", "content", text));
  for (const url of images) {
    const img = make("img", "thumb");
    img.src = url;
    img.alt = "attached image";
    article.append(img);
  }
  appendAndFollow(ui.log, article);
  return article;
}

class AnswerView {
  // card: the model card when the experts view is on, else null
  constructor(log, card) {
    this.state = "streaming";
    this.text = "";
    this.tokens = 0; // tokens seen with their experts (experts view only)
    this.usage = null;
    this.finishReason = null;
    this.tFirst = null; // ms after the request: first token
    this.tLast = null;
    this.article = make("article", "msg assistant");
    this.article.dataset.state = this.state;
    this.content = make("div", "content");
    this.meta = make("p", "meta", "waiting for the first token…");
    this.error = make("p", "error");
    this.error.setAttribute("role", "alert");
    this.error.hidden = true;
    this.article.append(make("h2", "who", "Assistant"), this.content, this.meta, this.error);
    this.experts = card ? new ExpertsView(this.article, card) : null;
    if (this.experts) tokenKeys(this.content, (span) => this.experts.inspect(span));
    appendAndFollow(log, this.article);
  }

  take(chunk, t) {
    if (chunk.usage) this.usage = chunk.usage;
    for (const choice of chunk.choices ?? []) {
      const text = choice.delta?.content ?? "";
      const routed = choice.routed_experts ?? [];
      if (text || routed.length) {
        this.tFirst ??= t;
        this.tLast = t;
        this.append(text, routed);
      }
      if (choice.finish_reason) this.finishReason = choice.finish_reason;
    }
  }

  append(text, routed) {
    this.text += text;
    if (!this.experts) {
      appendAndFollow(this.content, document.createTextNode(text));
      return;
    }
    // one span per chunk: the server releases a token's text with the token (a character
    // split over tokens comes with the last of them), so a chunk's text is its tokens' text
    appendAndFollow(this.content, tokenSpan(text, this.tokens, routed.length));
    this.tokens += routed.length;
    this.experts.add(routed);
  }

  end(state) {
    this.state = state;
    this.article.dataset.state = state;
    this.meta.textContent = this.summary();
    if (this.experts) this.experts.finish(this.usage);
  }

  fail(message) {
    this.end("error");
    this.error.textContent = message;
    this.error.hidden = false;
  }

  // tokens, time to first token, tokens/s, and why it ended
  summary() {
    const n = this.usage?.completion_tokens ?? (this.experts ? this.tokens : null);
    const parts = [];
    if (n !== null) parts.push(`${n} tokens`);
    if (this.tFirst !== null) parts.push(`first token ${Math.round(this.tFirst)} ms`);
    if (n > 1 && this.tLast > this.tFirst) {
      // the decode rate: tokens after the first over the time they took
      parts.push(`${((n - 1) / ((this.tLast - this.tFirst) / 1000)).toFixed(1)} tokens/s`);
    }
    const why = { stopped: "stopped", error: "failed" }[this.state];
    if (why) parts.push(why);
    else if (this.finishReason === "length") parts.push("cut at max tokens");
    return parts.join(" · ");
  }
}

// A token (or a few, see AnswerView.append) as a focusable span; text-less tokens (the end of
// text) show a mark drawn by CSS, so the answer's text stays exactly what the server sent.
function tokenSpan(text, first, count) {
  const span = make("span", text ? "tok" : "tok mark", text);
  span.dataset.first = String(first);
  span.dataset.count = String(count);
  span.tabIndex = first === 0 ? 0 : -1; // one tab stop; arrow keys move between tokens
  if (!text) span.setAttribute("aria-label", "end of text");
  return span;
}

// Hover or focus shows a token's experts; arrows, Home and End move between tokens.
function tokenKeys(content, inspect) {
  const spans = () => [...content.querySelectorAll(".tok")];
  content.addEventListener("mouseover", (e) => e.target.matches?.(".tok") && inspect(e.target));
  content.addEventListener("focusin", (e) => e.target.matches?.(".tok") && inspect(e.target));
  content.addEventListener("keydown", (e) => {
    const all = spans();
    const i = all.indexOf(e.target);
    const next = { ArrowRight: i + 1, ArrowLeft: i - 1, Home: 0, End: all.length - 1 }[e.key];
    if (i < 0 || next === undefined || !all[next]) return;
    e.preventDefault();
    e.target.tabIndex = -1;
    all[next].tabIndex = 0;
    all[next].focus();
  });
}

// -- the experts view ---------------------------------------------------------------------------

class ExpertsView {
  constructor(article, card) {
    this.moeLayers = card.moe_layers ?? null; // layer indices, in routed_experts' order
    this.numExperts = card.num_experts ?? 0;
    this.routed = []; // per token: [moe layer][k] expert ids
    this.counts = []; // [moe layer][expert]: tokens that expert computed
    this.cells = null;
    this.pending = false;
    const section = make("section", "experts");
    section.setAttribute("aria-label", "Experts of this answer");
    this.stats = make("p", "stats", "");
    // a region of its own: at 400 px wide it scrolls sideways, also from the keyboard
    this.wrap = make("div", "heat-wrap");
    this.wrap.tabIndex = 0;
    this.wrap.setAttribute("role", "region");
    this.wrap.setAttribute("aria-label", "Experts heatmap");
    this.inspector = make("div", "inspector", "Hover or focus a token to see its experts.");
    this.inspector.setAttribute("aria-live", "polite");
    const body = make("div", "experts-body"); // side by side where there is room
    body.append(this.wrap, this.inspector);
    section.append(make("h3", null, "Experts"), this.stats, body);
    article.append(section);
  }

  add(routed) {
    for (const token of routed) {
      this.routed.push(token);
      token.forEach((ids, layer) => {
        this.counts[layer] ??= [];
        for (const e of ids) this.counts[layer][e] = (this.counts[layer][e] ?? 0) + 1;
        this.numExperts = Math.max(this.numExperts, ...ids.map((e) => e + 1));
      });
    }
    // redraw once per frame, not once per token
    if (!this.pending) {
      this.pending = true;
      requestAnimationFrame(() => {
        this.pending = false;
        this.render();
      });
    }
  }

  finish(usage) {
    this.render();
    if (!usage) return;
    const flops = usage.flops ?? {};
    // the exact numbers, for tools and tests; the text below rounds them
    Object.assign(this.stats.dataset, {
      activeParams: usage.active_params_per_token,
      flopsSpent: flops.spent,
      flopsDense: flops.dense_equivalent,
    });
    const share = flops.dense_equivalent ? (100 * flops.spent) / flops.dense_equivalent : null;
    this.stats.textContent = [
      `active parameters per token ${si(usage.active_params_per_token)}`,
      `FLOPs spent ${si(flops.spent)} vs ${si(flops.dense_equivalent)} dense` +
        (share === null ? "" : ` (${share.toFixed(0)}%)`),
    ].join(" · ");
  }

  layerName(i) {
    const layers = this.moeLayers;
    return layers && layers.length === this.counts.length ? `layer ${layers[i]}` : `MoE ${i}`;
  }

  // The table is built once its shape is known (grown if a later token shows more), then only
  // its cells change.
  render() {
    const rows = this.counts.length;
    if (!rows) return;
    if (!this.cells || this.cells.length !== rows || this.cells[0].length !== this.numExperts) {
      this.build(rows, this.numExperts);
    }
    const max = Math.max(1, ...this.counts.flatMap((row) => row.filter(Boolean)));
    this.cells.forEach((row, layer) =>
      row.forEach((td, e) => {
        const n = this.counts[layer][e] ?? 0;
        td.textContent = String(n);
        td.dataset.count = String(n);
        td.style.setProperty("--v", (n / max).toFixed(3));
        td.classList.toggle("hot", n / max > 0.55);
        td.classList.toggle("zero", n === 0);
        td.title = `${this.layerName(layer)}, expert ${e}: ${n} tokens`;
      }),
    );
  }

  build(rows, experts) {
    const table = make("table", "heatmap");
    table.append(make("caption", null, "Tokens each expert computed: MoE layers × experts"));
    const head = make("tr");
    head.append(make("th", "corner", "layer \\ expert"));
    for (let e = 0; e < experts; e++) {
      head.append(Object.assign(make("th", null, e), { scope: "col" }));
    }
    table.append(make("thead"));
    table.tHead.append(head);
    const body = make("tbody");
    this.cells = [];
    for (let layer = 0; layer < rows; layer++) {
      const tr = make("tr");
      tr.append(Object.assign(make("th", null, this.layerName(layer)), { scope: "row" }));
      const row = [];
      for (let e = 0; e < experts; e++) {
        const td = make("td");
        td.dataset.moe = String(layer); // position in each token's routed_experts list
        td.dataset.expert = String(e);
        row.push(td);
        tr.append(td);
      }
      this.cells.push(row);
      body.append(tr);
    }
    table.append(body);
    this.wrap.replaceChildren(table);
  }

  // Show the experts of the token(s) under a span, and outline their cells in the heatmap.
  inspect(span) {
    const first = Number(span.dataset.first);
    const tokens = this.routed.slice(first, first + Number(span.dataset.count));
    const text = span.textContent ? JSON.stringify(span.textContent) : "(end of text)";
    const last = first + tokens.length;
    const which = tokens.length > 1 ? `Tokens ${first + 1}-${last}` : `Token ${first + 1}`;
    const title = make("p", null, `${which} ${text}: experts in each MoE layer`);
    this.inspector.replaceChildren(title, this.routeList(tokens, first));
    for (const td of this.wrap.querySelectorAll("td.hit")) td.classList.remove("hit");
    for (const token of tokens) {
      token.forEach((ids, layer) => {
        for (const e of ids) this.cells?.[layer]?.[e]?.classList.add("hit");
      });
    }
  }

  // layer -> expert ids, for each token (named when there are several)
  routeList(tokens, first) {
    const list = make("dl", "routes");
    tokens.forEach((token, t) =>
      token.forEach((ids, layer) => {
        const prefix = tokens.length > 1 ? `token ${first + t + 1}, ` : "";
        const dd = make("dd", null, ids.join(", "));
        dd.dataset.moe = String(layer);
        dd.dataset.token = String(first + t);
        list.append(make("dt", null, prefix + this.layerName(layer)), dd);
      }),
    );
    return list;
  }
}

// -- numbers ------------------------------------------------------------------------------------

function si(n) {
  if (n === undefined || n === null) return "?";
  const units = [[1e12, "T"], [1e9, "G"], [1e6, "M"], [1e3, "k"]];
  for (const [size, unit] of units) if (n >= size) return `${(n / size).toPrecision(3)} ${unit}`;
  return String(n);
}

function fmtSeconds(s) {
  return s < 10 ? `${s.toFixed(2).replace(/\.?0+$/, "")} s` : `${Math.round(s)} s`;
}

// -- images (shown only when the model card says vision) ----------------------------------------

function readAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

function setImages(urls) {
  state.images = urls;
  ui.attachments.replaceChildren(
    ...urls.map((url, i) => {
      const item = make("span", "attached");
      const img = make("img", "thumb");
      img.src = url;
      img.alt = `attached image ${i + 1}`;
      const remove = make("button", "remove", "×");
      remove.type = "button";
      remove.setAttribute("aria-label", `Remove image ${i + 1}`);
      remove.addEventListener("click", () => setImages(state.images.filter((_, j) => j !== i)));
      item.append(img, remove);
      return item;
    }),
  );
}

// -- wiring -------------------------------------------------------------------------------------

async function saveKey() {
  sessionStorage.setItem(KEY_STORE, ui.apiKey.value.trim());
  try {
    await loadModel();
  } catch (err) {
    setStatus(describe(err)); // a wrong key: the server's 401 message
  }
}

function wire() {
  ui.composer.addEventListener("submit", (e) => {
    e.preventDefault();
    send();
  });
  ui.input.addEventListener("keydown", (e) => {
    // Enter sends, Shift+Enter is a new line; not while an input method composes a character
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      send();
    }
  });
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape" && state.inflight) {
      e.preventDefault();
      stop();
    }
  });
  ui.stop.addEventListener("click", stop);
  ui.newChat.addEventListener("click", newChat);
  ui.saveKey.addEventListener("click", saveKey);
  ui.settingsForm.addEventListener("submit", (e) => e.preventDefault()); // never leave the page
  ui.apiKey.addEventListener("keydown", (e) => {
    if (e.key === "Enter") {
      e.preventDefault();
      saveKey();
    }
  });
  ui.attach.addEventListener("change", async () => {
    const urls = await Promise.all([...ui.attach.files].map(readAsDataURL));
    setImages([...state.images, ...urls]);
    ui.attach.value = "";
  });
}

wire();
ui.apiKey.value = apiKey();
loadModel().catch((err) => setStatus(describe(err)));
ui.input.focus();
