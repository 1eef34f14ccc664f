// The playground: calls the gateway's public API (/v1/bon, /v1/vbon, /v1/models) from the
// browser, with the API key the user gives (kept in sessionStorage: gone with the tab).
// Vanilla JS, no build step, nothing from other origins (the page's CSP allows only 'self').
// Model output is untrusted text: it reaches the page only through textContent.
"use strict";

const KEY_STORE = "vbon-playground-key";
const MAX_K = 32; // throughput runs stay short: the gateway serves others meanwhile
const MAX_C = 8;
const SVG_NS = "http://www.w3.org/2000/svg";

const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, text = null) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== null) node.textContent = text;
  return node;
}

function svg(tag, attrs = {}, text = null) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (text !== null) node.textContent = text;
  return node;
}

// -- API ---------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function apiKey() {
  return sessionStorage.getItem(KEY_STORE) || "";
}

// One call; returns the parsed body and the wall time seen here. A non-2xx answer throws
// the server's own message (the error shape: {"error": {"message", "type", "param"}}).
async function api(method, path, body) {
  const headers = {};
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const key = apiKey();
  if (key) headers["Authorization"] = "Bearer " + key;
  const t0 = performance.now();
  let resp;
  try {
    resp = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (err) {
    throw new ApiError(0, "no answer from the gateway: " + err.message);
  }
  let data = null;
  try {
    data = await resp.json();
  } catch (_) {
    data = null;
  }
  const wall = (performance.now() - t0) / 1000;
  if (!resp.ok) {
    const msg = data && data.error && data.error.message;
    throw new ApiError(resp.status, `${resp.status}: ${msg || resp.statusText || "error"}`);
  }
  return { body: data, wall };
}

// An empty field is sent as null, so that the server (not the page) says what is allowed.
function numberField(id) {
  const raw = $(id).value.trim();
  return raw === "" ? null : Number(raw);
}

function promptFields() {
  const text = $("prompt").value;
  if ($("prompt-kind").value === "chat") return { messages: [{ role: "user", content: text }] };
  return { prompt: text };
}

// -- key and server status -----------------------------------------------------------------

async function checkServer() {
  const status = $("server-status");
  status.className = "status";
  status.textContent = "checking…";
  try {
    const { body } = await api("GET", "/v1/models");
    const ids = body.data.map((m) => m.id);
    status.textContent = `connected: ${ids[0] || "?"} (${ids.length} models)`;
    status.classList.add("ok");
  } catch (err) {
    status.textContent = err.message;
    status.classList.add("error");
  }
}

function setupKey() {
  $("api-key").value = apiKey();
  $("key-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const key = $("api-key").value.trim();
    if (key) sessionStorage.setItem(KEY_STORE, key);
    else sessionStorage.removeItem(KEY_STORE);
    checkServer();
  });
}

function setupTabs() {
  for (const tab of document.querySelectorAll("[data-tab]")) {
    tab.addEventListener("click", () => {
      for (const other of document.querySelectorAll("[data-tab]")) {
        const on = other === tab;
        other.setAttribute("aria-selected", String(on));
        $("panel-" + other.dataset.tab).hidden = !on;
      }
    });
  }
}

// -- Compare tab ---------------------------------------------------------------------------

function fmt(x, digits = 3) {
  return typeof x === "number" ? x.toFixed(digits) : "–";
}

function summary(body, wall) {
  const p = el("p", { class: "summary" });
  const parts = [
    ["reward", "reward", fmt(body.reward)],
    ["tokens", "tokens", String(body.usage.completion_tokens)],
    ["server-s", "server s", fmt(body.timings.total_s, 2)],
    ["wall-s", "wall s", fmt(wall, 2)],
  ];
  for (const [cls, label, value] of parts) {
    const item = el("span", { class: "metric " + cls });
    item.append(el("span", { class: "label" }, label + " "), el("b", { class: "value" }, value));
    p.append(item);
  }
  return p;
}

