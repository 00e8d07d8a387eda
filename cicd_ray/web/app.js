// The cicd-ray web page: runs, one run's DAG with a live log, workers. It only uses the HTTP API
// (the same token as the CLI, kept in this tab's sessionStorage) and its event stream.
"use strict";

const main = document.getElementById("main");
const live = document.getElementById("live");
let token = sessionStorage.getItem("cicd-token");
let page = null;          // the page shown: {onEvent(event), close()}
let events = null;        // the event stream's AbortController

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child instanceof Node ? child : String(child ?? ""));
  return node;
}

async function api(path, options = {}) {
  const response = await fetch(path, {
    ...options, headers: {...(options.headers || {}), Authorization: `Bearer ${token}`}});
  if (response.status === 401) { signOut("The token was not accepted."); throw new Error("401"); }
  return response;
}

const seconds = (s) => s == null ? "" : s < 60 ? `${s.toFixed(1)} s` : `${(s / 60).toFixed(1)} min`;
const since = (start, end) => start == null ? null : ((end ?? Date.now() / 1000) - start);
const when = (t) => t == null ? "" : new Date(t * 1000).toLocaleString();
const state = (s) => el("span", {class: `state ${s}`}, s);
const debounce = (fn, ms = 250) => { let t; return () => { clearTimeout(t); t = setTimeout(fn, ms); }; };

// --- the runs -----------------------------------------------------------------------------

function runsPage() {
  const body = el("tbody");
  main.replaceChildren(el("h2", {}, "Runs"), el("table", {},
    el("thead", {}, el("tr", {}, ...["run", "pipeline", "state", "started", "duration"]
      .map((h) => el("th", {}, h)))), body));
  const load = async () => {
    const {runs} = await (await api("/api/v1/runs?limit=50")).json();
    body.replaceChildren(...runs.map((r) => el("tr", {"data-run": r.id},
      el("td", {}, el("a", {href: `#/runs/${r.id}`}, r.id)), el("td", {}, r.pipeline),
      el("td", {}, state(r.state)), el("td", {}, when(r.started_at ?? r.created_at)),
      el("td", {}, seconds(since(r.started_at, r.finished_at))))));
  };
  const reload = debounce(load);
  load();
  const timer = setInterval(load, 5000);  // durations of running runs grow
  return {onEvent: reload, close: () => clearInterval(timer)};
}

// --- one run --------------------------------------------------------------------------------

function depths(steps) {
  const byName = Object.fromEntries(steps.map((s) => [s.spec.name, s]));
  const depth = {};
  const of = (name) => depth[name] ??= Math.max(-1, ...byName[name].spec.needs.map(of)) + 1;
  steps.forEach((s) => of(s.spec.name));
  return depth;
}

function times(step, attempt) {
  if (!attempt) return step.state === "queued" ? `queued ${seconds(since(step.queued_at))}` : "";
  const parts = [];
  if (attempt.wait_capacity_s > 0.05) parts.push(`capacity ${seconds(attempt.wait_capacity_s)}`);
  if (attempt.wait_slot_s > 0.05) parts.push(`slot ${seconds(attempt.wait_slot_s)}`);
  parts.push(`${attempt.finished_at ? "ran" : "running"} ${seconds(since(attempt.started_at, attempt.finished_at))}`);
  return parts.join(" · ");
}

async function download(url, name) {
  // A plain link cannot send the token: fetch the file, then save it from memory.
  const blob = await (await api(url)).blob();
  const link = el("a", {href: URL.createObjectURL(blob), download: name});
  link.click();
  setTimeout(() => URL.revokeObjectURL(link.href), 10000);
}

function source(run) {
  if (run.commit) return `commit ${run.commit.slice(0, 12)} (${run.source_git?.ref ?? ""})`;
  if (run.source_digest) return `source snapshot ${run.source_digest.slice(0, 12)}`;
  return "";
}

