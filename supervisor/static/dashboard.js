// The dashboard: one EventSource on /v1/stream; each "view" message redraws
// the tables. Text goes in with textContent only, never as HTML.
"use strict";

const csrf = document.querySelector('meta[name="csrf-token"]').content;
const operator = document.querySelector('meta[name="access"]').content === "operate";
if (operator) document.body.classList.add("operator");

function cell(text, cls) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined ? "" : String(text);
  if (cls) td.className = cls;
  return td;
}

function fill(tbody, rows) {
  tbody.replaceChildren(...rows);
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "";
  const s = Math.floor(seconds);
  if (s < 60) return s + "s";
  if (s < 3600) return Math.floor(s / 60) + "m" + (s % 60) + "s";
  return Math.floor(s / 3600) + "h" + Math.floor((s % 3600) / 60) + "m";
}

function scaleCell(role, target) {
  const td = document.createElement("td");
  td.className = "op";
  const input = document.createElement("input");
  input.type = "number"; input.min = "0"; input.max = "1000"; input.value = target;
  input.className = "scale";
  const button = document.createElement("button");
  button.textContent = "set";
  button.addEventListener("click", async () => {
    const res = await fetch("/v1/roles/" + encodeURIComponent(role) + "/scale", {
      method: "POST",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
      body: JSON.stringify({ n: Number(input.value) }),
    });
    if (!res.ok) alert((await res.json()).error);
  });
  td.append(input, button);
  return td;
}

function render(view) {
  // How many live views this page has drawn (read by bench/dashboard.py).
  document.body.dataset.views = String(Number(document.body.dataset.views || 0) + 1);
  document.getElementById("backend").textContent = "backend: " + (view.backend || "");

  fill(document.querySelector("#roles tbody"), Object.entries(view.roles).map(([name, r]) => {
    const tr = document.createElement("tr");
    tr.dataset.role = name;
    tr.append(cell(name), cell(r.target, "target"), cell(r.idle, "idle"), cell(r.active, "active"),
      cell(r.starting, "starting"), cell(r.backoff), cell(r.failed, "failed"),
      cell(r.degraded ? "degraded" : "no", r.degraded ? "degraded" : ""),
      cell(r.model), cell(r.memory_mib ? r.memory_mib + " MiB" : ""), scaleCell(name, r.target));
    return tr;
  }));

  document.getElementById("agent-count").textContent = "(" + view.agents.length + ")";
  fill(document.querySelector("#agents tbody"), view.agents.map((a) => {
    const tr = document.createElement("tr");
    tr.dataset.vm = a.name;
    if (a.agent) tr.dataset.agent = a.agent;
    // A view comes only when something changes: the page counts uptime on by itself.
    const uptime = cell(duration(a.uptime), "uptime");
    uptime.dataset.since = String(Date.now() / 1000 - (a.uptime || 0));
    tr.append(cell(a.name), cell(a.agent), cell(a.role), cell(a.state, "state-" + a.state),
      uptime, cell(a.restarts), cell(a.backend && a.backend.split(" ")[0]),
      cell(a.memory_mib ? a.memory_mib + " MiB" : ""));
    return tr;
  }));

  const counts = view.tasks || {};
  document.getElementById("task-counts").textContent =
    Object.entries(counts).map(([k, v]) => k + " " + v).join(" · ");
  fill(document.querySelector("#tasks tbody"), view.queue.map((t) => {
    const tr = document.createElement("tr");
    tr.dataset.task = t.id;
    tr.dataset.state = t.state;
    tr.append(cell(t.id), cell(t.role), cell(t.state, "state-" + t.state),
      cell(t.prompt, "prompt"));
    return tr;
  }));

  const scopes = (view.budget && view.budget.scopes) || {};
  const entries = Object.entries(scopes);
  document.getElementById("budget-none").hidden = entries.length > 0;
  fill(document.querySelector("#budget tbody"), entries.map(([scope, b]) => {
    const tr = document.createElement("tr");
    tr.append(cell(scope), cell(b.spent), cell(b.limit),
      cell(Math.max(0, b.limit - b.spent), b.exhausted ? "degraded" : ""));
    return tr;
  }));

  fill(document.getElementById("events"), view.events.slice().reverse().map((e) => {
    const li = document.createElement("li");
    const at = new Date(e.at * 1000).toLocaleTimeString();
    li.textContent = at + "  " + e.kind + "  " + e.subject;
    return li;
  }));
}

function connect() {
  const live = document.getElementById("live");
  const source = new EventSource("/v1/stream");
  source.addEventListener("open", () => { live.textContent = "live"; live.className = "badge on"; });
  source.addEventListener("error", () => { live.textContent = "reconnecting"; live.className = "badge off"; });
  source.addEventListener("view", (msg) => render(JSON.parse(msg.data)));
}

function tick() {
  const now = Date.now() / 1000;
  for (const td of document.querySelectorAll("#agents td.uptime")) {
    td.textContent = duration(now - Number(td.dataset.since));
  }
}

connect();
setInterval(tick, 1000);
