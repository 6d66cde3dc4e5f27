// Kozan HMI page: renders the station's snapshots (server-sent events), sends operator actions,
// and opens technician settings behind a PIN. No build step: plain modern JavaScript.
"use strict";

const $ = (id) => document.getElementById(id);
let dict = {}, fallback = {}, lang = "en";
let snap = null, es = null, lastEvent = 0, imgBusy = false, shownSeq = -1;
let session = sessionStorage.getItem("kozan_session") || "";
let pin = "";

// ---- translations: every visible string comes from i18n/<lang>.json -------------------------
function t(key, vars) {
  let s = dict[key] ?? fallback[key] ?? key;
  if (vars) for (const [k, v] of Object.entries(vars)) s = s.replaceAll(`{${k}}`, v);
  return s;
}
async function loadLang(code) {
  const r = await fetch(`/api/i18n/${code}`);
  if (!r.ok) return false;
  dict = await r.json();
  lang = code;
  localStorage.setItem("kozan_lang", code);
  document.documentElement.lang = code;
  document.querySelectorAll("[data-i18n]").forEach((el) => { el.textContent = t(el.dataset.i18n); });
  document.querySelectorAll("#langs .btn").forEach((b) => b.setAttribute("aria-pressed", String(b.dataset.lang === code)));
  setConn(!$("conn").classList.contains("lost"));
  if (snap) render(snap);
  if (typeof refreshLot === "function") refreshLot();   // lot.js: its badge and dialog in the new language
  if (!$("tech-panel").hidden) loadSettings();
  return true;
}
async function initLangs() {
  const r = await (await fetch("/api/i18n")).json();
  fallback = await (await fetch("/api/i18n/en")).json();
  const box = $("langs");
  for (const l of r.languages) {
    const b = document.createElement("button");
    b.className = "btn btn-secondary"; b.dataset.lang = l.code; b.textContent = l.name;
    b.dataset.testid = `lang-${l.code}`; b.setAttribute("data-testid", `lang-${l.code}`);
    b.onclick = () => loadLang(l.code);
    box.appendChild(b);
  }
  const want = localStorage.getItem("kozan_lang") || r.default;
  if (!(await loadLang(want))) await loadLang("en");
}

// ---- live updates -----------------------------------------------------------------------------
function setConn(ok) {
  $("conn").classList.toggle("lost", !ok);
  $("conn-text").textContent = t(ok ? "conn.live" : "conn.lost");
}
function connect() {
  if (es) es.close();
  es = new EventSource("/api/events");
  es.addEventListener("state", (ev) => { lastEvent = Date.now(); setConn(true); snap = JSON.parse(ev.data); render(snap); });
  es.onerror = () => {
    setConn(false);
    // EventSource retries by itself, except after an HTTP error: then start over
    if (es.readyState === EventSource.CLOSED) setTimeout(connect, 2000);
  };
}
setInterval(() => {   // a silent stream (server gone without closing) counts as lost
  if (Date.now() - lastEvent > 6000) { setConn(false); connect(); lastEvent = Date.now(); }
}, 2000);

function loadPreview(seq) {
  if (imgBusy || seq === shownSeq || seq <= 0) return;
  imgBusy = true;
  const img = $("live-img");
  img.onload = () => { imgBusy = false; shownSeq = seq; $("live-none").hidden = true; };
  img.onerror = () => { imgBusy = false; };
  img.src = `/api/preview.jpg?s=${seq}`;
}