function runHeader(run, meta) {
  const parts = [source(run)];
  if (run.rerun_of) parts.push(el("span", {}, "re-run of ", el("a", {href: `#/runs/${run.rerun_of}`}, run.rerun_of)));
  const buttons = [];
  const rerun = async (onlyFailed) => {
    const response = await api(`/api/v1/runs/${run.id}/rerun`, {
      method: "POST", headers: {"Content-Type": "application/json"},
      body: JSON.stringify({only_failed: onlyFailed})});
    if (response.ok) location.hash = `#/runs/${(await response.json()).run_id}`;
  };
  if (["succeeded", "failed", "cancelled"].includes(run.state)) {
    buttons.push(el("button", {id: "rerun", onclick: () => rerun(false)}, "Re-run"));
    if (run.state !== "succeeded") {
      buttons.push(el("button", {id: "rerun-failed", onclick: () => rerun(true)}, "Re-run failed steps"));
    }
  }
  meta.replaceChildren(...parts.filter(Boolean).flatMap((p) => [p, " · "]).slice(0, -1), " ", ...buttons);
}

function stepDetails(runId, step, attempt, box) {
  const rows = [];
  const origin = step.reused_from || step.carried_from;
  if (origin) {
    rows.push(el("p", {class: "origin"}, step.reused_from ? "Reused from " : "Carried over from ",
      el("a", {href: `#/runs/${origin.run_id}`}, origin.run_id), ` (${origin.step}, attempt ${origin.attempt})`));
  }
  for (const use of attempt?.caches ?? []) {
    const restored = use.result === "miss" ? "" : ` from ${use.restored_from}, ${use.bytes_restored} bytes${use.from_node ? " (this node's copy)" : ""}`;
    rows.push(el("p", {class: "cache"}, `cache ${use.key}: ${use.result}${restored}`,
      use.bytes_saved ? `; saved ${use.bytes_saved} bytes` : "", use.note ? `; ${use.note}` : ""));
  }
  if (step.artifacts.length) {
    rows.push(el("h3", {}, "Artifacts"), el("ul", {class: "artifacts"}, ...step.artifacts.map((f) => {
      const url = `/api/v1/runs/${runId}/artifacts/${encodeURIComponent(step.spec.name)}/${f.path.split("/").map(encodeURIComponent).join("/")}`;
      return el("li", {}, el("a", {href: url, "data-artifact": f.path, onclick: (e) => {
        e.preventDefault(); download(url, f.path.split("/").pop()); }}, f.path), ` ${f.size} bytes`);
    })));
  }
  const why = el("p", {class: "explain muted"});
  rows.push(el("button", {id: "explain", onclick: async () => {
    const said = await (await api(`/api/v1/runs/${runId}/steps/${encodeURIComponent(step.spec.name)}/explain`)).json();
    why.replaceChildren(said.summary, ...said.changed.map((c) => el("div", {}, `${c.part}: ${c.detail}`)));
  }}, "Why did it run?"), why);
  box.replaceChildren(...rows);
}

const GROUP_WAIT = "waiting for concurrency group ";
// What was typed into an approval's fields, kept while the run's view is drawn again.
const drafts = {};

// What flow control says of a step on its card: skipped by its condition, waiting for its
// concurrency group, waiting for approval (with the buttons that answer), or answered.
function flow(runId, step, reload) {
  if (step.skipped_by_condition) {
    return [el("div", {class: "flow condition", "data-flow": "condition"}, step.reason)];
  }
  if (step.state === "queued" && step.reason.startsWith(GROUP_WAIT)) {
    return [el("div", {class: "flow group", "data-flow": "group"}, step.reason)];
  }
  if (step.approval) {
    const a = step.approval;
    return [el("div", {class: `flow ${a.decision}`, "data-flow": a.decision},
      `${a.decision} by ${a.by}${a.comment ? `: ${a.comment}` : ""}`)];
  }
  if (step.state !== "waiting_approval") return [];
  const key = `${runId}/${step.spec.name}`;
  const draft = drafts[key] ??= {by: localStorage.getItem("cicd-name") ?? "", comment: ""};
  const by = el("input", {name: "by", placeholder: "your name", value: draft.by,
    oninput: () => { draft.by = by.value; }});
  const comment = el("input", {name: "comment", placeholder: "comment", value: draft.comment,
    oninput: () => { draft.comment = comment.value; }});
  const said = el("div", {class: "error"});
  const answer = async (reject) => {
    localStorage.setItem("cicd-name", draft.by);
    const response = await api(`/api/v1/runs/${runId}/steps/${encodeURIComponent(step.spec.name)}/approve`, {
      method: "POST", headers: {"Content-Type": "application/json"},
      body: JSON.stringify({reject, comment: draft.comment, by: draft.by || null})});
    if (response.ok) delete drafts[key];
    if (!response.ok) said.textContent = (await response.json()).detail;
    reload();
  };
  const box = el("div", {class: "flow approval", "data-flow": "approval"},
    el("div", {}, step.spec.approval.prompt), by, comment,
    el("button", {"data-answer": "approve", onclick: () => answer(false)}, "Approve"),
    el("button", {"data-answer": "reject", onclick: () => answer(true)}, "Reject"), said);
  box.addEventListener("click", (e) => e.stopPropagation());  // not a click on the card
  return [box];
}

