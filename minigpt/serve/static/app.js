// The playground: sampling through /v1/completions (streamed, with the top-10 log-probabilities
// of every token) and the inside view through /v1/inspect. Plain JavaScript, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const TOP = 10;
let modelName = null;
let controller = null;     // the running generation's AbortController
let shownText = "";        // the text the model saw: prompt (as echoed) + completion so far
let view = null;           // the last inside view

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api_key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function apiError(response) {
  try {
    const body = await response.json();
    return body.error ? body.error.message : JSON.stringify(body);
  } catch (e) {
    return `the server answered ${response.status} ${response.statusText}`;
  }
}

async function post(path, body, signal) {
  let response;
  try {
    response = await fetch(path, { method: "POST", headers: headers(), body: JSON.stringify(body), signal });
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new Error("the server is not answering (did `minigpt serve` stop?)");
  }
  if (!response.ok) throw new Error(await apiError(response));
  return response;
}

function numberOrNull(id) {
  const v = $(id).value.trim();
  return v === "" ? null : Number(v);
}

let rawNext = false;      // the next prompt is a continuation that already holds the model's bos/separator

function settings() {
  const body = {
    model: modelName, prompt: $("prompt").value, stream: true, echo: true, logprobs: TOP,
    apply_defaults: !rawNext,
    temperature: numberOrNull("temperature") ?? 1, top_p: numberOrNull("top_p") ?? 1,
    max_tokens: numberOrNull("max_tokens") ?? 64,
  };
  const topK = numberOrNull("top_k");
  if (topK !== null) body.top_k = topK;
  const seed = numberOrNull("seed");
  if (seed !== null) body.seed = seed;
  const stop = $("stop").value;
  if (stop) body.stop = stop.replace(/\\n/g, "\n");
  return body;
}

// A probability as a colour: red (unlikely) through yellow to green (likely).
function colour(p) {
  return `hsl(${Math.round(120 * p)}, 75%, 82%)`;
}

function tokenSpan(text, logprob, top, isPrompt) {
  const span = document.createElement("span");
  span.className = isPrompt ? "token prompt-token" : "token generated";
  span.textContent = text;
  if (logprob !== null && logprob !== undefined) {
    const p = Math.exp(logprob);
    span.dataset.prob = p.toFixed(6);
    if (!isPrompt) span.style.background = colour(p);
  }
  if (top) span.dataset.top = JSON.stringify(top);
  return span;
}

async function generate() {
  showError("");
  if (controller) controller.abort();
  const mine = new AbortController();  // this run's: an older run that ends later must not touch the page
  controller = mine;
  const body = settings();
  rawNext = false;
  const out = $("output");
  out.textContent = "";
  shownText = "";
  $("generate").disabled = true;
  $("stop-button").disabled = false;
  let text = "";           // the completion's text, as the server cuts it (stop strings)
  try {
    const response = await post("/v1/completions", body, mine.signal);
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    let first = true;
    for (;;) {
      const { value, done } = await reader.read();
      if (done || controller !== mine) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        if (!event.startsWith("data: ")) continue;
        const data = event.slice(6);
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) { showError(chunk.error.message); continue; }
        for (const choice of chunk.choices) {
          const lp = choice.logprobs;
          if (first && lp) {  // the echoed prompt comes first
            first = false;
            lp.tokens.forEach((t, i) => out.appendChild(tokenSpan(t, lp.token_logprobs[i], lp.top_logprobs[i], true)));
            shownText += choice.text;
            continue;
          }
          first = false;
          text += choice.text;
          if (lp) lp.tokens.forEach((t, i) => out.appendChild(tokenSpan(t, lp.token_logprobs[i], lp.top_logprobs[i], false)));
        }
      }
    }
    if (controller === mine) {
      trimToText(text);
      shownText += text;
      inspect();  // the inside view follows the text
    }
  } catch (e) {
    if (controller === mine) {
      if (e.name !== "AbortError") showError(e.message);
      trimToText(text);
      shownText += text;
    }
  } finally {
    if (controller === mine) {
      controller = null;
      $("generate").disabled = false;
      $("stop-button").disabled = true;
    }
  }
}

// The token that completed a stop string, or end-of-text, comes with its log-probabilities but
// is not in the text: drop the spans past the text (an end-of-text span has no text at all).
function trimToText(text) {
  let offset = 0;
  for (const span of Array.from(document.querySelectorAll("#output .generated"))) {
    if (offset >= text.length) span.remove();
    else offset += span.textContent.length;
  }
}

function hidePopover() { $("popover").hidden = true; }

function showPopover(span) {
  if (!span.dataset.top) return;
  const top = Object.entries(JSON.parse(span.dataset.top)).sort((a, b) => b[1] - a[1]);
  const box = $("popover");
  box.textContent = "";
  const title = document.createElement("div");
  title.className = "popover-title";
  title.textContent = span.dataset.prob ? `chosen: ${(100 * Number(span.dataset.prob)).toFixed(1)}%` : "";
  box.appendChild(title);
  const list = document.createElement("ol");
  for (const [token, logprob] of top) {
    const item = document.createElement("li");
    item.className = "alternative";
    item.dataset.token = token;
    item.dataset.prob = Math.exp(logprob).toFixed(6);
    const name = document.createElement("code");
    name.textContent = JSON.stringify(token);
    item.appendChild(name);
    item.appendChild(document.createTextNode(` ${(100 * Math.exp(logprob)).toFixed(1)}%`));
    if (span.classList.contains("generated")) {
      item.title = "continue from this token";
      item.addEventListener("click", () => continueWith(span, token));
    }
    list.appendChild(item);
  }
  box.appendChild(list);
  const r = span.getBoundingClientRect();
  box.style.left = `${window.scrollX + r.left}px`;
  box.style.top = `${window.scrollY + r.bottom + 4}px`;
  box.hidden = false;
  box.dataset.for = Array.from(document.querySelectorAll("#output .token")).indexOf(span);
}

