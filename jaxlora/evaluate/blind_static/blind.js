// Blind rating page. Everything shown comes from the server as text and is put into the page
// with textContent (never innerHTML), so an answer holding markup stays text.
"use strict";

const DIMS = ["accuracy", "completeness", "logic", "fluency"];
const $ = (id) => document.getElementById(id);
const token = new URLSearchParams(location.hash.slice(1)).get("token") || "";
let current = null; // the item on screen
let rows = []; // keyboard rows: 8 score rows then the preference row
let cursor = 0;

function show(id) {
  for (const s of ["start", "rate", "done", "closed", "failure"]) $(s).hidden = s !== id;
}

function fail(message) {
  $("failure-text").textContent = message;
  show("failure");
}

async function api(path, options = {}) {
  const headers = { "X-Session-Token": token, ...(options.headers || {}) };
  const resp = await fetch(path, { ...options, headers });
  const body = await resp.json().catch(() => ({}));
  if (!resp.ok) throw new Error(body.error || `HTTP ${resp.status}`);
  return body;
}

function rater() {
  return $("rater").value.trim();
}

function buildScoreTables() {
  rows = [];
  for (const pos of ["1", "2"]) {
    const table = $(`scores-${pos}`);
    table.textContent = "";
    for (const dim of DIMS) {
      const tr = document.createElement("tr");
      tr.className = "row";
      tr.dataset.pos = pos;
      tr.dataset.dim = dim;
      const name = document.createElement("td");
      name.textContent = dim;
      tr.appendChild(name);
      for (let v = 1; v <= 5; v++) {
        const td = document.createElement("td");
        const label = document.createElement("label");
        const input = document.createElement("input");
        input.type = "radio";
        input.name = `s-${pos}-${dim}`;
        input.value = String(v);
        input.addEventListener("change", () => setCursor(rows.indexOf(tr)));
        label.append(input, ` ${v}`);
        td.appendChild(label);
        tr.appendChild(td);
      }
      table.appendChild(tr);
      rows.push(tr);
    }
  }
  rows.push($("pref"));
}

function setCursor(i) {
  cursor = Math.max(0, Math.min(rows.length - 1, i));
  rows.forEach((r, j) => r.classList.toggle("active", j === cursor));
}

function checked(name) {
  const el = document.querySelector(`input[name="${name}"]:checked`);
  return el ? el.value : null;
}

function choose(name, value) {
  const el = document.querySelector(`input[name="${name}"][value="${value}"]`);
  if (el) el.checked = true;
}

function render(item, state) {
  current = item;
  $("item-no").textContent = `${item.id + 1} of ${item.n}`;
  const prompt = $("prompt");
  prompt.textContent = "";
  for (const m of item.messages) {
    const div = document.createElement("div");
    div.className = "msg";
    const role = document.createElement("span");
    role.className = "role";
    role.textContent = `${m.role}:`;
    div.append(role, m.content);
    prompt.appendChild(div);
  }
  $("ref-box").hidden = item.reference == null;
  $("reference").textContent = item.reference || "";
  $("answer-1").textContent = item.answers[0];
  $("answer-2").textContent = item.answers[1];
  buildScoreTables();
  $("comment").value = "";
  $("status").textContent = "";
  progress(state);
  show("rate");
  setCursor(0);
}

function progress(state) {
  $("progress").textContent = `${state.rated.length} of ${state.n} rated`;
}

async function next() {
  if (!rater()) return show("start");
  const state = await api(`/api/state?rater=${encodeURIComponent(rater())}`);
  progress(state);
  if (state.closed) return show("closed");
  if (state.next === null) return show("done");
  render(await api(`/api/items/${state.next}`), state);
}

async function save() {
  const scores = { 1: {}, 2: {} };
  for (let i = 0; i < 8; i++) {
    const { pos, dim } = rows[i].dataset;
    const v = checked(`s-${pos}-${dim}`);
    if (v === null) {
      setCursor(i);
      $("status").textContent = `Score ${dim} of Answer ${pos} first.`;
      return;
    }
    scores[pos][dim] = Number(v);
  }
  const preference = checked("pref");
  if (preference === null) {
    setCursor(8);
    $("status").textContent = "Choose Answer 1, Answer 2 or tie first.";
    return;
  }
  const body = { item: current.id, rater: rater(), scores, preference, comment: $("comment").value };
  $("save").disabled = true;
  try {
    await api("/api/ratings", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    await next();
  } catch (e) {
    $("status").textContent = `Not saved: ${e.message}`;
  } finally {
    $("save").disabled = false;
  }
}

function onKey(ev) {
  const typing = ev.target instanceof HTMLTextAreaElement ||
    (ev.target instanceof HTMLInputElement && ev.target.type !== "radio");
  if (typing) {
    if (ev.key === "Escape") ev.target.blur();
    if (ev.key === "Enter" && ev.target.id === "comment" && (ev.ctrlKey || ev.metaKey)) save();
    if (ev.key === "Enter" && ev.target.id === "rater") start();
    return;
  }
  if ($("rate").hidden || ev.ctrlKey || ev.metaKey || ev.altKey) return;
  const key = ev.key.toLowerCase();
  const row = rows[cursor];
  if (/^[1-5]$/.test(key) && row && row.dataset.dim) {
    choose(`s-${row.dataset.pos}-${row.dataset.dim}`, key);
    setCursor(cursor + 1);
  } else if (key === "a" || key === "b" || key === "t") {
    choose("pref", { a: "1", b: "2", t: "tie" }[key]);
    setCursor(8);
  } else if (key === "arrowdown" || key === "j") {
    setCursor(cursor + 1);
  } else if (key === "arrowup" || key === "k") {
    setCursor(cursor - 1);
  } else if (key === "c") {
    $("comment").focus();
  } else if (key === "enter") {
    save();
  } else {
    return;
  }
  ev.preventDefault();
}

function start() {
  if (!rater()) {
    $("rater").focus();
    return;
  }
  localStorage.setItem("jaxlora-blind-rater", rater());
  $("rater").blur();
  next().catch((e) => fail(e.message));
}

window.addEventListener("DOMContentLoaded", () => {
  if (!token) return fail("Open the address printed by `jaxlora blind serve` (it carries the session token).");
  $("rater").value = localStorage.getItem("jaxlora-blind-rater") || "";
  $("rater").addEventListener("change", start);
  $("begin").addEventListener("click", start);
  $("save").addEventListener("click", save);
  document.addEventListener("keydown", onKey);
  if (rater()) start();
  else show("start");
});
