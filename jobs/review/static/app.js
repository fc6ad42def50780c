// bulklabel review: keyboard first. No framework, no inline script (the page's CSP allows none), and the DOM is
// built with textContent only: every label, key and reason comes from data and is never parsed as HTML.
"use strict";
(() => {
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const $ = (id) => document.getElementById(id);
  // item: what is shown; live: the queue's image leased to this reviewer; history: this visit's decisions, for
  // undo (u) and for going back (←) to change one (a newer decision wins); back: how far back the view is.
  const state = { reviewer: localStorage.getItem("bulklabel.reviewer") || "", classes: [], item: null, live: null,
                  history: [], back: 0, filters: { predicted: null, given: null }, busy: false, recent: [] };

  function newId() {
    const bytes = new Uint8Array(16);
    crypto.getRandomValues(bytes);
    return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  async function call(method, path, body) {
    // A decision is retried with the same id until the server answers: it records it once whatever happens.
    for (let attempt = 0; ; attempt++) {
      try {
        const response = await fetch(path, { method, credentials: "same-origin",
          headers: { "content-type": "application/json", "x-csrf-token": csrf },
          body: body === undefined ? undefined : JSON.stringify(body) });
        const data = await response.json();
        if (!response.ok) throw Object.assign(new Error(data.error || response.statusText), { final: true });
        return data;
      } catch (error) {
        if (error.final || attempt >= 20) { say(error.message); throw error; }
        say("server unreachable, retrying…");
        await new Promise((r) => setTimeout(r, Math.min(4000, 250 * 2 ** attempt)));
      }
    }
  }

  function say(text) { $("status").textContent = text; }

  function showProgress(p) {
    $("progress").textContent = `${p.decided} of ${p.total} reviewed · ${p.left} left · you: ${p.mine} · ` +
      `${p.per_minute.toFixed(1)}/min`;
  }

  function options() {
    // 1–9: the model's suggestions, then the given label, then the classes used last.
    const item = state.item, out = [];
    for (const [label, score] of item.suggestions) out.push({ label, score });
    if (item.given_label && !out.some((o) => o.label === item.given_label)) out.push({ label: item.given_label });
    for (const label of state.recent) if (!out.some((o) => o.label === label)) out.push({ label });
    return out.filter((o) => state.classes.includes(o.label)).slice(0, 9);
  }

  function render() {
    const item = state.item;
    $("done").hidden = item !== null || $("who").hidden === false;
    $("review").hidden = item === null;
    if (item === null) return;
    const picture = $("picture");
    picture.src = item.image;
    picture.alt = item.key;
    $("problem").hidden = true;
    $("reason").textContent = `${item.key} — ${item.reason}`;
    $("given").textContent = item.given_label || "(none)";
    const decided = $("decided");
    decided.hidden = !item.decided;
    if (item.decided) decided.textContent = `decided: ${item.decided.decision} ${item.decided.label || ""}`;
    const list = $("choices");
    list.replaceChildren();
    options().forEach((o, i) => {
      const li = document.createElement("li");
      const n = document.createElement("span"); n.className = "n"; n.textContent = String(i + 1);
      const name = document.createElement("span"); name.textContent = o.label;
      li.append(n, name);
      if (o.score !== undefined) {
        const s = document.createElement("span"); s.className = "score"; s.textContent = o.score.toFixed(3);
        li.append(s);
      }
      if (o.label === item.given_label) li.classList.add("given");
      li.addEventListener("click", () => decide("label", { label: o.label }));
      list.append(li);
    });
  }

  async function next() {
    const data = await call("POST", "/api/next", { reviewer: state.reviewer, ...state.filters });
    state.item = state.live = data.item;
    state.back = 0;
    showProgress(data.progress);
    render();
  }

  async function decide(decision, extra = {}) {
    if (state.busy || !state.item) return;
    busy(true);
    const item = state.item, id = newId();
    try {
      const data = await call("POST", "/api/decisions",
        { decision_id: id, reviewer: state.reviewer, key: item.key, decision, ...extra });
      showProgress(data.progress);
      if (decision === "label") state.recent = [extra.label, ...state.recent.filter((l) => l !== extra.label)].slice(0, 5);
      if (decision === "label" || decision === "bad") {
        state.history.push({ item: { ...item, decided: { decision, label: extra.label || null, decision_id: id } }, id });
      }
      say(`${decision} ${extra.label || extra.bad_reason || ""} — ${item.key}`);
      if (state.back > 0 && state.live !== null) {  // a past image decided again: back to the one in hand
        state.back = 0;
        state.item = state.live;
        render();
      } else {
        await next();
      }
    } finally { busy(false); }
  }

  function busy(on) {  // keys are ignored while a request is out; the page says so (tests wait on it too)
    state.busy = on;
    document.body.dataset.busy = String(on);
  }

  async function undo() {
    if (state.busy || state.history.length === 0) return;
    const last = state.history.pop();
    busy(true);
    try {
      const data = await call("POST", "/api/decisions", { decision_id: newId(), reviewer: state.reviewer,
        key: last.item.key, decision: "undo", undoes: last.id });
      state.item = state.live = data.item;
      state.back = 0;
      showProgress(data.progress);
      say(`undone — ${last.item.key}`);
      render();
    } finally { busy(false); }
  }

  function move(step) {
    // ← shows the images decided before, newest first; → comes back to the image in hand.
    const back = Math.min(state.history.length, Math.max(0, state.back - step));
    if (back === state.back) return;
    state.back = back;
    state.item = back === 0 ? state.live : state.history[state.history.length - back].item;
    render();
  }

  function openSearch() {
    $("search").hidden = false;
    const input = $("search-input");
    input.value = "";
    input.focus();
    filterMatches();
  }

  function filterMatches() {
    const text = $("search-input").value.toLowerCase();
    const list = $("matches");
    list.replaceChildren();
    state.classes.filter((c) => c.toLowerCase().includes(text)).slice(0, 50).forEach((c, i) => {
      const li = document.createElement("li");
      li.textContent = c;
      if (i === 0) li.classList.add("active");
      li.addEventListener("click", () => { closeSearch(); decide("label", { label: c }); });
      list.append(li);
    });
  }

  function closeSearch() { $("search").hidden = true; $("search-input").blur(); }

  $("search-input").addEventListener("input", filterMatches);
  $("search-input").addEventListener("keydown", (event) => {
    if (event.key === "Escape") { closeSearch(); event.preventDefault(); }
    if (event.key === "Enter") {
      const first = $("matches").querySelector("li");
      if (first) { closeSearch(); decide("label", { label: first.textContent }); }
      event.preventDefault();
    }
    event.stopPropagation();
  });

  document.addEventListener("keydown", (event) => {
    if ($("review").hidden || event.target.tagName === "INPUT" || event.target.tagName === "SELECT") return;
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    const digit = Number(event.key);
    if (Number.isInteger(digit) && digit >= 1 && digit <= 9) {
      const choice = options()[digit - 1];
      if (choice) decide("label", { label: choice.label });
    } else if (event.key === "/") { openSearch(); }
    else if (event.key === "x") { decide("bad", { bad_reason: "other" }); }
    else if (event.key === "s") { decide("skip"); }
    else if (event.key === "u") { undo(); }
    else if (event.key === "ArrowLeft") { move(-1); }
    else if (event.key === "ArrowRight") { move(1); }
    else return;
    event.preventDefault();
  });

  document.querySelectorAll("[data-bad]").forEach((b) =>
    b.addEventListener("click", () => decide("bad", { bad_reason: b.dataset.bad })));
  $("picture").addEventListener("error", () => {
    $("problem").hidden = false;
    $("problem").textContent = "this image cannot be shown (moved, or unreadable): mark it bad or skip it";
  });

  function fillFilter(id, values, key) {
    const select = $(id);
    const any = document.createElement("option"); any.value = ""; any.textContent = "any";
    select.replaceChildren(any, ...values.map((v) => {
      const o = document.createElement("option"); o.value = v; o.textContent = v; return o;
    }));
    select.addEventListener("change", () => { state.filters[key] = select.value || null; next(); });
  }

  async function start() {
    const name = $("reviewer").value.trim();
    if (!/^[\w .@+-]{1,64}$/u.test(name)) { say("a name of letters, digits, spaces or . @ + -"); return; }
    state.reviewer = name;
    localStorage.setItem("bulklabel.reviewer", name);
    $("who").hidden = true;
    const config = await call("GET", `/api/config?reviewer=${encodeURIComponent(name)}`);
    state.classes = config.classes;
    fillFilter("f-predicted", config.classes, "predicted");
    fillFilter("f-given", config.classes, "given");
    await next();
  }

  $("start").addEventListener("click", start);
  $("reviewer").addEventListener("keydown", (e) => { if (e.key === "Enter") start(); });
  if (state.reviewer) { $("reviewer").value = state.reviewer; start(); } else { $("who").hidden = false; $("reviewer").focus(); }
})();
