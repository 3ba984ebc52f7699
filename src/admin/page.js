"use strict";
// The admin page: reads /status every 2 s and redraws in place. Every value from the server
// goes into the page as text (textContent, attributes), never as HTML: error descriptions come
// from token endpoints and must not be able to inject markup.
(function () {
  const REFRESH_MS = 2000;
  let last = null;       // the last /status answer
  let fetchedAt = 0;     // performance.now() when it arrived
  let loads = 0;

  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v !== null && v !== undefined) el.setAttribute(k, String(v));
    }
    for (const c of children) {
      if (c === null || c === undefined) continue;
      el.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return el;
  }

  function svg(tag, attrs) {
    const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
    return el;
  }

  function duration(seconds) {
    if (seconds === null || seconds === undefined) return "–";
    seconds = Math.max(0, seconds);
    if (seconds < 60) return seconds.toFixed(0) + " s";
    const m = Math.floor(seconds / 60), s = Math.floor(seconds % 60);
    if (m < 60) return m + " m " + String(s).padStart(2, "0") + " s";
    const hrs = Math.floor(m / 60);
    return hrs + " h " + String(m % 60).padStart(2, "0") + " m";
  }

  function ms(v) {
    return v === null || v === undefined ? "–" : (v < 10 ? v.toFixed(2) : v.toFixed(0)) + " ms";
  }

  function ago(iso) {
    if (!iso) return "never";
    const s = (Date.now() - Date.parse(iso)) / 1000;
    return isFinite(s) ? duration(s) + " ago" : iso;
  }

  function badge(state) {
    return h("span", { class: "badge s-" + state }, state);
  }

  // A sparkline of `values` (nulls are gaps drawn as 0).
  function spark(values, colour, label) {
    const w = 120, hgt = 28, max = Math.max(1e-9, ...values.map(v => v || 0));
    const step = values.length > 1 ? w / (values.length - 1) : w;
    const pts = values.map((v, i) =>
      (i * step).toFixed(1) + "," + (hgt - 2 - ((v || 0) / max) * (hgt - 4)).toFixed(1));
    const s = svg("svg", { class: "spark", viewBox: "0 0 " + w + " " + hgt, role: "img" });
    const title = svg("title", {});
    title.textContent = label;
    s.append(title, svg("polyline", { points: pts.join(" "), stroke: colour }));
    return s;
  }

  function remaining(p) {
    if (p.expires_in_seconds === null || p.expires_in_seconds === undefined) return null;
    return Math.max(0, p.expires_in_seconds - (performance.now() - fetchedAt) / 1000);
  }

  function expiryCell(p) {
    const left = remaining(p);
    const cell = h("td", { class: "num expiry", "data-expires-in": left === null ? "" : left.toFixed(0) },
      left === null ? "no token" : duration(left));
    if (left !== null && p.lifetime_seconds) {
      const pct = Math.max(0, Math.min(100, (100 * left) / p.lifetime_seconds));
      const bar = h("div", { class: "bar" }, h("i", { style: null }));
      bar.firstChild.style.width = pct.toFixed(1) + "%";
      cell.append(bar);
    }
    return cell;
  }

  function profileRow(name, p) {
    const dots = h("div", { class: "dots" });
    for (const f of p.recent_fetches || []) {
      const ok = f.outcome === "success";
      const dot = h("span", { class: ok ? "s-success" : "s-error" });
      dot.title = f.at + " · " + f.outcome + (f.oauth_error ? " (" + f.oauth_error + ")" : "") +
        " · " + ms(f.duration_ms);
      dots.append(dot);
    }
    const lastFetch = (p.recent_fetches || []).slice(-1)[0];
    const error = p.last_error
      ? h("div", { class: "err" }, p.oauth_error ? h("b", { class: "oauth-error" }, p.oauth_error) : null,
          p.oauth_error ? " · " : null, p.last_error)
      : h("span", { class: "muted" }, "none");
    const next = p.next_attempt_in_seconds !== null && p.next_attempt_in_seconds !== undefined
      ? h("div", { class: "muted" }, "next attempt in " + duration(p.next_attempt_in_seconds)) : null;
    return h("tr", { "data-profile": name, "data-state": p.state },
      h("td", {}, h("b", {}, name), h("div", { class: "muted" }, p.kind + " · " + (p.scopes || []).join(" ")),
        h("div", { class: "muted" }, p.token_url)),
      h("td", {}, badge(p.state), p.token_fingerprint ? h("div", { class: "muted" }, "token " + p.token_fingerprint) : null,
        p.token_source ? h("div", { class: "muted" }, "from " + ({ cache: "the shared cache", previous_settings: "the settings before the last reload: the new ones have no token yet" }[p.token_source] || "the endpoint")) : null),
      expiryCell(p),
      h("td", {}, ago(p.last_refresh)),
      h("td", { class: "num" }, p.fetch_count, p.failures_in_a_row ? h("div", { class: "err" }, p.failures_in_a_row + " failed in a row") : null),
      h("td", {}, dots, lastFetch ? h("div", { class: "muted" }, "last took " + ms(lastFetch.duration_ms)) : null),
      h("td", {}, error, next));
  }

  function routeRow(r) {
    const rec = r.recent || { last_minute: {}, points: [] };
    const m = rec.last_minute;
    const pts = rec.points || [];
    const match = [r.host, r.path_prefix, r.methods ? r.methods.join(",") : null].filter(Boolean).join(" ");
    return h("tr", { "data-route": r.name, "data-requests-total": rec.requests_total || 0 },
      h("td", {}, h("b", {}, r.name), h("div", { class: "muted" }, match)),
      h("td", {}, r.upstream),
      h("td", {}, r.profile),
      h("td", { class: "num" }, (m.rate_per_second || 0).toFixed(2)),
      h("td", { class: "num" }, ((m.error_rate || 0) * 100).toFixed(1) + " %"),
      h("td", { class: "num" }, ms(m.p50_ms)),
      h("td", { class: "num" }, ms(m.p99_ms)),
      h("td", { class: "num requests-total" }, rec.requests_total || 0),
      h("td", {}, spark(pts.map(p => p.requests), "#0969da", "requests per " + rec.bucket_seconds + " s")),
      h("td", {}, spark(pts.map(p => p.server_errors), "#cf222e", "5xx per " + rec.bucket_seconds + " s")),
      h("td", {}, spark(pts.map(p => p.p99_ms), "#8250df", "p99 latency (ms)")));
  }

  // Any further object in /status (token cache, egress proxy...) as a definition list.
  function extras(status) {
    const known = new Set(["version", "generation", "ready", "profiles", "routes", "reload",
      "uptime_seconds", "restart_needed"]);
    const out = [];
    for (const [key, value] of Object.entries(status)) {
      if (known.has(key) || value === null || typeof value !== "object") continue;
      const dl = h("dl", { "data-section": key });
      for (const [k, v] of Object.entries(value)) {
        dl.append(h("dt", {}, k), h("dd", {}, typeof v === "object" && v !== null ? JSON.stringify(v) : v));
      }
      out.push(h("section", {}, h("h2", {}, key.replace(/_/g, " ")), dl));
    }
    return out;
  }

  function summary(s) {
    const reload = s.reload
      ? (s.reload.error
        ? h("span", { class: "badge s-error", "data-reload": "error", title: s.reload.error }, "last reload failed " + ago(s.reload.at))
        : h("span", { "data-reload": "success" }, "last reload " + ago(s.reload.at)))
      : h("span", {}, "never reloaded");
    return [
      h("span", {}, "version ", h("b", {}, s.version)), " · ",
      h("span", { "data-generation": s.generation }, "config generation ", h("b", {}, s.generation)), " · ",
      reload, " · ",
      h("span", {}, "up ", duration(s.uptime_seconds)), " · ",
      s.ready ? h("span", { class: "badge s-ok" }, "ready") : h("span", { class: "badge s-failed" }, "not ready"),
      s.reload && s.reload.error ? h("div", { class: "err" }, s.reload.error) : null,
      (s.restart_needed || []).length
        ? h("div", { class: "err", "data-restart-needed": s.restart_needed.join(",") },
          "restart to apply: " + s.restart_needed.join(", "))
        : null,
    ].filter(x => x !== null);
  }

  function render() {
    if (!last) return;
    document.getElementById("summary").replaceChildren(...summary(last));
    document.querySelector("#profiles tbody").replaceChildren(
      ...Object.entries(last.profiles || {}).map(([n, p]) => profileRow(n, p)));
    document.querySelector("#routes tbody").replaceChildren(...(last.routes || []).map(routeRow));
    const first = (last.routes || [])[0];
    document.getElementById("window").textContent = first && first.recent
      ? "last minute; charts: last " + (first.recent.points.length * first.recent.bucket_seconds / 60) +
        " minutes in " + first.recent.bucket_seconds + " s steps" : "";
    document.getElementById("extras").replaceChildren(...extras(last));
  }

  // Between refreshes only the countdowns move.
  function tick() {
    if (!last) return;
    for (const row of document.querySelectorAll("#profiles tr[data-profile]")) {
      const p = (last.profiles || {})[row.getAttribute("data-profile")];
      if (p) row.replaceChild(expiryCell(p), row.querySelector("td.expiry"));
    }
  }

  async function refresh() {
    const banner = document.getElementById("banner");
    try {
      const r = await fetch("/status", { cache: "no-store", credentials: "same-origin" });
      if (!r.ok) throw new Error("/status answered " + r.status);
      last = await r.json();
      fetchedAt = performance.now();
      loads += 1;
      document.body.setAttribute("data-loads", loads);
      banner.hidden = true;
      render();
    } catch (e) {
      banner.textContent = "Cannot reach the admin listener: " + e.message + " (showing the last data)";
      banner.hidden = false;
    }
  }

  refresh();
  setInterval(refresh, REFRESH_MS);
  setInterval(tick, 1000);
})();
