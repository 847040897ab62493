// The dashboard: one EventSource on /v1/stream; each "view" message redraws
// the tables. The usage chart (/v1/usage) is polled and #agents (/v1/chat)
// long-polled: neither changes the fleet's state, so neither wakes the stream. Text goes in
// with textContent only, never as HTML.
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
const USAGE_EVERY_MS = 15000;
const CHAT_WAIT_S = 25;
const CHAT_RETRY_MS = 5000;
const CHAT_OFF_IRC_MS = 60000;
const CHAT_KEEP = 200;
const SERIES_CLASSES = 6; // .series-0 .. .series-5 in dashboard.css

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

// What an operator typed into a role's scale box, until it is set: a live view
// redraws the table and must not put the old target back under their fingers.
const scaleDrafts = new Map();

function scaleCell(role, target) {
  const td = document.createElement("td");
  td.className = "op";
  const input = document.createElement("input");
  input.type = "number"; input.min = "0"; input.max = "1000";
  input.value = scaleDrafts.has(role) ? scaleDrafts.get(role) : target;
  input.className = "scale";
  input.addEventListener("input", () => scaleDrafts.set(role, input.value));
  const button = document.createElement("button");
  button.textContent = "set";
  button.addEventListener("click", async () => {
    const res = await fetch("/v1/roles/" + encodeURIComponent(role) + "/scale", {
      method: "POST",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
      body: JSON.stringify({ n: Number(input.value) }),
    });
    if (res.ok) scaleDrafts.delete(role);
    else alert((await res.json()).error);
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

function svg(tag, attrs) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  return el;
}

// Tokens per role over the last hour: each role a band stacked on those before it,
// colours from the stylesheet.
function drawUsage(usage) {
  const W = 400, H = 140, PAD = 16;
  const roles = Object.entries(usage.roles);
  const stacked = [];
  let below = new Array(usage.buckets).fill(0);
  for (const [role, values] of roles) {
    const above = below.map((v, i) => v + values[i]);
    stacked.push([role, values, below, above]);
    below = above;
  }
  const top = Math.max(1, ...below);
  const x = (i) => (PAD + (i * (W - 2 * PAD)) / Math.max(1, usage.buckets - 1)).toFixed(1);
  const y = (v) => (H - PAD - (v * (H - 2 * PAD)) / top).toFixed(1);
  const parts = [svg("line", { x1: PAD, y1: H - PAD, x2: W - PAD, y2: H - PAD, class: "axis" })];
  const peak = svg("text", { x: PAD, y: 11, class: "axis" });
  peak.textContent = roles.length ? "peak " + top + " tokens per " + duration(usage.step) : "";
  parts.push(peak);
  const legend = [];
  stacked.forEach(([role, values, lower, upper], n) => {
    const series = "series-" + (n % SERIES_CLASSES);
    const total = values.reduce((a, b) => a + b, 0);
    const edge = upper.map((v, i) => x(i) + "," + y(v));
    const base = lower.map((v, i) => x(i) + "," + y(v)).reverse();
    const band = svg("polygon", {
      points: edge.concat(base).join(" "),
      class: "series " + series,
      "data-role": role,
      "data-tokens": total,
    });
    const title = svg("title", {});
    title.textContent = role + ": " + total + " tokens";
    band.append(title);
    parts.push(band);
    const key = document.createElement("span");
    key.className = series;
    key.dataset.role = role;
    key.textContent = "\u25a0 " + role + " " + total;
    legend.push(key, " ");
  });
  document.getElementById("usage-chart").replaceChildren(...parts);
  legend.push(roles.length ? "tokens in the last hour" : "No model calls in the last hour.");
  document.getElementById("usage-legend").replaceChildren(...legend);
}

async function pollUsage() {
  try {
    const res = await fetch("/v1/usage?window=3600&buckets=30");
    if (res.ok) drawUsage(await res.json());
  } catch (e) {
    // offline for a moment: the next poll draws it
  }
  setTimeout(pollUsage, USAGE_EVERY_MS);
}

// #agents: the lines after the newest one shown, appended; the oldest dropped.
let chatLast = 0;

function chatLine(line) {
  const li = document.createElement("li");
  li.dataset.id = String(line.id);
  const at = new Date(line.at * 1000).toLocaleTimeString();
  const time = document.createElement("span");
  time.className = "muted";
  time.textContent = at + " ";
  const who = document.createElement("span");
  who.className = "nick";
  who.textContent = line.action ? "* " + line.nick + " " : "<" + line.nick + "> ";
  const text = document.createElement("span");
  text.className = "said";
  text.textContent = line.text;
  li.append(time, who, text);
  return li;
}

async function pollChat() {
  let again = CHAT_RETRY_MS;
  try {
    // A long poll: answered at once when there is something new, else when a line comes.
    const res = await fetch("/v1/chat?after=" + chatLast + "&wait=" + CHAT_WAIT_S);
    if (res.ok) {
      const chat = await res.json();
      const list = document.getElementById("chat");
      if (chat.last < chatLast) { list.replaceChildren(); chatLast = 0; } // a new supervisor
      if (chat.channel) document.getElementById("chat-channel").textContent = chat.channel;
      const atBottom = list.scrollTop + list.clientHeight >= list.scrollHeight - 4;
      for (const line of chat.lines) {
        list.append(chatLine(line));
        chatLast = Math.max(chatLast, line.id);
      }
      while (list.children.length > CHAT_KEEP) list.firstElementChild.remove();
      if (atBottom) list.scrollTop = list.scrollHeight;
      document.getElementById("chat-none").textContent =
        chat.channel ? "Nothing said yet." : "The swarm is not on IRC.";
      document.getElementById("chat-none").hidden = list.children.length > 0;
      // Off IRC the answer comes at once: ask again only now and then.
      again = chat.channel ? 0 : CHAT_OFF_IRC_MS;
    }
  } catch (e) {
    // offline for a moment: the next poll catches up from chatLast
  }
  setTimeout(pollChat, again);
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
pollUsage();
pollChat();
