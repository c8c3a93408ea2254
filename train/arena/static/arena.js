// The arena page: ask, watch both answers grow, vote, see the reveal. Text is only ever set with textContent.
"use strict";
const $ = (id) => document.getElementById(id);
let battleId = null, timer = null;

function say(text) { $("message").textContent = text || ""; }

async function api(path, options) {
  const resp = await fetch(path, Object.assign({ credentials: "same-origin" }, options || {}));
  let body = {};
  try { body = await resp.json(); } catch (e) { body = { error: "the server answered " + resp.status }; }
  if (!resp.ok) throw new Error(body.error || ("the server answered " + resp.status));
  return body;
}

async function loadInfo() {
  const info = await api("/api/info");
  $("n-models").textContent = String(info.n_models);
  for (const p of info.probes) {
    const opt = document.createElement("option");
    opt.value = p.id;
    opt.textContent = p.kind + ": " + p.question;
    opt.dataset.kind = p.kind;
    opt.dataset.question = p.question;
    $("probe").appendChild(opt);
  }
}

function preview() {
  const box = $("media-preview");
  box.replaceChildren();
  const file = $("file").files[0], probe = $("probe").selectedOptions[0];
  let src = null, kind = null;
  if (file) { src = URL.createObjectURL(file); kind = file.type.startsWith("audio") ? "audio" : "image"; }
  else if (probe && probe.value) {
    src = "/api/probes/" + encodeURIComponent(probe.value) + "/media"; kind = probe.dataset.kind;
    if (!$("prompt").value) $("prompt").value = probe.dataset.question;
  }
  if (!src) return;
  const el = document.createElement(kind === "audio" ? "audio" : "img");
  if (kind === "audio") el.controls = true; else el.alt = "attached image";
  el.src = src;
  box.appendChild(el);
}

function setVoting(enabled) {
  for (const b of document.querySelectorAll(".votes button")) b.disabled = !enabled;
}

function show(state) {
  for (const [k, side] of [[0, "left"], [1, "right"]]) {
    $("answer-" + side).textContent = state.answers[k];
    const bar = $("progress-" + side);
    bar.max = state.max_tokens;
    bar.value = state.done[k] ? state.max_tokens : state.tokens[k];
  }
  if (state.error) { say(state.error); stop(); return; }
  const done = state.done[0] && state.done[1];
  if (done) stop();
  setVoting(done && !state.voted);
  $("vote-status").textContent = done ? (state.voted ? "" : "Both answers are complete: vote.") : "Answering...";
}

function stop() { if (timer) { clearInterval(timer); timer = null; } }

async function poll() {
  try { show(await api("/api/battles/" + battleId)); } catch (e) { say(e.message); stop(); }
}

async function ask(event) {
  event.preventDefault();
  say("");
  const form = new FormData();
  form.append("prompt", $("prompt").value);
  if ($("file").files[0]) form.append("file", $("file").files[0]);
  if ($("probe").value) form.append("probe", $("probe").value);
  $("ask").disabled = true;
  try {
    const made = await api("/api/battles", { method: "POST", body: form });
    battleId = made.id;
    $("battle").hidden = false;
    for (const side of ["left", "right"]) { $("reveal-" + side).textContent = ""; $("answer-" + side).textContent = ""; }
    setVoting(false);
    stop();
    timer = setInterval(poll, 250);
    poll();
  } catch (e) { say(e.message); }
  finally { $("ask").disabled = false; }
}

async function vote(choice) {
  setVoting(false);
  try {
    const r = await api("/api/battles/" + battleId + "/vote", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ choice: choice }) });
    $("reveal-left").textContent = "A was " + r.reveal.left + " (certificate " + r.reveal.left_cert.slice(0, 12) + ")";
    $("reveal-right").textContent = "B was " + r.reveal.right + " (certificate " + r.reveal.right_cert.slice(0, 12) + ")";
    $("vote-status").textContent = "Vote recorded (#" + r.reveal.seq + "). Ask again for a new battle.";
  } catch (e) { $("vote-status").textContent = e.message; }
}

document.addEventListener("DOMContentLoaded", () => {
  $("prompt-form").addEventListener("submit", ask);
  $("file").addEventListener("change", () => { $("probe").value = ""; preview(); });
  $("probe").addEventListener("change", () => { $("file").value = ""; preview(); });
  for (const b of document.querySelectorAll(".votes button")) b.addEventListener("click", () => vote(b.dataset.choice));
  loadInfo().catch((e) => say(e.message));
});
// the tests vote twice on one battle, and render a half-answered battle, through the page's own code
window.arenaVote = vote;
window.arenaShow = show;