function candidateTable(cands) {
  const table = el("table", { class: "cands" });
  const head = el("tr");
  for (const h of ["#", "reward", "tokens", "text"]) head.append(el("th", {}, h));
  table.appendChild(el("thead")).append(head);
  const tbody = table.appendChild(el("tbody"));
  for (const c of cands) {
    const row = el("tr", { class: "cand" + (c.stopped === "pruned" ? " pruned" : "") });
    row.dataset.rank = c.rank;
    row.append(
      el("td", { class: "rank" }, String(c.rank)),
      el("td", { class: "reward" }, fmt(c.reward)),
      el("td", { class: "tokens" }, String(c.tokens)),
      el("td", { class: "text" }, c.text + (c.stopped === "pruned" ? " …(pruned)" : "")),
    );
    tbody.append(row);
  }
  return table;
}

function showRunning(card) {
  const out = card.querySelector(".out");
  out.dataset.state = "running";
  out.replaceChildren(el("p", { class: "status" }, "running…"));
}

function showError(card, err) {
  const out = card.querySelector(".out");
  out.dataset.state = "error";
  out.replaceChildren(el("p", { class: "error" }, err.message));
}

function showAnswer(card, body, wall, extra) {
  const out = card.querySelector(".out");
  out.replaceChildren(summary(body, wall), el("blockquote", { class: "answer" }, body.text));
  for (const node of extra) out.append(node);
  out.dataset.state = "ok";
}

async function runCompare(ev) {
  ev.preventDefault();
  const base = { ...promptFields(), n: numberField("n"), max_tokens: numberField("max-tokens") };
  for (const label of document.querySelectorAll(".n-label")) label.textContent = String(base.n);
  const prune = { at_tokens: [numberField("prune-at")], keep: numberField("prune-keep") };
  const jobs = [
    ["bon", { ...base, return_candidates: true }, "/v1/bon"],
    ["vbon", { ...base, score: true }, "/v1/vbon"],
    ["pruned", { ...base, return_candidates: true, prune }, "/v1/bon"],
  ];
  $("run").disabled = true;
  // In parallel, as a client would: each card fills in as its answer arrives.
  await Promise.allSettled(
    jobs.map(async ([id, body, path]) => {
      const card = $(id);
      showRunning(card);
      try {
        const { body: ans, wall } = await api("POST", path, body);
        const extra = [];
        if (id === "vbon") {
          const a = ans.adapter;
          extra.push(el("p", { class: "meta" }, `adapter ${a.name} v${a.version} (N=${a.n})`));
        }
        if (id === "pruned" && ans.adaptive) {
          const info = ans.adaptive;
          extra.push(
            el("p", { class: "meta" },
              `${info.pruned} of ${info.samples} pruned at token ${prune.at_tokens[0]}`),
          );
        }
        if (ans.candidates) extra.push(candidateTable(ans.candidates));
        showAnswer(card, ans, wall, extra);
      } catch (err) {
        showError(card, err);
      }
    }),
  );
  $("run").disabled = false;
}

// -- Throughput tab ------------------------------------------------------------------------

// K requests, C at a time; returns what this browser measured.
async function runBatch(path, body, k, c) {
  let next = 0;
  const done = [];
  const errors = [];
  async function worker() {
    while (next < k) {
      next += 1;
      try {
        const { body: ans } = await api("POST", path, body);
        done.push(ans);
      } catch (err) {
        errors.push(err.message);
      }
    }
  }
  const t0 = performance.now();
  await Promise.all(Array.from({ length: Math.min(c, k) }, worker));
  const wall = (performance.now() - t0) / 1000;
  const tokens = done.reduce((s, a) => s + a.usage.completion_tokens, 0);
  const rewards = done.map((a) => a.reward).filter((r) => typeof r === "number");
  return {
    answers: done.length,
    errors,
    wall,
    answersPerS: done.length / wall,
    tokensPerS: tokens / wall,
    meanReward: rewards.length ? rewards.reduce((s, r) => s + r, 0) / rewards.length : null,
  };
}

const METRICS = [
  ["answersPerS", "answers/s"],
  ["tokensPerS", "generated tokens/s"],
  ["meanReward", "mean reward"],
];

