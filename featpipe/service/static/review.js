// The review page: one photo at a time from the server's queue; every decision carries an id made here and is
// retried with the same id until the server acknowledges it (it is then in the journal, recorded once).
"use strict";

const token = new URLSearchParams(location.search).get("token") || "";
const $ = (id) => document.getElementById(id);
let tab = "review";
let queue = [];
let current = null;
let busy = false;
let saved = 0;

class HttpError extends Error {
  constructor(status, detail) { super(`${status}: ${detail}`); this.status = status; }
}

async function api(path, options = {}) {
  const headers = { "X-Review-Token": token };
  if (options.body) headers["Content-Type"] = "application/json";
  const r = await fetch(path, { ...options, headers });
  if (!r.ok) {
    let detail = r.statusText;
    try { detail = (await r.json()).detail; } catch (e) { /* not JSON: keep the status text */ }
    throw new HttpError(r.status, detail);
  }
  return r.json();
}

function withToken(url) { return `${url}${url.includes("?") ? "&" : "?"}token=${encodeURIComponent(token)}`; }

function newId() {
  if (crypto.randomUUID) return crypto.randomUUID();
  return Array.from(crypto.getRandomValues(new Uint8Array(16)), (b) => b.toString(16).padStart(2, "0")).join("");
}

function say(text, error = false) {
  $("message").textContent = text;
  $("message").className = error ? "error" : "";
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k.startsWith("data-")) node.setAttribute(k, v); else node[k] = v;
  }
  node.append(...children);
  return node;
}

async function loadQueue() {
  const answer = await api(`/api/queue?tab=${tab}&limit=20`);
  queue = answer.items;
  show(queue[0] || null);
}

function show(item) {
  current = item;
  $("card").hidden = $("choices").hidden = !item;
  $("empty").hidden = !!item;
  $("similar").replaceChildren();
  if (!item) { document.body.dataset.current = ""; return; }
  document.body.dataset.current = item.index;
  $("photo").src = withToken(`/photo/${item.index}`);
  $("photo").dataset.index = item.index;
  $("photo").dataset.file = item.file;
  const pct = (p) => `${(100 * p).toFixed(1)}%`;
  $("meta").textContent = `#${item.index} ${item.name} · ${item.source} · model says ${item.suggestion} (${pct(item.confidence)})`;
  const again = item.decision ? ` · skipped before` : "";
  $("reason").textContent = (tab === "spot" ? "auto-tagged: is it right?" : item.reason) + again;
  $("top").replaceChildren(...item.top.map((t, i) => {
    const button = el("button", { className: "label", "data-label": t.label },
      el("kbd", {}, String(i + 1)), tab === "spot" && i === 0 ? `Right: ${t.label}` : t.label,
      el("span", { className: "p" }, pct(t.p)));
    button.addEventListener("click", () => decide("label", t.label));
    return button;
  }));
  loadSimilar(item.index);
}

async function loadSimilar(index) {
  try {
    const answer = await api(`/api/photos/${index}/similar?k=6`);
    if (!current || current.index !== index) return;
    $("similar").replaceChildren(...answer.items.map((s) => el("figure", {},
      el("img", { src: withToken(`/catalogue/${s.image}`), alt: s.label, loading: "lazy" }),
      el("figcaption", {}, `${s.label} · ${s.score.toFixed(2)}`))));
    if (answer.note) $("similar").append(el("p", {}, answer.note));
  } catch (e) { $("similar").replaceChildren(el("p", {}, `no similar products (${e.message})`)); }
}

async function decide(kind, label = null) {
  if (!current || busy) return;
  busy = true;
  const item = current;
  const body = JSON.stringify({ id: newId(), index: item.index, kind, label, reviewer: $("reviewer").value });
  try {
    for (let attempt = 0; ; attempt++) {
      try {
        await api("/api/decisions", { method: "POST", body });
        break;
      } catch (e) {
        // a refusal (4xx) will not change on retry; a lost answer or a restarting server might
        if ((e instanceof HttpError && e.status < 500) || attempt >= 8) { say(`not saved: ${e.message}`, true); return; }
        say(`saving… (retry ${attempt + 1}: ${e.message})`, true);
        await new Promise((r) => setTimeout(r, Math.min(4000, 250 * 2 ** attempt)));
      }
    }
    saved += 1;
    say(`saved: #${item.index} ${kind === "label" ? label : kind.replace("_", " ")}`);
    $("message").dataset.saved = saved;
    queue = queue.filter((q) => q.index !== item.index);
    if (queue.length < 5) await loadQueue(); else show(queue[0]);
    refreshState();
  } finally {
    busy = false;
  }
}

