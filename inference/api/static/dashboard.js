// The dashboard: polls /v1/dashboard/state and draws it. Talks to this server only.
(function () {
  "use strict";
  const REFRESH_MS = 2000;
  const TOKEN_KEY = "inference.token";
  const $ = (sel) => document.querySelector(sel);
  let chart = null;
  let updates = 0;

  // A token may come as /dashboard#token=...: keep it for this tab, drop it from the address.
  const fromHash = new URLSearchParams(location.hash.slice(1)).get("token");
  if (fromHash) {
    sessionStorage.setItem(TOKEN_KEY, fromHash);
    history.replaceState(null, "", location.pathname + location.search);
  }

  function headers() {
    const token = sessionStorage.getItem(TOKEN_KEY);
    return token ? { Authorization: "Bearer " + token } : {};
  }

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") node.className = v;
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v);
    }
    for (const c of children) node.append(c instanceof Node ? c : String(c ?? ""));
    return node;
  }

  const num = (x, d = 0) => (x == null ? "–" : Number(x).toLocaleString(undefined,
    { maximumFractionDigits: d, minimumFractionDigits: d }));
  const rate = (x) => (x == null ? "–" : x >= 100 ? num(x) : num(x, x >= 10 ? 1 : 2));
  const money = (x) => (x == null ? "–" : "$" + (x < 1 ? Number(x).toFixed(4) : num(x, 2)));

  function duration(s) {
    if (s == null) return "–";
    s = Math.max(0, Math.round(s));
    if (s < 60) return s + "s";
    if (s < 3600) return Math.floor(s / 60) + "m " + (s % 60) + "s";
    if (s < 86400) return Math.floor(s / 3600) + "h " + Math.floor((s % 3600) / 60) + "m";
    return Math.floor(s / 86400) + "d " + Math.floor((s % 86400) / 3600) + "h";
  }

  function fill(tbody, rows, empty) {
    tbody.replaceChildren(...rows);
    $(empty).hidden = rows.length > 0;
  }

  async function act(job, verb) {
    if (verb === "redrive" && !confirm("Send the dead letters of " + job + " back to the queue?"))
      return;
    const r = await fetch("/v1/jobs/" + encodeURIComponent(job) + "/" + verb,
      { method: "POST", headers: headers() });
    if (!r.ok) {
      const body = await r.json().catch(() => ({}));
      alert(verb + " failed: " + ((body.error && body.error.message) || r.status));
    }
    refresh(false);
  }

  function progressBar(j) {
    const total = j.total || 1;
    const done = (100 * j.done) / total;
    const dead = (100 * j.dead) / total;
    let label = (100 * j.fraction).toFixed(1) + "%";
    if (j.status === "finalizing") label += " · finalizing";
    const d = el("div", { class: "done" });
    d.style.width = Math.min(done, j.status === "finalizing" ? 99.9 : 100) + "%";
    const x = el("div", { class: "dead" });
    x.style.left = done + "%";
    x.style.width = dead + "%";
    return el("div", { class: "bar" }, d, x, el("div", { class: "label" }, label));
  }

  function jobRow(j) {
    const actions = el("td", {});
    const ended = ["completed", "failed", "cancelled", "expired"].includes(j.status);
    if (j.queue_state === "paused")
      actions.append(el("button", { onclick: () => act(j.id, "resume") }, "Resume"));
    else if (!ended && j.queue_state === "active")
      actions.append(el("button", { onclick: () => act(j.id, "pause") }, "Pause"));
    if (j.dead > 0 && j.queue_state !== "cancelled")
      actions.append(" ", el("button", { onclick: () => act(j.id, "redrive") }, "Redrive"));
    let eta = duration(j.eta_s);
    if (j.starts_at) eta = "next run " + new Date(j.starts_at * 1000).toLocaleString();
    if (j.status === "finalizing" || (j.total && j.done + j.dead === j.total
        && j.status !== "completed")) eta = "finalizing";
    if (j.status === "completed") eta = "done";
    if (j.queue_state === "paused") eta = "paused";
    return el("tr", {
      class: "job", "data-job": j.id, "data-done": j.done, "data-total": j.total,
      "data-fraction": j.fraction, "data-status": j.status,
    },
      el("td", { title: j.kind + " · pool " + (j.pool || "")
        + (j.windows && j.windows.length ? " · runs " + j.windows.join(", ") : "") },
        j.id, modelShares(j.models)),
      el("td", {}, el("span", { class: "status " + j.status }, j.status)),
      el("td", {}, progressBar(j)),
      el("td", { class: "count" }, num(j.done) + " / " + num(j.total)),
      el("td", {}, num(j.dead)),
      el("td", {}, rate(j.items_per_s)),
      el("td", {}, rate(j.tokens_per_s)),
      el("td", { class: "eta" }, eta),
      el("td", { title: duration(j.busy_s) + " busy at " + money(j.cost_per_gpu_hour) + "/GPU-h" },
        money(j.cost)),
      el("td", {}, money(j.cost_to_finish)),
      actions);
  }

  // A job of several models: one line per model with its progress and cost.
  function modelShares(models) {
    if (!models) return "";
    return el("div", { class: "models" }, ...Object.entries(models).map(([name, m]) =>
      el("div", { class: "model", "data-model": name, "data-done": m.done, "data-total": m.total },
        name + " " + num(m.done) + " / " + num(m.total) + " · " + money(m.cost))));
  }

    function card(k, v) {
    return el("div", { class: "card" }, el("div", { class: "v" }, v), el("div", { class: "k" }, k));
  }

  function drawChart(tp) {
    const data = [tp.t, tp.items_per_s, tp.tokens_per_s];
    const box = $("#chart");
    if (typeof uPlot === "undefined") { box.textContent = "chart library not loaded"; return; }
    if (!chart) {
      chart = new uPlot({
        width: Math.max(300, box.clientWidth - 8), height: 220,
        series: [{}, { label: "items/s", stroke: "#3b6fd8", width: 2, scale: "items" },
          { label: "tokens/s", stroke: "#2f9e44", width: 2, scale: "tokens", dash: [6, 4] }],
        axes: [{}, { scale: "items", label: "items/s" },
          { scale: "tokens", side: 1, label: "tokens/s", grid: { show: false } }],
        scales: { items: { range: (u, min, max) => [0, Math.max(1, max * 1.1)] },
          tokens: { range: (u, min, max) => [0, Math.max(1, max * 1.1)] } },
      }, data, box);
      window.addEventListener("resize", () =>
        chart.setSize({ width: Math.max(300, box.clientWidth - 8), height: 220 }));
    } else {
      chart.setData(data);
    }
  }

  function draw(s) {
    const active = s.jobs.filter((j) => !["completed", "failed", "cancelled", "expired"]
      .includes(j.status));
    const items = s.jobs.reduce((a, j) => a + (j.items_per_s || 0), 0);
    const tokens = s.jobs.reduce((a, j) => a + (j.tokens_per_s || 0), 0);
    const cost = s.jobs.reduce((a, j) => a + (j.cost || 0), 0);
    $("#cards").replaceChildren(
      card("active jobs", num(active.length)), card("backlog (items)", num(s.backlog)),
      card("items/s", rate(items)), card("tokens/s", rate(tokens)),
      card("workers", num(s.workers.length)), card("cost so far", money(cost)));
    fill($("#jobs tbody"), s.jobs.map(jobRow), "#jobs-empty");

    const depth = Object.entries(s.queue.by_state).map(([k, v]) =>
      el("tr", { "data-state": k }, el("td", {}, k), el("td", {}, num(v))));
    for (const [p, v] of Object.entries(s.queue.by_priority).sort((a, b) => b[0] - a[0]))
      depth.push(el("tr", { "data-priority": p }, el("td", {}, "pending · priority " + p),
        el("td", {}, num(v))));
    $("#depth tbody").replaceChildren(...depth);

    fill($("#workers tbody"), s.workers.map((w) => el("tr", { class: "worker" },
      el("td", {}, w.worker), el("td", {}, w.pool || ""),
      el("td", {}, el("span", { class: "status " + w.state }, w.state)),
      el("td", {}, w.node || ""), el("td", {}, (w.gpus || []).join(",") || "cpu"),
      el("td", {}, num(w.batches)), el("td", {}, num(w.items)),
      el("td", {}, w.last_batch_size == null ? "–"
        : num(w.last_batch_size) + " items · " + num(w.last_batch_tokens) + " tok"),
      el("td", {}, duration(w.busy_s)))), "#workers-empty");

    $("#pools").replaceChildren(...Object.entries(s.pools || {}).map(([name, p]) => {
      let text = "pool " + name + ": " + (p.mode || "fixed") + ", " + num(p.workers)
        + (p.workers === 1 ? " worker" : " workers");
      if (p.mode === "autoscale" && p.desired != null) {
        text += " (desired " + num(p.desired) + ", " + p.reason + "; " + num(p.draining || 0)
          + " draining; " + num(p.demand || 0) + " requested from Ray)";
        if (p.at_risk && p.at_risk.length) text += " · deadline at risk: " + p.at_risk.join(", ");
      }
      const error = (s.pool_errors || {})[name];
      if (error) text += " · stopped: " + error;
      return el("li", { class: "pool", "data-pool": name }, text);
    }));

    fill($("#dead tbody"), s.dead_letters.map((d) => el("tr", { class: "dead-letter" },
      el("td", {}, d.job), el("td", {}, d.custom_id), el("td", {}, d.reason),
      el("td", {}, d.error_code || ""), el("td", { class: "msg" }, d.message),
      el("td", {}, num(d.attempts)))), "#dead-empty");

    const hooks = s.webhooks || {};
    const failed = (hooks.deliveries || []).filter((c) => c.outcome !== "delivered")
      .reduce((a, c) => a + c.n, 0);
    $("#webhooks-summary").textContent = hooks.endpoints
      ? num(hooks.endpoints) + " endpoint(s) · " + num(hooks.undelivered || 0) + " undelivered · "
        + num(failed) + " failed attempts or given up since start"
      : "No endpoints configured (api.webhooks).";
    fill($("#webhooks tbody"), (hooks.recent || []).map((d) => el("tr",
      { class: "webhook", "data-state": d.state },
      el("td", {}, d.type), el("td", {}, d.job_id), el("td", {}, d.url),
      el("td", {}, el("span", { class: "status " + d.state }, d.state
        + (d.next_at ? " · retry in " + duration(d.next_at - Date.now() / 1000) : ""))),
      el("td", {}, num(d.attempts)),
      el("td", {}, d.at ? new Date(d.at * 1000).toLocaleTimeString() : "–"),
      el("td", { class: "msg" }, d.error || (d.status ? "HTTP " + d.status : "")))),
    "#webhooks-empty");

    const link = $("#ray-link");
    if (s.ray_dashboard_url) { link.href = s.ray_dashboard_url; link.hidden = false; }
    drawChart(s.throughput);
  }

  let timer = null;
  async function refresh(again = true) {
    clearTimeout(timer);
    try {
      const r = await fetch("/v1/dashboard/state", { headers: headers(), cache: "no-store" });
      if (r.status === 401) {
        $("#token-form").hidden = false;
        throw new Error("a bearer token is needed");
      }
      if (!r.ok) throw new Error("the server answered " + r.status);
      draw(await r.json());
      updates += 1;
      document.body.dataset.updates = updates;
      $("#updated").textContent = "updated " + new Date().toLocaleTimeString();
      $("#error").hidden = true;
    } catch (e) {
      $("#error").textContent = String(e.message || e);
      $("#error").hidden = false;
    }
    if (again) timer = setTimeout(refresh, REFRESH_MS);
  }

  $("#token-form").addEventListener("submit", (e) => {
    e.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("#token").value.trim());
    $("#token-form").hidden = true;
    refresh();
  });
  refresh();
})();
