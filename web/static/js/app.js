/* BatchSender dashboard: small behaviours and the charts (uPlot). No inline scripts
   (the pages' Content-Security-Policy allows none); htmx does the live parts. */
(function () {
  "use strict";

  // --- confirmations, auto-submitting filters, copy buttons, toggled field groups ----
  document.addEventListener("submit", function (event) {
    var form = event.target;
    var question = form.getAttribute && form.getAttribute("data-confirm");
    if (form.hasAttribute("hx-post")) return;  // htmx asks (htmx:confirm below)
    if (question && !window.confirm(question)) {
      event.preventDefault();
      event.stopImmediatePropagation();
    }
  }, true);
  document.addEventListener("htmx:confirm", function (event) {
    var form = event.target.closest && event.target.closest("form[data-confirm]");
    if (!form) return;
    event.preventDefault();
    if (window.confirm(form.getAttribute("data-confirm"))) event.detail.issueRequest(true);
  });
  document.addEventListener("change", function (event) {
    var el = event.target;
    if (el.hasAttribute && el.hasAttribute("data-autosubmit") && el.form) el.form.requestSubmit();
    if (el.hasAttribute && el.hasAttribute("data-toggles")) toggle(el);
  });
  document.addEventListener("click", function (event) {
    var button = event.target.closest && event.target.closest("[data-copy]");
    if (!button) return;
    var source = document.querySelector(button.getAttribute("data-copy"));
    if (!source || !navigator.clipboard) return;
    navigator.clipboard.writeText(source.textContent.trim()).then(function () {
      button.textContent = "Copied";
      setTimeout(function () { button.textContent = "Copy"; }, 2000);
    });
  });
  function toggle(select) {
    document.querySelectorAll(select.getAttribute("data-toggles")).forEach(function (group) {
      group.hidden = group.getAttribute("data-for") !== select.value;
    });
  }

  // --- charts ---------------------------------------------------------------------
  var COLORS = {
    sent: "#4f46e5", delivered: "#16a34a", failed: "#dc2626", bounced: "#ea580c",
    complained: "#9333ea", opened: "#0891b2", clicked: "#ca8a04", delivery: "#16a34a",
    bounce: "#ea580c", complaint: "#9333ea", open: "#0891b2", click: "#ca8a04"
  };
  var PALETTE = ["#4f46e5", "#0891b2", "#16a34a", "#ea580c", "#9333ea", "#ca8a04", "#db2777", "#475569"];
  var fetches = {};  // one request per data URL per refresh, shared by its charts

  function load(src) {
    var now = Date.now();
    var hit = fetches[src];
    if (hit && now - hit.at < 1500) return hit.promise;
    var promise = fetch(src, { headers: { Accept: "application/json" }, credentials: "same-origin" })
      .then(function (response) {
        if (response.status === 401) { window.location.assign("/login?reason=expired"); }
        return response.json().then(function (body) {
          if (!response.ok) throw new Error(body.error || ("HTTP " + response.status));
          return body;
        });
      });
    fetches[src] = { at: now, promise: promise };
    return promise;
  }

  function pick(obj, path) {
    return path.split(".").reduce(function (o, k) { return o == null ? o : o[k]; }, obj);
  }

  function format(value, percent) {
    if (value == null) return "—";
    if (percent) return (value * 100).toFixed(1) + "%";
    if (Math.abs(value) >= 1000) return Math.round(value).toLocaleString();
    return (Math.round(value * 100) / 100).toLocaleString();
  }

  function draw(figure, chart) {
    var canvas = figure.querySelector(".chart-canvas");
    var state = figure.querySelector(".chart-state");
    var percent = figure.hasAttribute("data-percent");
    var points = 0, known = 0;
    chart.series.forEach(function (s) {
      s.values.forEach(function (v) { if (v != null) { known++; if (v !== 0) points++; } });
    });
    figure.setAttribute("data-points", String(points));  // values other than zero
    state.classList.remove("error");
    state.textContent = chart.x.length && known ? "" :
      (figure.getAttribute("data-empty") || "No data in this range yet");
    var data = [chart.x].concat(chart.series.map(function (s) { return s.values; }));
    var width = Math.max(canvas.clientWidth, 260);
    if (figure._plot && figure._plot.series.length === chart.series.length + 1) {
      figure._plot.setData(data);
      return;
    }
    if (figure._plot) figure._plot.destroy();
    var series = [{}].concat(chart.series.map(function (s, i) {
      var color = COLORS[s.label] || PALETTE[i % PALETTE.length];
      var known = s.values.filter(function (v) { return v != null; }).length;
      return {
        label: s.label, stroke: color, width: 2, fill: chart.series.length === 1 ? color + "22" : undefined,
        spanGaps: false, points: { show: chart.x.length < 40 || known < 12, size: 6, fill: color },
        value: function (u, v) { return format(v, percent); }
      };
    }));
    figure._plot = new uPlot({
      width: width, height: 240, series: series,
      scales: { x: { time: true }, y: { range: function (u, min, max) { return [0, Math.max(max || 0, percent ? 0.05 : 1) * 1.1]; } } },
      axes: [
        { stroke: "#5b6472", grid: { stroke: "#eef0f5" }, ticks: { stroke: "#e3e6ee" } },
        { stroke: "#5b6472", grid: { stroke: "#eef0f5" }, ticks: { stroke: "#e3e6ee" }, size: 64,
          values: function (u, vals) {
            return vals.map(function (v) { return percent ? Math.round(v * 100) + "%" : format(v); });
          } }
      ],
      legend: { live: true },
      cursor: { drag: { x: false, y: false } }
    }, data, canvas);
    canvas.setAttribute("aria-label", (canvas.getAttribute("aria-label") || "").split(" (")[0] +
      " (" + chart.series.map(function (s) { return s.label; }).join(", ") + ")");
  }

  function bind(figure, body) {
    document.querySelectorAll("[data-latency='#" + figure.id + "'] [data-bind], [data-latency='#" + figure.id + "'] ~ p [data-bind]").forEach(function (el) {
      var v = pick(body, el.getAttribute("data-bind"));
      el.textContent = v == null ? "—" : format(v);
    });
    document.querySelectorAll("[data-latest='#" + figure.id + "']").forEach(function (el) {
      var chart = pick(body, figure.getAttribute("data-key"));
      if (!chart || !chart.latest) return;
      var total = chart.latest.reduce(function (a, v) { return v == null ? a : a + v; }, 0);
      el.textContent = "now " + format(total);
    });
  }

  function refresh(figure) {
    if (!document.body.contains(figure)) return;
    var state = figure.querySelector(".chart-state");
    load(figure.getAttribute("data-src")).then(function (body) {
      var chart = pick(body, figure.getAttribute("data-key"));
      if (!chart) throw new Error("no data");
      draw(figure, chart);
      bind(figure, body);
    }).catch(function (error) {
      state.textContent = error.message || "Could not load the chart";
      state.classList.add("error");
      figure.setAttribute("data-error", state.textContent);
    }).finally(function () {
      var every = parseInt(figure.getAttribute("data-refresh") || "0", 10);
      if (every > 0) setTimeout(function () { refresh(figure); }, every * 1000);
    });
  }

  function start() {
    document.querySelectorAll("[data-chart]").forEach(function (figure) {
      if (figure._started) return;
      figure._started = true;
      refresh(figure);
      if (window.ResizeObserver) {
        new ResizeObserver(function () {
          var canvas = figure.querySelector(".chart-canvas");
          if (figure._plot) figure._plot.setSize({ width: Math.max(canvas.clientWidth, 260), height: 240 });
        }).observe(figure.querySelector(".chart-canvas"));
      }
    });
    document.querySelectorAll("[data-toggles]").forEach(toggle);
  }

  document.addEventListener("DOMContentLoaded", start);
  document.addEventListener("htmx:afterSettle", start);
})();