// ---- rendering --------------------------------------------------------------------------------
const SEV_ICONS = { fault: "✖", warning: "⚠", info: "i" };
function binName(b) { return dict[`bin.${b.bin}`] ?? b.name; }
function className(c) { return t(`class.${c}`) === `class.${c}` ? c : t(`class.${c}`); }
// Values the server sends as codes (a class, a line state, an action) are shown in the page's language.
const PARAM_KEYS = { class: (v) => className(v), state: (v) => t(`state.${v}`), action: (v) => t(`btn.${v}`) };
function localParams(params) {
  const out = {};
  for (const [k, v] of Object.entries(params || {})) out[k] = v == null ? "?" : (PARAM_KEYS[k] ? PARAM_KEYS[k](v) : v);
  return out;
}
// A template of this language filled with the server's parameters; null where the language has no such
// template or a placeholder stays unfilled (then the caller shows the server's English text).
function fromTemplate(key, params) {
  if (dict[key] == null) return null;
  const s = t(key, localParams(params));
  return /\{[a-z_]+\}/.test(s) ? null : s;
}
function alarmDetail(a) {
  return fromTemplate(`alarm_detail.${a.detail || a.code}`, { message: a.message, ...a.params }) ?? a.message;
}
function el(tag, cls, text) { const e = document.createElement(tag); if (cls) e.className = cls; if (text != null) e.textContent = text; return e; }

// Lists with buttons in them are updated in place, keyed by entry: a node is rebuilt only when what it
// shows changed, and nodes that stay are never detached. Rebuilding the whole list on every snapshot
// (three a second) swallowed taps: a finger that went down on one button and came up on its
// replacement made no click, and every thumbnail was fetched again.
function syncList(box, items, key, sig, make, makeEmpty) {
  const old = new Map();
  for (const n of [...box.children]) { if (n.dataset.key) old.set(n.dataset.key, n); else n.remove(); }
  const want = [];
  for (const it of items) {
    const k = key(it), sg = JSON.stringify(sig(it));
    let n = old.get(k);
    if (n && n.dataset.sig !== sg) { const m = make(it); n.replaceWith(m); n = m; }
    else if (!n) n = make(it);
    n.dataset.key = k; n.dataset.sig = sg; old.delete(k); want.push(n);
  }
  for (const n of old.values()) n.remove();
  want.forEach((n, i) => { if (box.children[i] !== n) box.insertBefore(n, box.children[i] ?? null); });
  if (!items.length) box.append(makeEmpty());
}