function deliveries(view) {
  return view.deliveries.map((d) => el("div", {class: "delivery muted", "data-delivery": d.state},
    `notification to ${d.url}: ${d.state}${d.status_code ? ` (HTTP ${d.status_code})` : ""}`));
}

function runPage(runId) {
  const title = el("h2");
  const meta = el("p", {class: "meta muted"});
  const dag = el("div", {class: "dag"});
  const details = el("section", {class: "details", id: "details"});
  const logTitle = el("h2", {class: "muted"}, "Select a step to see its log");
  const log = el("pre", {class: "log", id: "log"});
  main.replaceChildren(title, meta, dag, details, logTitle, log);
  let selected = null;
  let following = null;  // AbortController of the log being followed

  const follow = async (name, stepState) => {
    following?.abort();
    following = new AbortController();
    selected = name;
    logTitle.replaceChildren(`Log of ${name} `, state(stepState));
    log.textContent = "";
    const url = `/api/v1/runs/${runId}/steps/${encodeURIComponent(name)}/log?follow=true`;
    try {
      const response = await api(url, {signal: following.signal});
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      for (;;) {
        const {value, done} = await reader.read();
        if (done) break;
        log.append(decoder.decode(value, {stream: true}));
        log.scrollTop = log.scrollHeight;
      }
    } catch (error) { if (error.name !== "AbortError") log.append(`\n[${error.message}]`); }
  };

  const load = async () => {
    const response = await api(`/api/v1/runs/${runId}`);
    if (response.status === 404) { main.replaceChildren(el("p", {}, `No run ${runId}.`)); return; }
    const view = await response.json();
    const run = view.run;
    title.replaceChildren(`Run ${run.id} of ${run.pipeline} `, state(run.state),
      el("span", {class: "muted"}, ` ${run.reason || ""}`));
    runHeader(run, meta);
    meta.append(...deliveries(view));
    const last = {};
    view.attempts.forEach((a) => { last[a.step] = a; });
    const depth = depths(view.steps);
    const columns = [];
    for (const step of view.steps) {
      const name = step.spec.name;
      (columns[depth[name]] ??= []).push(el("div", {
        class: `step ${step.state}${name === selected ? " selected" : ""}`, "data-step": name,
        "data-state": step.state, onclick: () => { follow(name, step.state); load(); }},
        el("div", {class: "name"}, name),
        el("div", {}, state(step.state), step.attempts > 1 ? ` (attempt ${step.attempts})` : "",
          step.reused_from ? el("span", {class: "badge"}, "reused") : "",
          step.carried_from ? el("span", {class: "badge"}, "carried over") : ""),
        el("div", {class: "times"}, times(step, last[name])),
        ...flow(runId, step, load)));
    }
    dag.replaceChildren(...columns.map((c) => el("div", {class: "column"}, ...c)));
    const current = view.steps.find((s) => s.spec.name === selected);
    if (current) {
      logTitle.replaceChildren(`Log of ${selected} `, state(current.state));
      if (details.dataset.shown !== `${selected}:${current.state}`) {
        details.dataset.shown = `${selected}:${current.state}`;
        stepDetails(runId, current, last[selected], details);
      }
    }
    if (selected === null) {
      const first = view.steps.find((s) => s.state === "running") || view.steps.find((s) => s.attempts);
      if (first) { follow(first.spec.name, first.state); load(); }
    }
  };
  const reload = debounce(load, 150);
  load();
  const timer = setInterval(load, 3000);  // running times grow
  return {onEvent: (e) => { if (e.run_id === runId) reload(); },
          close: () => { clearInterval(timer); following?.abort(); }};
}

