// mlxd's status page: reads the daemon's own API every two seconds and
// draws it; its buttons call the same API that `mlxd load` and friends do.
"use strict";

const POLL_MS = 2000;
const TIMEOUT_MS = 10000; // a poll unanswered this long: the daemon is not answering
const KEY = "mlxd-key"; // sessionStorage: this tab only, never a URL or a cookie
const COLORS = ["#2463d1", "#d1632a", "#1f8a3b", "#8a3bb8", "#b8a21f", "#1fa3b8", "#b81f5e"];

const $ = (id) => document.getElementById(id);
let downSince = null;
let lastDrawn = "";

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("data-")) node.setAttribute(k, v);
    else node[k] = v;
  }
  for (const c of children) {
    if (c !== null && c !== undefined) node.append(c);
  }
  return node;
}

function bytes(n) { // as mlxd ps writes them (config/units.py)
  if (n === null || n === undefined) return "–";
  for (const unit of ["B", "KiB", "MiB", "GiB"]) {
    if (Math.abs(n) < 1024) return unit === "B" ? n.toFixed(0) + " B" : n.toFixed(1) + " " + unit;
    n /= 1024;
  }
  return n.toFixed(1) + " TiB";
}

const seconds = (s) => (s === null || s === undefined ? "–" : s < 1 ? (s * 1000).toFixed(0) + " ms" : s.toFixed(2) + " s");
const clock = (t) => new Date(t * 1000).toLocaleTimeString();
const count = (n) => (n === null || n === undefined ? "–" : String(n));

async function call(method, path, body, timeoutMs = TIMEOUT_MS) {
  const headers = {};
  const key = sessionStorage.getItem(KEY);
  if (key) headers["Authorization"] = "Bearer " + key;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const abort = new AbortController();
  const timer = timeoutMs ? setTimeout(() => abort.abort(), timeoutMs) : null;
  try {
    const r = await fetch(path, {
      method, headers, body: body === undefined ? undefined : JSON.stringify(body),
      signal: abort.signal, cache: "no-store",
    });
    const data = await r.json().catch(() => ({}));
    if (!r.ok) {
      const e = new Error((data.error && data.error.message) || "HTTP " + r.status);
      e.status = r.status;
      throw e;
    }
    return data;
  } finally {
    if (timer) clearTimeout(timer);
  }
}

// The line at the top: changed only when the state does (it is read out).
function say(text, kind) {
  const live = $("live");
  if (live.textContent !== text) live.textContent = text;
  live.className = kind;
}

function showKeyForm(message) {
  $("content").hidden = true;
  $("key-form").hidden = false;
  $("key-error").textContent = message || "";
  say("API key needed", "muted");
  lastDrawn = "";
}