function render(s) {
  const st = $("state");
  st.className = `state state-${s.state}`;
  st.dataset.state = s.state;
  $("state-text").textContent = t(`state.${s.state}`);
  st.title = s.reason || "";
  const can = { start: ["idle", "paused"], pause: ["running"], stop: ["running", "paused"], reset: ["fault", "estop"],
                estop: ["idle", "running", "paused", "fault"] };
  for (const [a, ok] of Object.entries(can)) $(`btn-${a}`).disabled = !ok.includes(s.state);
  $("btn-reset").hidden = !["fault", "estop"].includes(s.state);
  $("btn-start").hidden = !$("btn-reset").hidden;

  $("kpi-throughput").textContent = s.throughput_per_min.toFixed(0);
  $("kpi-total").textContent = s.counters.decided;
  $("kpi-missed").textContent = s.counters.missed;
  $("kpi-fps").textContent = s.fps.toFixed(0);

  renderClasses(s);
  const bins = $("bins"); bins.replaceChildren();
  for (const b of s.bins) {
    const row = el("div", "bin"); row.dataset.bin = b.bin;
    const no = el("div", `bin-no${b.bin === 0 ? " bin-manual" : ""}`, b.bin); no.style.background = `var(--b${b.bin % 5})`;
    const name = el("div", "bin-name", binName(b));
    if (!b.enabled) { name.append(" "); name.append(el("span", "bin-off", `⊘ ${t("bin.off")}`)); }
    const n = el("div", "bin-count", b.count); n.setAttribute("data-testid", `bin-count-${b.bin}`);
    row.append(no, name, n); bins.append(row);
  }

  $("alarm-count").textContent = s.alarms.length || "";
  syncList($("alarms"), s.alarms, (a) => `a${a.id}`, (a) => [lang, a.severity, a.code, a.count, a.message, a.detail, a.params], (a) => {
    const li = el("li", `alarm sev-${a.severity}`); li.dataset.code = a.code; li.setAttribute("data-testid", `alarm-${a.code}`);
    const body = el("div");
    const title = el("div", "alarm-title", `${t(`severity.${a.severity}`)}: ${t(`alarm.${a.code}`)} `);
    if (a.count > 1) title.append(el("span", "pill", t("alarm.times", { n: a.count })));
    const msg = el("div", "alarm-msg", alarmDetail(a)); msg.title = a.message;
    body.append(title, msg);
    const btn = el("button", "btn", t("btn.ack")); btn.setAttribute("data-testid", `ack-${a.id}`);
    btn.onclick = () => act(`/api/alarms/${a.id}/ack`);
    li.append(el("div", "alarm-icon", SEV_ICONS[a.severity] || "⚠"), body, btn);
    return li;
  }, () => el("li", "empty", `✓ ${t("alarms.none")}`));

  syncList($("recent"), s.recent, (it) => `i${it.track_id}`,
           (it) => [lang, s.capture, it.bin, it.outcome, it.reason, it.class, it.confidence, it.thumb, it.flagged], (it) => {
    const li = el("li", `item${it.bin === 0 ? " manual" : ""}${it.outcome === "missed" ? " missed" : ""}`);
    li.style.borderTopColor = `var(--b${it.bin % 5})`;
    li.setAttribute("data-testid", "recent-item");
    if (it.thumb) { const img = el("img"); img.src = `/api/thumb/${it.track_id}.jpg`; img.alt = className(it.class); li.append(img); }
    else li.append(el("div", "noimg"));
    const tx = el("div", "item-txt");
    tx.append(el("div", "item-bin", `B${it.bin} · #${it.track_id}`), el("div", "", `${className(it.class)} ${Math.round(it.confidence * 100)}%`));
    const why = it.outcome === "missed" ? t("outcome.missed") : t(`reason.${it.reason}`);
    tx.append(el("div", "", why)); li.append(tx);
    // operator: "this one went to the wrong bin" -> its frame is captured for relabelling
    // a 48 px flag over the thumbnail (a gloved finger's target), offered only while capture is on
    if (s.capture) {
      const wb = el("button", `btn btn-flag${it.flagged ? " flagged" : ""}`, "⚑");
      wb.title = t("btn.wrong_bin"); wb.setAttribute("aria-label", t("btn.wrong_bin"));
      wb.setAttribute("data-testid", `wrong-bin-${it.track_id}`); wb.disabled = !!it.flagged;
      wb.onclick = async () => {
        wb.disabled = true;   // one touch, one capture: a second tap while the request is out does nothing
        const r = await act(`/api/items/${it.track_id}/wrong-bin`, { note: "" });
        if (r) { wb.classList.add("flagged"); toast(t("recent.flagged", { id: it.track_id }), true); }
        else wb.disabled = false;
      };
      li.append(wb);
    }
    return li;
  }, () => el("li", "empty", t("recent.none")));
  $("manual-pending").textContent = s.manual_next > 0 ? t("manual_pending", { n: s.manual_next }) : "";
  loadPreview(s.preview_seq);
  if ($("dlg-shift").open) renderShift(s);
}

// per class, on the main screen: the live view's short code (its legend), the name in this language,
// the count; the colour is the bin the class's rule sends it to
function renderClasses(s) {
  const box = $("classes"); if (!box) return;
  const list = s.classes || [];
  const sig = JSON.stringify([lang, list]);
  if (box.dataset.sig === sig) return;
  box.dataset.sig = sig; box.replaceChildren();
  for (const c of list) {
    const row = el("div", "cls"); row.setAttribute("data-testid", `class-count-${c.class}`);
    row.style.borderLeftColor = c.bin == null ? "var(--line)" : `var(--b${c.bin % 5})`;
    row.append(el("span", "cls-code", c.short), el("span", "cls-name", className(c.class)), el("span", "cls-count", c.count));
    row.title = `${className(c.class)} (${c.short})`;
    box.append(row);
  }
}

