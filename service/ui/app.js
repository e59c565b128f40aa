// MVKE tag inspector: plain browser JavaScript, no build step, no third-party code.
// Every call goes to this service's own API (relative URLs, so it also works behind a path prefix).
"use strict";

const state = { apiKey: null, pending: null, last: null };
const $ = (id) => document.getElementById(id);

function show(el, on) { el.hidden = !on; }

// --- HTTP: the key, when one is needed, lives in `state.apiKey` only (never in storage or the URL) ---
async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (state.apiKey) headers["Authorization"] = "Bearer " + state.apiKey;
  const resp = await fetch(path, Object.assign({}, options, { headers }));
  if (resp.status === 401) {
    show($("key-bar"), true);
    $("api-key").focus();
    throw new Error("this service needs an API key: enter it above");
  }
  let doc = null;
  const text = await resp.text();
  try { doc = JSON.parse(text); } catch (e) { doc = { detail: text }; }
  if (!resp.ok) throw new Error(`${resp.status}: ${doc.detail || text}`);
  return doc;
}

// --- status line and version choices ---
async function refreshStatus() {
  try {
    const ready = await fetch("readyz").then((r) => r.json());
    $("service-status").textContent = !ready.ready ? `not ready: ${ready.reason}` :
        `ready: active ${ready.model_version}` + (ready.canary_version ? `, canary ${ready.canary_version}` : "");
  } catch (e) {
    $("service-status").textContent = "service unreachable";
  }
}

async function loadVersions() {
  const doc = await api("models");
  const tbody = $("versions-table").querySelector("tbody");
  tbody.replaceChildren();
  for (const v of doc.versions) {
    const tr = document.createElement("tr");
    tr.dataset.version = v.version;
    let st = v.active ? "active" : "";
    if (v.canary) st = `canary (${doc.canary.percent}% of users)`;
    if (v.rolled_back) st = st ? st + ", rolled back from" : "rolled back from";
    tr.dataset.state = v.active ? "active" : v.canary ? "canary" : "";
    const cells = [v.version, v.model, st || "published", v.loaded ? "yes" : "no", v.created_at,
                   new Date(v.published_at * 1000).toISOString().replace(".000", ""),
                   (v.bytes / 1e6).toFixed(2) + " MB"];
    for (const c of cells) {
      const td = document.createElement("td");
      td.textContent = c;
      tr.appendChild(td);
    }
    if (v.active) tr.classList.add("active");
    if (v.canary) tr.classList.add("canary");
    tbody.appendChild(tr);
  }
  const c = doc.canary;
  $("versions-summary").textContent = `active: ${doc.active || "none"}` +
      (c ? `; canary: ${c.version} for ${c.percent}% of users (${c.source})` : "; no canary");
  const select = $("model-version");
  const keep = select.value;
  select.replaceChildren(new Option("as routed (active or canary)", ""));
  for (const v of doc.versions.filter((x) => x.loaded)) {
    select.appendChild(new Option(`${v.version} (${v.active ? "active" : "canary"})`, v.version));
  }
  select.value = keep;
}

// --- inspect: one request with explain=true, so choosing a tag needs no second call ---
function requestBody() {
  const body = { top_k: Number($("top-k").value) || 10, explain: true };
  const version = $("model-version").value;
  if (version) body.model_version = version;
  const raw = $("features").value.trim();
  if (raw) {
    try { body.features = JSON.parse(raw); } catch (e) { throw new Error("feature values: not valid JSON: " + e.message); }
  }
  return body;
}