function renderCounts(p) {
  const acc = p.progressive.accuracy;
  const rows = [
    ["photos", p.photos], ["to review", p.to_review], ["labelled", p.labelled], ["skipped", p.skipped],
    ["not ours", p.not_ours], ["spot-checked", p.spot_checked],
    ["model right before the label", acc === null ? "–" : `${(100 * acc).toFixed(1)}% of ${p.progressive.n}`],
  ];
  $("counts").replaceChildren(...rows.flatMap(([k, v]) => [el("dt", {}, k), el("dd", { id: `count-${k.replace(/ /g, "-")}` }, String(v))]));
  const fmt = (x) => (x === null || x === undefined ? "–" : `${(100 * x).toFixed(1)}%`);
  $("sources").tBodies[0].replaceChildren(...p.sources.map((s) => el("tr", {},
    el("td", {}, s.source), el("td", {}, `${s.correct}/${s.checks}`),
    el("td", {}, `${fmt(s.precision)} [${fmt(s.lower_bound)}–${fmt(s.upper_bound)}]`),
    el("td", { className: s.state }, s.state), el("td", {}, fmt(s.spot_rate)))));
}

function renderRetrain(job, command) {
  $("command").textContent = command;
  const box = $("retrain-status");
  $("retrain").disabled = !!job && (job.state === "running" || job.state === "starting");
  if (!job) { box.replaceChildren(); return; }
  const parts = [el("div", { className: "bar" }, el("div", { style: `width:${(100 * job.step / job.steps).toFixed(0)}%` })),
    el("div", { id: "retrain-state" }, `${job.state}: ${job.stage || ""} (${job.seconds} s)`)];
  if (job.error) parts.push(el("div", { className: "error" }, job.error));
  if (job.result) {
    const r = job.result;
    parts.push(el("div", { id: "retrain-result" },
      `on the ${r.reviewed} reviewed photos: old model ${(100 * r.old_accuracy).toFixed(1)}%, new model ` +
      `${(100 * r.new_cv_accuracy).toFixed(1)}% (${r.folds}-fold cross-validated). The queue is re-ranked with the new model.`));
  }
  box.replaceChildren(...parts);
}

function renderRecent(recent) {
  $("recent").replaceChildren(...recent.map((d) => el("li", { "data-index": d.index ?? "", "data-label": d.label || d.kind },
    `#${d.index ?? "?"} ${d.kind === "label" ? d.label : d.kind.replace("_", " ")}${d.spot ? " (spot check)" : ""}`)));
}

let classesShown = false;
async function refreshState() {
  try {
    const s = await api("/api/state");
    if (!classesShown) {
      $("classes").replaceChildren(...s.classes.map((c) => el("option", { value: c })));
      classesShown = true;
    }
    window.featpipeClasses = s.classes;
    renderCounts(s.progress);
    renderRetrain(s.retrain, s.retrain_command);
    renderRecent(s.recent);
    return s;
  } catch (e) { say(e.message, true); return null; }
}

document.addEventListener("keydown", (event) => {
  if (event.target.tagName === "INPUT" || event.ctrlKey || event.metaKey || event.altKey) return;
  if (["1", "2", "3"].includes(event.key) && current && current.top[Number(event.key) - 1]) {
    decide("label", current.top[Number(event.key) - 1].label);
  } else if (event.key === "s") {
    decide("skip");
  } else if (event.key === "n") {
    decide("not_ours");
  } else if (event.key === "/") {
    event.preventDefault();
    $("typeahead").focus();
  }
});

$("typeahead-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const value = $("typeahead").value.trim();
  const match = (window.featpipeClasses || []).find((c) => c.toLowerCase() === value.toLowerCase());
  if (!match) { say(`${value || "(empty)"}: not one of the model's classes`, true); return; }
  $("typeahead").value = "";
  $("typeahead").blur();
  decide("label", match);
});
$("skip").addEventListener("click", () => decide("skip"));
$("not-ours").addEventListener("click", () => decide("not_ours"));
$("retrain").addEventListener("click", async () => {
  try { renderRetrain(await api("/api/retrain", { method: "POST" }), $("command").textContent); }
  catch (e) { say(e.message, true); }
});
$("export").addEventListener("click", (event) => { event.currentTarget.href = withToken("/reviews.csv"); });
$("reviewer").value = localStorage.getItem("featpipe-reviewer") || "";
$("reviewer").addEventListener("change", () => localStorage.setItem("featpipe-reviewer", $("reviewer").value));
for (const button of document.querySelectorAll(".tab")) {
  button.addEventListener("click", () => {
    tab = button.dataset.tab;
    document.querySelectorAll(".tab").forEach((b) => b.classList.toggle("active", b === button));
    loadQueue().catch((e) => say(e.message, true));
  });
}

// a retrain re-ranks the queue: poll while one runs, and reload the queue when it finishes
let lastJobState = null;
setInterval(async () => {
  const running = lastJobState === "running" || lastJobState === "starting";
  if (!running && document.hidden) return;
  const s = await refreshState();
  const state = s && s.retrain ? s.retrain.state : null;
  if (running && state === "done") loadQueue();
  lastJobState = state;
}, 2000);

if (!token) say("this page needs the URL featpipe review printed (it carries the token)", true);
refreshState();
loadQueue().catch((e) => say(e.message, true));