async function poll() {
  try {
    const [ps, activity, errors] = await Promise.all([
      call("GET", "/api/ps"), call("GET", "/api/activity"), call("GET", "/api/errors"),
    ]);
    downSince = null;
    $("key-form").hidden = true;
    $("content").hidden = false;
    say("live", "");
    $("updated").textContent = "updated " + new Date().toLocaleTimeString();
    draw(ps, activity, errors.errors || []);
  } catch (e) {
    if (e.status === 401) {
      showKeyForm(sessionStorage.getItem(KEY) ? "That key was not accepted." : "");
    } else {
      downSince = downSince || new Date();
      say("mlxd is not answering (since " + downSince.toLocaleTimeString() + ")", "down");
    }
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

function draw(ps, activity, errors) {
  const state = JSON.stringify([ps, activity.latest, errors]);
  drawCharts(activity.samples, activity.kept);
  if (state === lastDrawn) return; // keep the page still (and the focus) when nothing changed
  lastDrawn = state;
  const focused = document.activeElement;
  const refocus = focused && focused.dataset && focused.dataset.action
    ? `[data-action="${focused.dataset.action}"][data-model="${CSS.escape(focused.dataset.model)}"]`
    : null;
  drawBudget(ps);
  drawModels(ps.models);
  drawRequests(activity.latest);
  drawErrors(errors);
  if (refocus) {
    const again = document.querySelector(refocus);
    if (again) again.focus();
  }
}

function drawBudget(ps) {
  $("budget-text").textContent = `${bytes(ps.used)} of ${bytes(ps.budget)} in use, ${bytes(Math.max(ps.budget - ps.used, 0))} free`;
  const parts = ps.models.filter((m) => m.bytes > 0).map((m, i) => [m.model, m.bytes, COLORS[i % COLORS.length]]);
  if (ps.spare_bytes > 0) parts.push(["spare runner", ps.spare_bytes, "#888"]);
  const bar = $("budget-bar");
  bar.replaceChildren(...parts.map(([name, n, color]) => {
    const span = el("span", { title: `${name}: ${bytes(n)}` });
    span.style.width = (100 * n / Math.max(ps.budget, 1)) + "%";
    span.style.background = color;
    return span;
  }));
  bar.setAttribute("aria-label", $("budget-text").textContent);
  $("budget-legend").replaceChildren(...parts.map(([name, n, color]) => {
    const swatch = el("span", { class: "swatch" });
    swatch.style.background = color;
    return el("li", {}, swatch, `${name}: ${bytes(n)}`);
  }));
  const spare = ps.spare || {};
  $("spare").textContent = `Spare runner: ${spare.state || "none"}` +
    (ps.spare_bytes ? `, holding ${bytes(ps.spare_bytes)}` : "") +
    (ps.runner_bytes ? ` · each runner holds ${bytes(ps.runner_bytes)} before its model` : "");
}

function until(m) {
  if (m.pinned) return "pinned";
  if (m.state !== "ready") return "–";
  if (m.expires_at) return "idle until " + clock(m.expires_at);
  return m.running || m.queued ? "in use" : "kept for ever";
}

function drawModels(models) {
  $("models").replaceChildren(...models.map((m) => {
    const prefixes = m.prefix_cache || {};
    const rows = [
      ["Charged", bytes(m.bytes)],
      ["Weights", bytes(m.weights)],
      ["KV reserved", bytes(m.kv_reserved)],
      ["Prefix cache", `${bytes(prefixes.bytes)} of ${bytes(prefixes.limit)}` + (prefixes.disk_bytes ? `, ${bytes(prefixes.disk_bytes)} on disk` : "")],
      ["Measured", bytes(m.measured)],
      ["Running", count(m.running)],
      ["Queued", count(m.queued)],
      ["Waiting for memory", count(m.waiting_for_memory)],
      ["Until", until(m)],
    ];
    const dl = el("dl", {}, ...rows.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
    const clients = (m.clients || []).map((c) =>
      el("li", {}, `${c.client || "anonymous"} (${c.priority}): ${c.running} running, ${c.queued} queued` +
        (c.paused ? ` (${c.paused} paused)` : "")));
    const buttons = [];
    const button = (action, label) => buttons.push(el("button", {
      type: "button", "data-action": action, "data-model": m.model, textContent: label,
      ariaLabel: `${label} ${m.model}`,
    }));
    if (m.state === "absent") button("load", "Load");
    if (m.state === "ready" || m.state === "loading") button("unload", "Unload");
    button(m.pinned ? "unpin" : "pin", m.pinned ? "Unpin" : "Pin");
    return el("article", { class: "model", "data-model": m.model },
      el("h3", {}, m.model),
      el("span", { class: "badge state-" + m.state }, m.state),
      m.pinned ? el("span", { class: "badge" }, "pinned") : null,
      dl,
      clients.length ? el("ul", { class: "clients" }, ...clients) : null,
      el("div", { class: "actions" }, ...buttons));
  }));
}

function drawRequests(latest) {
  $("no-requests").hidden = latest.length > 0;
  $("requests").tBodies[0].replaceChildren(...latest.map((r) => el("tr", { "data-id": r.id },
    el("td", {}, clock(r.time)),
    el("td", {}, r.model || "–"),
    el("td", {}, r.client || "–"),
    el("td", {}, r.endpoint),
    el("td", { class: r.status >= 400 ? "bad" : "", title: r.error || "" }, String(r.status)),
    el("td", {}, seconds(r.ttft_s)),
    el("td", {}, count(r.prompt_tokens) + (r.images ? ` (${r.images} image${r.images > 1 ? "s" : ""})` : "")),
    el("td", {}, count(r.cached_tokens)),
    el("td", {}, count(r.generated_tokens)),
    el("td", {}, seconds(r.duration_s)),
    el("td", {}, r.pauses ? `${r.pauses} × ${seconds(r.paused_s / r.pauses)}` : "–"))));
}

function drawErrors(errors) {
  $("no-errors").hidden = errors.length > 0;
  $("errors").replaceChildren(...errors.slice().reverse().map((e) =>
    el("li", { class: e.level }, `${e.time} ${e.level} ${e.message}`)));
}

function drawCharts(samples, n) {
  const line = (id, field, nowId) => {
    const values = samples.map((s) => s[field]);
    const top = Math.max(1, ...values);
    const points = values.map((v, i) => `${((n - values.length + i) / (n - 1)) * 300},${58 - (v / top) * 56}`);
    const svg = $(id);
    const poly = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
    poly.setAttribute("points", points.join(" "));
    svg.replaceChildren(poly);
    const last = values.length ? values[values.length - 1] : 0;
    $(nowId).textContent = last.toFixed(field === "tokens_per_s" ? 1 : 2);
  };
  line("tps-chart", "tokens_per_s", "tps-now");
  line("rps-chart", "requests_per_s", "rps-now");
}

async function act(action, model, buttonEl) {
  const status = $("action-status");
  buttonEl.disabled = true;
  status.classList.remove("error");
  status.textContent = `${action} ${model}…`;
  try {
    await call("POST", "/api/" + action, { model }, 0); // a load takes as long as it takes
    status.textContent = `${action} ${model}: done`;
  } catch (e) {
    if (e.status === 401) showKeyForm("That key was not accepted.");
    status.classList.add("error");
    status.textContent = `${action} ${model} failed: ${e.message}`;
  } finally {
    buttonEl.disabled = false;
    lastDrawn = ""; // redraw now
  }
}

$("models").addEventListener("click", (event) => {
  const b = event.target.closest("button[data-action]");
  if (b) act(b.dataset.action, b.dataset.model, b);
});

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(KEY, $("key").value.trim());
  $("key").value = "";
  $("key-error").textContent = "";
  say("checking the key…", "muted");
});

poll();
