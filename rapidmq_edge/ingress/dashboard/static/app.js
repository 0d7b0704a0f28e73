// RapidMQ Edge dashboard: one Server-Sent Events stream (/dashboard/events), one JSON
// snapshot a second, rendered with the DOM (textContent only) and two uPlot charts.
"use strict";
(() => {
  const HISTORY = 300; // seconds kept for the charts
  const $ = (id) => document.getElementById(id);
  const hist = { t: [], inn: [], out: [], queued: [] };
  const charts = {};
  let last = null;

  // -- formatting -------------------------------------------------------------------
  const num = (v) => (v === null || v === undefined ? "–" : Number(v).toLocaleString("en-US"));
  const rate = (v) => (v === null || v === undefined ? "–" :
    (v >= 100 ? Math.round(v) : Math.round(v * 10) / 10).toLocaleString("en-US"));
  const bytes = (n) => {
    if (n === null || n === undefined) return "–";
    const u = ["B", "KiB", "MiB", "GiB"]; let i = 0;
    while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
    return (i ? n.toFixed(1) : n) + " " + u[i];
  };
  const dur = (s) => {
    if (s === null || s === undefined) return "–";
    if (s < 120) return Math.round(s) + " s";
    if (s < 7200) return Math.round(s / 60) + " min";
    return (s / 3600).toFixed(1) + " h";
  };
  const band = (b) => (Array.isArray(b) ? `${b[0]} … ${b[1]}` : "–");

  function text(id, v) { const e = $(id); if (e) e.textContent = v; }

  function rows(id, data, cells) {
    const body = $(id).tBodies[0];
    const out = document.createDocumentFragment();
    for (const d of data) {
      const tr = document.createElement("tr");
      for (const c of cells(d)) {
        const td = document.createElement("td");
        if (c && typeof c === "object") { td.textContent = c.text; if (c.cls) td.className = c.cls; if (c.pad) td.style.paddingLeft = c.pad; }
        else td.textContent = c;
        tr.appendChild(td);
      }
      out.appendChild(tr);
    }
    if (!data.length) {
      const tr = document.createElement("tr"); const td = document.createElement("td");
      td.colSpan = $(id).tHead.rows[0].cells.length; td.className = "muted"; td.textContent = "none";
      tr.appendChild(td); out.appendChild(tr);
    }
    body.replaceChildren(out);
  }

  // -- the topic tree: each level with the sum of the rates below it ---------------------
  function topicTree(list) {
    const root = { kids: new Map(), rate: 0, messages: 0, bytes: 0 };
    for (const t of list) {
      let node = root;
      const parts = t.topic.split("/");
      parts.forEach((p, i) => {
        if (!node.kids.has(p)) node.kids.set(p, { kids: new Map(), rate: 0, messages: 0, bytes: 0 });
        node = node.kids.get(p);
        node.rate += t.rate; node.messages += t.messages; node.bytes += t.bytes;
        if (i === parts.length - 1) node.retained = t.retained;
      });
    }
    const out = [];
    const walk = (node, depth) => {
      const kids = [...node.kids.entries()].sort((a, b) => b[1].rate - a[1].rate || a[0].localeCompare(b[0]));
      for (const [name, kid] of kids) {
        out.push({ name: name || "(empty)", depth, ...kid });
        walk(kid, depth + 1);
      }
    };
    walk(root, 0);
    return out.slice(0, 400);
  }

  // -- charts -------------------------------------------------------------------------
  function chart(id, series) {
    const el = $(id);
    if (!el || typeof uPlot === "undefined") return null;
    const width = Math.max(200, (el.clientWidth || 600) - 14);
    const opts = {
      width, height: width < 500 ? 160 : 220,
      legend: { show: true },
      scales: { x: { time: true } },
      series: [{}, ...series.map(([label, stroke]) => ({ label, stroke, width: 2, fill: stroke + "22" }))],
      axes: [{ stroke: "#8a96a3" }, { stroke: "#8a96a3", size: 56 }],
    };
    return new uPlot(opts, [[], ...series.map(() => [])], el);
  }

  function ensureCharts() {
    if (!charts.rates && visible("overview")) charts.rates = chart("chart-rates", [["in", "#3b82f6"], ["out", "#10b981"]]);
    if (!charts.backlog && visible("queue")) charts.backlog = chart("chart-backlog", [["queued", "#f59e0b"]]);
  }

  function drawCharts() {
    ensureCharts();
    if (charts.rates && visible("overview")) charts.rates.setData([hist.t, hist.inn, hist.out]);
    if (charts.backlog && visible("queue")) charts.backlog.setData([hist.t, hist.queued]);
  }

  function resize() {  // a hidden page's chart keeps its size until it is shown again
    for (const c of Object.values(charts)) {
      const w = c.root.parentElement.clientWidth - 14;
      if (w > 0) c.setSize({ width: w, height: w < 500 ? 160 : 220 });
    }
  }

  // -- pages --------------------------------------------------------------------------
  function visible(page) { return !$("page-" + page).hidden; }

  function show() {
    const page = (location.hash || "#overview").slice(1);
    for (const s of document.querySelectorAll(".page")) s.hidden = s.id !== "page-" + page;
    for (const a of document.querySelectorAll("nav a")) {
      a.classList.toggle("on", a.dataset.page === page);
      if (a.dataset.page === page) a.scrollIntoView({ block: "nearest", inline: "nearest" });
    }
    if (![...document.querySelectorAll(".page")].some((s) => !s.hidden)) { $("page-overview").hidden = false; }
    if (last) render(last);
    requestAnimationFrame(resize);
  }

  // -- one snapshot -------------------------------------------------------------------
  function record(s) {
    hist.t.push(s.at); hist.inn.push(s.rates.in); hist.out.push(s.rates.out);
    hist.queued.push(s.queue ? s.queue.messages : 0);
    if (hist.t.length > HISTORY) for (const k of Object.keys(hist)) hist[k].shift();
  }

  function render(s) {
    text("gw", `${s.gateway} · v${s.version} · up ${dur(s.uptime_s)}`);
    text("updated", new Date(s.at * 1000).toLocaleTimeString());
    // overview
    text("v-rate-in", rate(s.rates.in)); text("v-rate-out", rate(s.rates.out));
    text("v-total-in", num(s.totals.in)); text("v-total-out", num(s.totals.out));
    text("v-clients", num(s.clients.connected)); text("v-sessions", `${num(s.clients.sessions)} sessions`);
    const q = s.queue, ups = Object.entries(s.upstreams || {});
    text("v-queued", q ? num(q.messages) : "–");
    const oldest = q ? Math.max(0, ...Object.values(q.classes).map((c) => c.oldest_age)) : null;
    text("v-oldest", q ? `oldest ${dur(oldest)}` : "no upstreams");
    const etas = ups.map(([, u]) => u.drain_eta_s).filter((x) => x !== null && x !== undefined);
    text("v-eta", etas.length ? dur(Math.max(...etas)) :
      (!q ? "–" : (!q.messages || oldest <= 2 ? "now" : "?")));
    const down = ups.filter(([, u]) => !u.connected).length;
    text("v-up-state", ups.length ? (down ? `${down} of ${ups.length} DOWN` : `${ups.length} connected`) : "");
    $("v-up-state").className = down ? "bad" : "";
    text("v-commit", s.commit_ms === null ? "–" : rate(s.commit_ms));
    rows("t-protocols", Object.entries(s.rates.by_protocol), ([p, r]) => [p, rate(r)]);
    rows("t-classes", q ? Object.entries(q.classes) : [], ([c, v]) => [c, num(v.messages), dur(v.oldest_age)]);
    // no_subscribers: no local subscriber (the message may still be forwarded upstream)
    rows("t-drops", Object.entries(s.drops), ([r, n]) => [r, { text: num(n),
      cls: n && !r.endsWith("no_subscribers") ? "bad" : "" }]);
    rows("t-upstates", ups, ([n, u]) => [n, { text: u.connected ? "connected" : "DOWN", cls: u.connected ? "good" : "bad" },
      u.rtt_ms === null ? "–" : `${rate(u.rtt_ms)} ms`]);
    // topics
    if (visible("topics")) rows("t-topics", topicTree(s.topics), (n) => [
      { text: (n.retained ? "● " : "") + n.name, pad: `${0.5 + n.depth * 1.1}em` }, rate(n.rate), num(n.messages), bytes(n.bytes)]);
    // clients
    if (visible("clients")) {
      rows("t-clients", s.clients.list, (c) => [c.client_id, `${c.protocol} v${c.version === 5 ? "5" : "3.1.1"}`,
        c.username || "–", rate(c.rate), num(c.messages),
        c.threat ? { text: `${c.threat.label} ${c.threat.score}`, cls: "bad" } : "0", dur(c.connected_s)]);
      rows("t-reasons", Object.entries(s.clients.disconnect_reasons), ([w, n]) => [w, num(n)]);
      rows("t-recent", s.clients.recent_disconnects, (d) => [new Date(d.at * 1000).toLocaleTimeString(), d.client, d.why]);
    }
    // intelligence
    const i = s.intelligence;
    $("intel-off").hidden = !!i;
    if (i && visible("intelligence")) {
      text("v-scored", num(i.scored)); text("v-scores-s", `${rate(i.scores_per_s)}/s`);
      text("v-streams", num(i.streams)); text("v-inc-open", num(i.incidents_open));
      text("v-inc-total", `${num(i.incidents_opened)} opened, ${num(i.incidents_closed)} closed`);
      const sh = (i.shadow || [])[0];  // a candidate model in shadow during an OTA
      text("v-shadow", sh && sh.agreement !== null ? `${Math.round(sh.agreement * 1000) / 10} %` : "–");
      text("v-shadow-note", sh ? `${sh.component} ${sh.version || ""} over ${num(sh.compared)}` : "no OTA in progress");
      rows("t-incidents", i.open, (r) => [r.stream, r.kind, r.reading ?? "–", band(r.band), r.score ?? "–",
        new Date((r.at || 0) * 1000).toLocaleTimeString()]);
      rows("t-closed", i.closed, (r) => [r.stream, r.kind, r.reading ?? "–", band(r.band), dur(r.duration_s)]);
      rows("t-models", Object.entries(i.models), ([n, m]) => [n, m.fallback ? "RULES (fallback)" : m.source, m.version || "–"]);
    }
    // queue and upstreams
    if (visible("queue")) {
      text("v-q-msgs", q ? num(q.messages) : "–"); text("v-q-bytes", q ? bytes(q.bytes) : "no upstreams");
      text("v-q-fwd", q ? num(q.forwarded) : "–"); text("v-q-commits", q ? `${num(q.commits)} commits` : "");
      text("v-forecast", q && q.forecast ? q.forecast : "");
      rows("t-upstreams", ups, ([n, u]) => [n, { text: u.connected ? "connected" : "DOWN", cls: u.connected ? "good" : "bad" },
        u.rtt_ms === null ? "–" : `${rate(u.rtt_ms)} ms`, num(u.inflight), num(u.acked), num(u.queued),
        dur(u.oldest_age), `${rate(u.drain_rate)}/s`, dur(u.drain_eta_s)]);
    }
    drawCharts();
  }

  // -- the stream ---------------------------------------------------------------------
  function connect() {
    const es = new EventSource("/dashboard/events");
    es.addEventListener("snapshot", (ev) => {
      const s = JSON.parse(ev.data);
      last = s; record(s); render(s);
      $("live").className = "dot on";
      document.body.dataset.frames = String(Number(document.body.dataset.frames || 0) + 1);
    });
    es.onerror = () => {
      $("live").className = "dot off"; text("updated", "reconnecting…");
      fetch("/dashboard/snapshot", { credentials: "same-origin" }).then((r) => {
        if (r.status === 401) { es.close(); location.assign("/dashboard/login"); }
      }).catch(() => {});
    };
  }

  window.addEventListener("hashchange", show);
  window.addEventListener("resize", resize);
  show();
  connect();
})();