function kvTable(obj, label) {
  const tb = el("table", "kv");
  for (const [k, v] of Object.entries(obj)) { const tr = el("tr"); tr.append(el("td", "", label(k)), el("td", "", v)); tb.append(tr); }
  return tb;
}
function fmtDur(s) { const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60); return `${h}:${String(m).padStart(2, "0")}`; }
function renderShift(s) {
  const sh = s.shift, box = $("shift-body"); box.replaceChildren();
  const g = el("div", "shift-grid");
  const k = (l, v) => { const d = el("div", "kpi"); d.append(el("div", "kpi-v", v), el("div", "kpi-l", t(l))); return d; };
  g.append(k("shift.started", sh.started), k("shift.elapsed", fmtDur(sh.elapsed_s)), k("shift.running", fmtDur(sh.running_s)),
           k("shift.items", sh.items), k("shift.missed", sh.missed), k("shift.avg", sh.avg_per_min));
  box.append(g);
  const cols = el("div", "cols");
  const c1 = el("div"), c2 = el("div");
  const names = Object.fromEntries(s.bins.map((b) => [String(b.bin), binName(b)]));
  c1.append(el("h3", "", t("shift.per_bin")), kvTable(sh.per_bin, (b) => `B${b} ${names[b] ?? ""}`));
  c1.append(el("h3", "", t("shift.alarms")), kvTable(sh.alarms, (c) => t(`alarm.${c}`)));
  c2.append(el("h3", "", t("shift.per_class")), kvTable(s.counters.per_class, className));
  const manual = Object.fromEntries(Object.entries(sh.reasons).filter(([r]) => r !== "rule"));
  c2.append(el("h3", "", t("shift.reasons")), kvTable(manual, (r) => t(`reason.${r}`)));
  cols.append(c1, c2); box.append(cols);
}

// ---- actions ------------------------------------------------------------------------------------
function toast(msg, ok) {
  const tt = $("toast"); tt.textContent = msg; tt.className = ok ? "toast ok" : "toast"; tt.hidden = false;
  clearTimeout(toast.timer); toast.timer = setTimeout(() => { tt.hidden = true; }, 4000);
}
async function act(url, body, tech) {
  const headers = { "Content-Type": "application/json" };
  if (tech) headers["X-Kozan-Session"] = session;
  const r = await fetch(url, { method: "POST", headers, body: JSON.stringify(body ?? {}) });
  let data = null; try { data = await r.json(); } catch (e) { /* empty body */ }
  if (!r.ok) {
    const own = data && data.code ? fromTemplate(`error.${data.code}`, data.params) : null;
    toast(own ?? t("error.generic", { msg: (data && (data.detail || data.error)) || r.status }));
    return null;
  }
  return data;
}
document.querySelectorAll(".controls .btn").forEach((b) => { b.onclick = () => act(`/api/line/${b.dataset.action}`); });
$("btn-manual").onclick = () => act("/api/manual-next", { n: 1 });
$("btn-shift").onclick = () => { if (snap) renderShift(snap); $("dlg-shift").showModal(); };
document.querySelectorAll(".dlg-close").forEach((b) => { b.onclick = () => b.closest("dialog").close(); });