// One panel per metric, a bar per method; each panel has its own scale (and a zero line,
// since a reward may be negative).
function drawChart(rows) {
  const W = 720, H = 270, top = 48, bottom = 40, pad = 30;
  const panelW = W / METRICS.length;
  const chart = svg("svg", { viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: "img" });
  chart.append(svg("title", {}, "vBoN vs BoN-N: answers/s, tokens/s, mean reward"));
  METRICS.forEach(([key, label], i) => {
    const x0 = i * panelW;
    const values = rows.map((r) => r[key] ?? 0);
    const lo = Math.min(0, ...values);
    let hi = Math.max(0, ...values);
    if (hi === lo) hi = lo + 1;
    const y = (v) => top + ((hi - v) / (hi - lo)) * (H - top - bottom);
    chart.append(svg("text", { x: x0 + panelW / 2, y: 18, class: "panel-title" }, label));
    const barW = (panelW - 2 * pad) / rows.length - 10;
    rows.forEach((r, j) => {
      const v = r[key];
      const bx = x0 + pad + j * (barW + 10);
      const y1 = y(Math.max(0, v ?? 0));
      const y2 = y(Math.min(0, v ?? 0));
      chart.append(
        svg("rect", {
          x: bx, y: y1, width: barW, height: Math.max(1, y2 - y1),
          class: "bar " + r.id, "data-method": r.id, "data-metric": key, "data-value": v ?? "",
        }),
        svg("text", { x: bx + barW / 2, y: y1 - 4, class: "bar-value" },
          v === null ? "–" : v.toFixed(key === "meanReward" ? 3 : 2)),
        svg("text", { x: bx + barW / 2, y: H - bottom + 16, class: "bar-label" }, r.name),
      );
    });
    chart.append(svg("line", { x1: x0 + pad / 2, x2: x0 + panelW - pad / 2, y1: y(0), y2: y(0),
      class: "axis" }));
  });
  $("tp-chart").replaceChildren(chart);
}

function fillTable(rows) {
  const tbody = $("tp-table").querySelector("tbody");
  tbody.replaceChildren();
  for (const r of rows) {
    const tr = el("tr", { "data-method": r.id });
    for (const v of [r.name, r.answers, r.errors.length, fmt(r.wall, 2), fmt(r.answersPerS, 2),
      fmt(r.tokensPerS, 1), fmt(r.meanReward)]) tr.append(el("td", {}, String(v)));
    tbody.append(tr);
  }
  $("tp-table").hidden = false;
}

async function runThroughput(ev) {
  ev.preventDefault();
  const status = $("tp-status");
  status.className = "status";
  const n = numberField("tp-n");
  const k = numberField("tp-k");
  const c = numberField("tp-c");
  // K and C are this page's own settings (not API fields): the page checks them itself.
  if (!Number.isInteger(k) || k < 1 || k > MAX_K) {
    status.textContent = `requests K is ${k}; allowed: 1 <= K <= ${MAX_K}`;
    status.classList.add("error");
    return;
  }
  if (!Number.isInteger(c) || c < 1 || c > MAX_C) {
    status.textContent = `concurrency C is ${c}; allowed: 1 <= C <= ${MAX_C}`;
    status.classList.add("error");
    return;
  }
  const base = { ...promptFields(), n, max_tokens: numberField("tp-max-tokens") };
  const methods = [
    { id: "vbon", name: `vBoN-${n}`, path: "/v1/vbon", body: { ...base, score: true } },
    { id: "bon", name: `BoN-${n}`, path: "/v1/bon", body: base },
  ];
  $("tp-run").disabled = true;
  const rows = [];
  // One method after the other, so that they do not share the engine while measured.
  for (const m of methods) {
    status.textContent = `running ${m.name}: ${k} requests, ${c} at a time…`;
    rows.push({ ...m, ...(await runBatch(m.path, m.body, k, c)) });
  }
  $("tp-run").disabled = false;
  const failed = rows.filter((r) => r.errors.length);
  if (failed.length) {
    status.textContent = failed.map((r) => `${r.name}: ${r.errors[0]}`).join(" · ");
    status.classList.add("error");
  } else {
    const ratio = rows[0].answersPerS / rows[1].answersPerS;
    status.textContent = `done: vBoN answered ${ratio.toFixed(1)}x as many requests per second`;
    status.classList.add("ok");
  }
  drawChart(rows);
  fillTable(rows);
}

document.addEventListener("DOMContentLoaded", () => {
  setupKey();
  setupTabs();
  $("compare-form").addEventListener("submit", runCompare);
  $("tp-form").addEventListener("submit", runThroughput);
  checkServer();
});