// --- workers --------------------------------------------------------------------------------

function workersPage() {
  const box = el("div");
  main.replaceChildren(el("h2", {}, "Workers"), box);
  const load = async () => {
    const {workers} = await (await api("/api/v1/workers")).json();
    const pools = {};
    workers.forEach((w) => (pools[w.pool] ??= []).push(w));
    box.replaceChildren(...Object.entries(pools).sort().map(([pool, list]) => el("section", {},
      el("h2", {}, `Pool ${pool}`), el("table", {},
        el("thead", {}, el("tr", {}, ...["worker", "state", "CPUs in use", "CPU %", "memory MiB",
          "heartbeat", "node"].map((h) => el("th", {}, h)))),
        el("tbody", {}, ...list.map((w) => el("tr", {"data-worker": w.id},
          el("td", {}, w.id), el("td", {}, state(w.state)),
          el("td", {}, `${w.cpus_in_use ?? 0} / ${w.cpus}`), el("td", {}, w.cpu_percent ?? ""),
          el("td", {}, w.memory_used_mb == null ? "" : Math.round(w.memory_used_mb)),
          el("td", {}, w.last_heartbeat ? `${seconds(since(w.last_heartbeat))} ago` : ""),
          el("td", {}, (w.node || "").slice(0, 12)))))))));
    if (!workers.length) box.replaceChildren(el("p", {class: "muted"}, "No workers now."));
  };
  load();
  const timer = setInterval(load, 2000);
  return {onEvent: () => {}, close: () => clearInterval(timer)};
}

// --- live events (Server-Sent Events over fetch: EventSource cannot send the token) ---------

async function listen() {
  events?.abort();
  events = new AbortController();
  let lastId = null;
  for (;;) {
    try {
      const headers = lastId ? {"Last-Event-ID": lastId} : {};
      const response = await api("/api/v1/events", {headers, signal: events.signal});
      live.classList.add("on");
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const {value, done} = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, {stream: true});
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          const field = (name) => block.split("\n").find((l) => l.startsWith(`${name}: `))?.slice(name.length + 2);
          if (field("id")) lastId = field("id");
          const kind = field("event");
          if (kind === "reset") page?.onEvent({run_id: null});
          else if (kind) page?.onEvent(JSON.parse(field("data")));
        }
      }
    } catch (error) {
      if (error.name === "AbortError" || error.message === "401") return;
    }
    live.classList.remove("on");
    await new Promise((r) => setTimeout(r, 2000));
  }
}

// --- the frame ------------------------------------------------------------------------------

function route() {
  page?.close();
  const match = location.hash.match(/^#\/runs\/([\w.-]+)/);
  page = match ? runPage(match[1]) : location.hash === "#/workers" ? workersPage() : runsPage();
}

function signOut(message = "") {
  token = null;
  sessionStorage.removeItem("cicd-token");
  events?.abort();
  page?.close();
  page = null;
  document.getElementById("signout").hidden = true;
  main.replaceChildren(document.getElementById("login").content.cloneNode(true));
  document.getElementById("login-error").textContent = message;
  document.getElementById("login-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    token = document.getElementById("token").value.trim();
    const response = await fetch("/api/v1/runs?limit=1", {headers: {Authorization: `Bearer ${token}`}});
    if (!response.ok) { signOut(`That token was not accepted (${response.status}).`); return; }
    sessionStorage.setItem("cicd-token", token);
    start();
  });
}

function start() {
  document.getElementById("signout").hidden = false;
  window.onhashchange = route;
  route();
  listen();
}

document.getElementById("signout").addEventListener("click", () => signOut());
if (token) start(); else signOut();