// ---- technician ---------------------------------------------------------------------------------
function showPin() { $("pin-display").textContent = "●".repeat(pin.length) || "\u00a0"; }
function buildKeypad() {
  const kp = $("keypad");
  const keys = ["1", "2", "3", "4", "5", "6", "7", "8", "9", "clear", "0", "enter"];
  for (const k of keys) {
    const b = el("button", "btn"); b.setAttribute("data-testid", `key-${k}`);
    if (k === "clear") { b.textContent = "⌫"; b.setAttribute("aria-label", t("btn.clear")); b.onclick = () => { pin = ""; showPin(); }; }
    else if (k === "enter") { b.textContent = "✔"; b.classList.add("ctl-start"); b.setAttribute("aria-label", t("btn.enter")); b.onclick = login; }
    else { b.textContent = k; b.onclick = () => { if (pin.length < 12) pin += k; showPin(); }; }
    kp.append(b);
  }
}
async function login() {
  const r = await fetch("/api/tech/login", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ pin }) });
  const data = await r.json();
  pin = ""; showPin();
  const msg = $("pin-msg");
  if (r.status === 200) { session = data.session; sessionStorage.setItem("kozan_session", session); msg.textContent = ""; await loadSettings(); return; }
  if (r.status === 401) msg.textContent = `✖ ${t("tech.wrong", { n: data.tries_left })}`;
  else if (r.status === 429) msg.textContent = `⏳ ${t("tech.locked", { s: data.retry_after_s })}`;
  else if (r.status === 503) msg.textContent = t("tech.not_configured");
  else msg.textContent = t("error.generic", { msg: data.error || r.status });
}
let settings = null;
async function loadSettings() {
  const r = await fetch("/api/tech/settings", { headers: { "X-Kozan-Session": session } });
  if (!r.ok) { session = ""; sessionStorage.removeItem("kozan_session"); $("tech-login").hidden = false; $("tech-panel").hidden = true; return; }
  settings = await r.json();
  $("tech-login").hidden = true; $("tech-panel").hidden = false;
  $("v-min_confidence").textContent = settings.rules.min_confidence.toFixed(2);
  $("v-min_views").textContent = settings.rules.min_views;
  const dv = $("tech-diverters"); dv.replaceChildren();
  for (const d of settings.diverters) {
    const b = el("button", "btn toggle", `${d.enabled ? "✔" : "⊘"} D${d.id} → B${d.bin}: ${t(d.enabled ? "tech.enabled" : "tech.disabled")}`);
    b.setAttribute("aria-pressed", String(d.enabled)); b.setAttribute("data-testid", `div-${d.id}`);
    b.onclick = () => saveSettings({ diverters: settings.diverters.map((x) => (x.id === d.id ? { ...x, enabled: !x.enabled } : x)) });
    dv.append(b);
  }
  const rules = $("tech-rules"); rules.replaceChildren();
  const bins = Object.keys(settings.rules.bin_names).map(Number);
  for (const [cls, b] of Object.entries(settings.rules.class_to_bin)) {
    const row = el("div", "row"); const lab = el("label", "", className(cls));
    const sel = el("select"); sel.setAttribute("data-testid", `rule-${cls}`);
    for (const x of bins) { const o = el("option", "", `B${x} ${dict[`bin.${x}`] ?? settings.rules.bin_names[x]}`); o.value = x; o.selected = x === b; sel.append(o); }
    sel.onchange = () => saveSettings({ rules: { class_to_bin: { [cls]: Number(sel.value) } } });
    row.append(lab, sel); rules.append(row);
  }
  const ms = $("tech-model"); ms.replaceChildren();
  for (const m of settings.models.length ? settings.models : [settings.model]) { const o = el("option", "", m); o.value = m; o.selected = m === settings.model; ms.append(o); }
  const au = await fetch("/api/tech/audit", { headers: { "X-Kozan-Session": session } });
  const list = $("tech-audit"); list.replaceChildren();
  if (au.ok) for (const e of (await au.json()).reverse().slice(0, 30)) list.append(el("li", "", `${e.t} ${e.role} ${e.action} ${e.ok ? "✔" : "✖"}`));
}
async function saveSettings(changes) {
  const r = await act("/api/tech/settings", changes, true);
  if (r) { toast(t("tech.saved"), true); await loadSettings(); } else await loadSettings();
}
document.querySelectorAll(".step").forEach((b) => {
  b.onclick = () => {
    const [k, d] = b.dataset.step.split(":");
    let v = settings.rules[k] + Number(d);
    v = k === "min_views" ? Math.max(1, Math.round(v)) : Math.min(1, Math.max(0, Math.round(v * 100) / 100));
    saveSettings({ rules: { [k]: v } });
  };
});
$("btn-model").onclick = async () => { const r = await act("/api/tech/model", { model: $("tech-model").value }, true); if (r) toast(`${t("tech.saved")}: ${r.version}`, true); };
$("btn-logout").onclick = async () => {
  await fetch("/api/tech/logout", { method: "POST", headers: { "X-Kozan-Session": session } });
  session = ""; sessionStorage.removeItem("kozan_session"); $("tech-login").hidden = false; $("tech-panel").hidden = true;
};
$("btn-tech").onclick = async () => { $("pin-msg").textContent = ""; pin = ""; showPin(); $("dlg-tech").showModal(); if (session) await loadSettings(); };

buildKeypad();
initLangs().then(() => { setConn(false); connect(); });
