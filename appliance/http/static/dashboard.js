// The terratile dashboard: status, recent scenes on a map, drift, models, nearest cells.
// Follows the node through server-sent events (/api/events); everything else is JSON.
"use strict";

const TOKEN_KEY = "terratile_token";
const state = { scenes: [], selected: null, overlays: new Map(), footprints: null,
                lastCounts: null, lastModel: null, chart: null };

function token() { return sessionStorage.getItem(TOKEN_KEY) || ""; }

function headers() {
  const t = token();
  return t ? { Authorization: "Bearer " + t } : {};
}

async function getJSON(url) {
  const response = await fetch(url, { headers: headers() });
  if (!response.ok) throw new Error(url + ": " + response.status);
  return response.json();
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v; else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

function pct(x) { return (100 * x).toFixed(0) + " %"; }

// -- status -----------------------------------------------------------------------------

function card(label, value, cls = "") {
  return el("div", { class: "card " + cls }, el("b", {}, value), el("span", {}, label));
}

function renderStatus(view) {
  const s = view.status;
  document.getElementById("node").textContent = s.node_id;
  const badge = document.getElementById("state");
  badge.textContent = s.state;
  badge.className = "badge " + s.state;
  const mqtt = view.mqtt_connected === null ? "off" : view.mqtt_connected ? "connected" : "disconnected";
  const size = (mb) => mb >= 1024 ? (mb / 1024).toFixed(1) + " GB" : Math.round(mb) + " MB";
  const disks = Object.entries(view.disk_free_mb).map(([k, v]) => `${k} ${size(v)}`).join(", ");
  const ready = view.readiness.ready;
  const cards = [
    card("model", s.model ? `${s.model.name} v${s.model.version}` : "none"),
    card("providers", s.providers.map(p => p.replace("ExecutionProvider", "")).join(", ") || "–"),
    card("MQTT", mqtt, view.mqtt_connected === false ? "bad" : view.mqtt_connected ? "ok" : ""),
    card("queue", s.queue_depth),
    card("outbox", view.outbox_depth),
    card("done / failed", `${s.counts.done || 0} / ${s.counts.failed || 0}`),
    card("disk free", disks || "–"),
    card("ready", ready ? "yes" : "no: " + view.readiness.checks.filter(c => !c.ok).map(c => c.name).join(", "),
         ready ? "ok" : "bad"),
    card("index", view.index_vectors === null ? "off" : view.index_vectors + " cells"),
    card("drift", s.drift ? (s.drift.drifting ? "drifting" : "stable") + (s.drift.adapting ? ", adapting" : "") : "off",
         s.drift && s.drift.drifting ? "bad" : ""),
  ];
  document.getElementById("status").replaceChildren(...cards);
  const counts = JSON.stringify(s.counts);
  const model = s.model ? s.model.version : null;
  if (counts !== state.lastCounts) { state.lastCounts = counts; loadScenes(); }
  if (model !== state.lastModel) { state.lastModel = model; loadModels(); }
}

// -- map and scenes ---------------------------------------------------------------------

const map = L.map("map", { worldCopyJump: true }).setView([20, 0], 2);
state.footprints = L.layerGroup().addTo(map);
L.control.scale().addTo(map);

function sceneAt(latlng) {
  return state.scenes.find(s => s.bounds_wgs84 && s.overlay &&
    latlng.lng >= s.bounds_wgs84[0] && latlng.lng <= s.bounds_wgs84[2] &&
    latlng.lat >= s.bounds_wgs84[1] && latlng.lat <= s.bounds_wgs84[3]);
}

async function showOverlay(scene) {
  if (!scene.overlay || state.overlays.has(scene.scene_id)) return;
  const info = await getJSON(`/api/scenes/${scene.scene_id}/overlay`);
  const layer = L.imageOverlay(`/api/scenes/${scene.scene_id}/overlay.png`, info.bounds,
                               { opacity: 0.75, interactive: true, className: "landuse" });
  layer.addTo(map);
  state.overlays.set(scene.scene_id, layer);
}

function select(scene, fit = true) {
  state.selected = scene.scene_id;
  for (const li of document.querySelectorAll("#scenes li")) {
    li.classList.toggle("selected", li.dataset.scene === scene.scene_id);
  }
  if (scene.bounds_wgs84) {
    const [w, s, e, n] = scene.bounds_wgs84;
    if (fit) map.fitBounds([[s, w], [n, e]], { padding: [20, 20] });
    showOverlay(scene).catch(err => console.warn(err.message));
  }
}

function sceneItem(scene) {
  const top = Object.entries(scene.classes).sort((a, b) => b[1] - a[1]).slice(0, 3)
    .map(([k, v]) => `${k} ${pct(v)}`).join(", ");
  const picture = scene.quicklook
    ? el("img", { src: `/api/scenes/${scene.scene_id}/quicklook.png`, alt: "quicklook", loading: "lazy" })
    : el("img", { alt: "" });
  const detail = scene.state === "failed"
    ? el("small", { class: "failed" }, `failed: ${scene.reason} — ${scene.message || ""}`)
    : el("small", {}, scene.state === "done"
        ? `${top}; confidence ${pct(scene.mean_confidence)}; ${scene.seconds ? scene.seconds.toFixed(1) + " s" : ""}`
        : scene.state);
  const li = el("li", { "data-scene": scene.scene_id }, picture,
                el("div", {}, el("b", {}, scene.source), detail,
                   el("small", {}, new Date(scene.updated).toLocaleString())));
  li.addEventListener("click", () => select(scene));
  return li;
}

async function loadScenes() {
  const scenes = await getJSON("/api/scenes");
  state.scenes = scenes;
  document.getElementById("scenes").replaceChildren(...scenes.map(sceneItem));
  state.footprints.clearLayers();
  for (const s of scenes) {
    if (!s.bounds_wgs84) continue;
    const [w, so, e, n] = s.bounds_wgs84;
    L.rectangle([[so, w], [n, e]], { weight: 1, color: "#2b6cb0", fill: false, interactive: false })
      .bindTooltip(s.source).addTo(state.footprints);
  }
  const done = scenes.filter(s => s.state === "done" && s.bounds_wgs84);
  if (done.length && !state.selected) select(done[0]);
  for (const s of done.slice(0, 10)) showOverlay(s).catch(err => console.warn(err.message));
  renderDrift(scenes);
}

// -- nearest cells ----------------------------------------------------------------------

map.on("click", async (event) => {
  const scene = sceneAt(event.latlng);
  if (!scene) return;
  const { lat, lng } = event.latlng;
  document.getElementById("query").textContent =
    `around ${lat.toFixed(5)}, ${lng.toFixed(5)} in ${scene.source}`;
  const box = document.getElementById("neighbours");
  box.replaceChildren(el("p", { class: "hint" }, "searching…"));
  try {
    const reply = await getJSON(`/api/scenes/${scene.scene_id}/neighbours?lon=${lng}&lat=${lat}&k=8`);
    if (reply.error) { box.replaceChildren(el("p", { class: "hint" }, reply.error.message)); return; }
    box.replaceChildren(...reply.results.map(hit => {
      const src = hit.window
        ? `/api/scenes/${hit.scene_id}/thumbnail.png?window=${hit.window.join(",")}` : null;
      const img = src ? el("img", { src, alt: hit.class || "cell" }) : el("img", { alt: "" });
      img.addEventListener("error", () => { img.removeAttribute("src"); img.alt = "not kept"; });
      return el("figure", { class: "hit" }, img,
                el("figcaption", {}, `${hit.class || "?"} · ${hit.score.toFixed(3)}`,
                   el("br"), hit.source));
    }));
    if (!reply.results.length) box.replaceChildren(el("p", { class: "hint" }, "no other cells indexed yet"));
  } catch (err) {
    box.replaceChildren(el("p", { class: "hint" }, err.message));
  }
});

// -- drift ------------------------------------------------------------------------------

function renderDrift(scenes) {
  const scored = scenes.filter(s => s.drift).slice().reverse();
  const box = document.getElementById("drift");
  if (!scored.length) { box.replaceChildren(el("p", { class: "hint" }, "no drift scores yet")); state.chart = null; return; }
  const xs = scored.map(s => new Date(s.updated).getTime() / 1000);
  const data = [xs, scored.map(s => s.drift.psi), scored.map(s => s.drift.mmd),
                scored.map(s => s.drift.mean_max_prob)];
  const options = {
    width: Math.max(280, box.clientWidth - 10), height: 240,
    series: [{}, { label: "PSI", stroke: "#c53030" }, { label: "MMD²", stroke: "#2b6cb0" },
             { label: "mean max prob", stroke: "#1f8a4c", scale: "p" }],
    axes: [{}, {}, { scale: "p", side: 1, grid: { show: false } }],
    scales: { p: { range: [0, 1] } },
  };
  if (state.chart) state.chart.destroy();
  box.replaceChildren();
  state.chart = new uPlot(options, data, box);
}

// -- models -----------------------------------------------------------------------------

function figure(v) {
  return Number.isInteger(v) ? String(v) : Math.abs(v) < 0.001 ? v.toExponential(1) : v.toFixed(3);
}

function gateText(m) {
  if (!m.gate) {
    const figures = Object.entries(m.figures).map(([k, v]) => `${k} ${figure(v)}`).join(", ");
    return el("span", {}, figures || "exported");
  }
  const nums = Object.entries(m.gate).filter(([, v]) => typeof v === "number")
    .map(([k, v]) => `${k} ${figure(v)}`).join(", ");
  return el("span", { class: m.gate.passed ? "gate-pass" : "gate-fail" },
            (m.gate.passed ? "passed" : "failed") + (nums ? ": " + nums : ""));
}

async function loadModels() {
  const data = await getJSON("/api/models");
  const rows = data.versions.map(m => el("tr", { class: m.active ? "active" : "", "data-version": m.version },
    el("td", {}, `v${m.version}${m.active ? " (running)" : ""}`), el("td", {}, m.parent ? `v${m.parent}` : "–"),
    el("td", {}, new Date(m.created).toLocaleString()), el("td", {}, m.notes), el("td", {}, gateText(m))));
  document.querySelector("#models tbody").replaceChildren(...rows);
  const button = document.getElementById("rollback");
  button.disabled = !data.writes_enabled || data.versions.length < 2;
  button.title = data.writes_enabled ? "run the previous version" : "set http.token_file to enable";
}

document.getElementById("rollback").addEventListener("click", async () => {
  const msg = document.getElementById("model-msg");
  if (!token()) { msg.textContent = "enter the access token first"; return; }
  msg.textContent = "rolling back…";
  const response = await fetch("/api/models/rollback", { method: "POST", headers: headers() });
  const body = await response.json();
  if (!response.ok) { msg.textContent = body.error; return; }
  msg.textContent = body.changed ? `now running v${body.model.version}`
    : body.done ? "nothing to roll back to" : "queued behind the current scene";
  loadModels();
});

// -- token and live updates -------------------------------------------------------------

document.getElementById("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const value = document.getElementById("token").value.trim();
  sessionStorage.setItem(TOKEN_KEY, value);
  document.cookie = `${TOKEN_KEY}=${encodeURIComponent(value)}; path=/; SameSite=Strict`;
  document.getElementById("token").value = "";
  document.getElementById("model-msg").textContent = value ? "token set" : "token cleared";
  connect();
});

let source = null;
function connect() {
  if (source) source.close();
  const live = document.getElementById("live");
  source = new EventSource("/api/events");
  source.addEventListener("status", (event) => {
    live.textContent = "● live"; live.classList.add("on");
    renderStatus(JSON.parse(event.data));
  });
  source.addEventListener("error", () => { live.textContent = "○ reconnecting"; live.classList.remove("on"); });
}

connect();