// The prompt becomes everything before `span` plus the chosen token, and generation goes on.
function continueWith(span, token) {
  let before = "";
  for (const s of document.querySelectorAll("#output .token")) {
    if (s === span) break;
    before += s.textContent;
  }
  $("prompt").value = before + token;
  rawNext = true;  // `before` came from the echo: it already holds the fine-tuning's bos and separator
  hidePopover();
  generate();
}

async function inspect() {
  showError("");
  const text = shownText || $("prompt").value;
  try {
    const response = await post("/v1/inspect", { model: modelName, prompt: text, layer: Number($("layer").value || 0) });
    view = await response.json();
    drawInside();
    if (view.dropped) showError(`the inside view shows the last ${view.tokens.length} tokens (the model's context); `
                                + `${view.dropped} before them are not seen by the model`);
  } catch (e) {
    showError(e.message);
  }
}

function label(token) {
  return token.replace(/ /g, "\u2423").replace(/\n/g, "\u21b5");
}

function drawInside() {
  if (!view) return;
  const heads = view.attention.length;
  const headSelect = $("head");
  if (headSelect.options.length !== heads) {
    headSelect.textContent = "";
    for (let h = 0; h < heads; h++) headSelect.add(new Option(String(h), String(h)));
  }
  const head = Math.min(Number(headSelect.value || 0), heads - 1);
  $("layer-kind").textContent = `layer ${view.layer}: ${view.kind}`;
  const table = $("attention");
  table.textContent = "";
  table.dataset.layer = view.layer;
  table.dataset.head = head;
  const header = table.insertRow();
  header.insertCell().textContent = "";
  view.tokens.forEach((t) => { const c = header.insertCell(); c.textContent = label(t); c.className = "key"; });
  view.attention[head].forEach((row, i) => {
    const tr = table.insertRow();
    const name = tr.insertCell();
    name.textContent = label(view.tokens[i]);
    name.className = "query";
    row.forEach((p) => {
      const cell = tr.insertCell();
      cell.className = "cell";
      cell.dataset.value = String(p);
      cell.title = `${(100 * p).toFixed(1)}%`;
      cell.style.background = `rgba(31, 78, 140, ${Math.min(1, Math.sqrt(p))})`;
    });
  });
  const lens = $("lens");
  lens.textContent = "";
  const top = lens.insertRow();
  top.insertCell().textContent = "";
  view.tokens.forEach((t) => { top.insertCell().textContent = label(t); });
  view.lens.layers.forEach((name, l) => {
    const tr = lens.insertRow();
    tr.insertCell().textContent = name;
    view.lens.tokens[l].forEach((t, i) => {
      const cell = tr.insertCell();
      const p = view.lens.probs[l][i];
      cell.textContent = label(t);
      cell.title = `${(100 * p).toFixed(1)}%`;
      cell.style.background = colour(p);
    });
  });
  drawCard(view.model);
}

function drawCard(card) {
  const dl = $("card");
  dl.textContent = "";
  const rows = [["model", card.name], ["from", card.source], ["parameters", card.parameters.toLocaleString()],
    ["layers x heads", `${card.n_layer} x ${card.n_head} (head dim ${card.head_dim})`], ["width", card.n_embd],
    ["context", card.context], ["vocabulary", `${card.vocab_size} (${card.tokenizer})`],
    ["attention", card.layers.join(", ")]];
  for (const [k, v] of rows) {
    const dt = document.createElement("dt"); dt.textContent = k; dl.appendChild(dt);
    const dd = document.createElement("dd"); dd.textContent = String(v); dl.appendChild(dd);
  }
}

async function start() {
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    if (!r.ok) throw new Error(await apiError(r));
    const entry = (await r.json()).data[0];
    modelName = entry.id;
    $("model-name").textContent = modelName;
    const card = { name: modelName, ...entry.minigpt };
    const layerSelect = $("layer");
    layerSelect.textContent = "";
    card.layers.forEach((kind, l) => layerSelect.add(new Option(`${l} (${kind})`, String(l))));
    const headSelect = $("head");
    headSelect.textContent = "";
    for (let h = 0; h < card.n_head; h++) headSelect.add(new Option(String(h), String(h)));
    drawCard(card);
  } catch (e) {
    showError(e.message);
  }
}

$("generate").addEventListener("click", generate);
$("stop-button").addEventListener("click", () => controller && controller.abort());
$("inside-button").addEventListener("click", inspect);
$("layer").addEventListener("change", inspect);
$("head").addEventListener("change", drawInside);
$("api_key").addEventListener("change", start);
$("output").addEventListener("mouseover", (e) => { if (e.target.classList.contains("token")) showPopover(e.target); });
$("output").addEventListener("click", (e) => { if (e.target.classList.contains("token")) showPopover(e.target); });
document.addEventListener("keydown", (e) => { if (e.key === "Escape") hidePopover(); });
start();