async function lookup(ev) {
  if (ev) ev.preventDefault();
  show($("error"), false);
  try {
    const body = requestBody();
    const user = $("user-id").value.trim() || "ui-preview";
    const doc = await api(`users/${encodeURIComponent(user)}/tags`, {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
    state.last = doc;
    render(doc);
  } catch (e) {
    $("error").textContent = e.message;
    show($("error"), true);
    show($("result"), false);
  }
}

function render(doc) {
  $("meta").textContent = `user ${doc.user_id}: model ${doc.model}, version ${doc.model_version}, ` +
                          `features from ${doc.feature_source}`;
  $("meta").dataset.version = doc.model_version;
  $("meta").dataset.source = doc.feature_source;
  const unknown = doc.unknown_values;
  show($("unknown"), !!unknown);
  if (unknown) {
    $("unknown").textContent = "values the model has never seen (encoded as out-of-vocabulary): " +
        Object.entries(unknown).map(([f, n]) => `${f}: ${n}`).join(", ");
  }
  const tasks = $("tasks");
  tasks.replaceChildren();
  for (const [task, ranked] of Object.entries(doc.tasks)) {
    const col = document.createElement("div");
    col.className = "task";
    col.dataset.task = task;
    const h = document.createElement("h2");
    h.textContent = `${task} (${ranked.length})`;
    col.appendChild(h);
    ranked.forEach((item, i) => col.appendChild(tagRow(task, item, i)));
    tasks.appendChild(col);
  }
  show($("explain"), false);
  show($("result"), true);
}

function tagRow(task, item, rank) {
  const row = document.createElement("button");
  row.type = "button";
  row.className = "tag-row";
  row.dataset.tag = item.tag;
  row.dataset.score = String(item.score);
  row.dataset.task = task;
  const name = document.createElement("span");
  name.className = "tag-name";
  name.textContent = `${rank + 1}. ${item.tag}`;
  const bar = document.createElement("span");
  bar.className = "bar";
  const fill = document.createElement("span");
  fill.className = "fill";
  fill.style.width = (100 * item.score).toFixed(1) + "%";
  bar.appendChild(fill);
  const score = document.createElement("span");
  score.className = "score";
  score.textContent = item.score.toFixed(4);
  row.append(name, bar, score);
  row.addEventListener("click", () => explain(task, item, row));
  return row;
}

function explain(task, item, row) {
  document.querySelectorAll(".tag-row.chosen").forEach((r) => r.classList.remove("chosen"));
  row.classList.add("chosen");
  const ex = item.explain;
  const panel = $("explain");
  panel.dataset.task = task;
  panel.dataset.tag = item.tag;
  $("explain-title").textContent = `${item.tag} (${task}): score ${item.score.toFixed(4)}`;
  const tbody = $("explain-table").querySelector("tbody");
  tbody.replaceChildren();
  if (!ex) {
    $("explain-sum").textContent = "no explanation in this answer";
    show(panel, true);
    return;
  }
  const maxAbs = Math.max(...ex.contributions.map(Math.abs), 1e-9);
  ex.experts.forEach((expert, k) => {
    const tr = document.createElement("tr");
    tr.className = "expert";
    tr.dataset.expert = String(expert);
    tr.dataset.gate = String(ex.gates[k]);
    tr.dataset.contribution = String(ex.contributions[k]);
    const gateBar = `<span class="bar"><span class="fill" style="width:${(100 * ex.gates[k]).toFixed(1)}%"></span></span>`;
    const c = ex.contributions[k];
    const cBar = `<span class="bar signed"><span class="fill ${c < 0 ? "neg" : ""}" style="width:${(50 * Math.abs(c) / maxAbs).toFixed(1)}%"></span></span>`;
    tr.innerHTML = `<td>#${expert}</td><td class="num">${ex.gates[k].toFixed(4)}</td><td>${gateBar}</td>` +
                   `<td class="num">${c.toFixed(4)}</td><td>${cBar}</td><td class="num">${(100 * ex.shares[k]).toFixed(1)}%</td>`;
    tbody.appendChild(tr);
  });
  $("explain-sum").textContent = `cosine ${ex.cosine.toFixed(4)} = sum of contributions; ` +
      `score = sigmoid(${ex.scale.toFixed(3)} x cosine + ${ex.bias.toFixed(3)})`;
  show(panel, true);
}

// --- audiences: pick tags and operators, see the exact size (GET audiences, POST audiences:estimate) ---
const aud = { info: null };
const FIRST_OPS = ["", "NOT"];
const NEXT_OPS = ["AND", "OR", "AND NOT", "OR NOT"];
const fmt = (n) => n.toLocaleString("en-US");

async function loadAudiences() {
  const info = await api("./audiences");
  aud.info = info;
  const rule = info.rule.text;
  $("aud-info").textContent = `index ${info.version} (model ${info.model_version}): ${fmt(info.users)} users; ` +
      `a user is in a tag's audience when ${rule}; built ${info.built_at}`;
  $("aud-info").dataset.version = info.version;
  for (const [task, t] of Object.entries(info.tasks)) {
    let list = $(`aud-tags-${task}`);
    if (!list) {
      list = document.createElement("datalist");
      list.id = `aud-tags-${task}`;
      $("panel-audiences").appendChild(list);
      list.replaceChildren(...t.tags.map((tag, i) => new Option(`${fmt(t.sizes[i])} users`, tag)));
    }
  }
  if (!$("aud-terms").children.length) addTerm();
}

function tagSize(task, tag) {
  const t = aud.info && aud.info.tasks[task];
  const i = t ? t.tags.indexOf(tag) : -1;
  return i < 0 ? null : t.sizes[i];
}

function addTerm() {
  const rows = $("aud-terms");
  const row = document.createElement("div");
  row.className = "aud-term";
  const op = document.createElement("select");
  op.className = "op";
  for (const o of rows.children.length ? NEXT_OPS : FIRST_OPS) op.appendChild(new Option(o || "(tag)", o));
  const task = document.createElement("select");
  task.className = "task-pick";
  for (const t of Object.keys(aud.info ? aud.info.tasks : {})) task.appendChild(new Option(t, t));
  const tag = document.createElement("input");
  tag.className = "tag-pick";
  tag.placeholder = "tag, e.g. cat07/tag0123";
  tag.setAttribute("list", `aud-tags-${task.value}`);
  const size = document.createElement("span");
  size.className = "tag-size muted";
  const remove = document.createElement("button");
  remove.type = "button";
  remove.className = "plain";
  remove.textContent = "remove";
  remove.addEventListener("click", () => { row.remove(); buildExpression(); });
  const update = () => {
    tag.setAttribute("list", `aud-tags-${task.value}`);
    const n = tagSize(task.value, tag.value.trim());
    size.textContent = tag.value.trim() ? (n === null ? "unknown tag" : `${fmt(n)} users`) : "";
    buildExpression();
  };
  for (const el of [op, task]) el.addEventListener("change", update);
  tag.addEventListener("input", update);
  row.append(op, task, tag, size, remove);
  rows.appendChild(row);
  return row;
}

function quoteTag(tag) {
  return /^[^\s()"]+$/.test(tag) && !/^(and|or|not)$/i.test(tag) ? tag : `"${tag.replace(/[\\"]/g, "\\$&")}"`;
}

function buildExpression() {
  const parts = [];
  for (const row of $("aud-terms").children) {
    const tag = row.querySelector(".tag-pick").value.trim();
    if (!tag) continue;
    const op = row.querySelector(".op").value;
    const term = `${row.querySelector(".task-pick").value}:${quoteTag(tag)}`;
    parts.push(parts.length ? `${op || "AND"} ${term}` : (op === "NOT" || op.endsWith("NOT") ? `NOT ${term}` : term));
  }
  $("aud-expression").value = parts.join(" ");
}

async function estimateAudience(ev) {
  if (ev) ev.preventDefault();
  show($("aud-error"), false);
  try {
    const doc = await api("./audiences:estimate", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ expression: $("aud-expression").value, sample: 8 }) });
    $("aud-size").textContent = `${fmt(doc.size)} users`;
    $("aud-size").dataset.size = String(doc.size);
    const share = doc.users ? doc.size / doc.users : 0;
    $("aud-share").textContent = `${(100 * share).toFixed(2)}% of ${fmt(doc.users)} (index ${doc.version}): ${doc.expression}`;
    $("aud-fill").style.width = (100 * share).toFixed(1) + "%";
    $("aud-sample").textContent = doc.sample.join(", ") || "(nobody)";
    show($("aud-result"), true);
  } catch (e) {
    $("aud-error").textContent = e.message;
    show($("aud-error"), true);
    show($("aud-result"), false);
  }
}

// --- tabs and key ---
function switchTab(name) {
  document.querySelectorAll(".tab").forEach((t) => t.classList.toggle("active", t.dataset.tab === name));
  show($("panel-inspect"), name === "inspect");
  show($("panel-versions"), name === "versions");
  show($("panel-audiences"), name === "audiences");
  if (name === "versions") loadVersions().catch((e) => { $("versions-summary").textContent = e.message; });
  if (name === "audiences") loadAudiences().catch((e) => { $("aud-info").textContent = e.message; });
}

document.querySelectorAll(".tab").forEach((t) => t.addEventListener("click", () => switchTab(t.dataset.tab)));
$("lookup-form").addEventListener("submit", lookup);
$("aud-form").addEventListener("submit", estimateAudience);
$("aud-add").addEventListener("click", () => { addTerm(); buildExpression(); });
$("key-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  state.apiKey = $("api-key").value || null;
  $("api-key").value = "";
  show($("key-bar"), false);
  loadVersions().catch(() => {});
  if (!$("panel-audiences").hidden) loadAudiences().catch((e) => { $("aud-info").textContent = e.message; });
});
// placeholders from the served document: the model's own fields and a user of the feature store
async function loadExamples() {
  const doc = await fetch("openapi.json").then((r) => r.json());
  const schemas = (doc.components || {}).schemas || {};
  const answer = ((schemas.TagResponse || {}).examples || [])[0];
  const request = ((schemas.TagRequest || {}).examples || []).find((e) => e.features);
  if (answer && answer.user_id) $("user-id").placeholder = answer.user_id;
  if (request) $("features").placeholder = JSON.stringify(request.features);
}

refreshStatus();
loadVersions().catch(() => {});
loadExamples().catch(() => {});
