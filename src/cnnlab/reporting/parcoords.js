// Interactive parallel coordinates for cnnlab reports: no library, no network. Each element with class
// "parcoords" holds its data as JSON in a <script type="application/json"> child. Drag along an axis to keep only
// the trials inside that range (several axes combine); click an axis without dragging to clear its range; the
// arrows move an axis left or right; the table below lists the kept trials, sorted by a click on a column head.
(function () {
  "use strict";
  var SVG = "http://www.w3.org/2000/svg";
  function el(name, attrs, parent) {
    var e = document.createElementNS(SVG, name);
    for (var k in attrs) e.setAttribute(k, attrs[k]);
    if (parent) parent.appendChild(e);
    return e;
  }
  function fmt(v) {
    if (typeof v !== "number") return String(v);
    if (v !== 0 && (Math.abs(v) < 1e-2 || Math.abs(v) >= 1e4)) return v.toExponential(1);
    return String(Math.round(v * 1000) / 1000);
  }
  function colour(t) { // viridis-like, from dark purple (worst) to yellow (best)
    var stops = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
    var x = Math.max(0, Math.min(1, t)) * (stops.length - 1), i = Math.min(Math.floor(x), stops.length - 2), f = x - i;
    var c = stops[i].map(function (a, j) { return Math.round(a + f * (stops[i + 1][j] - a)); });
    return "rgb(" + c.join(",") + ")";
  }

  function Plot(root) {
    var data = JSON.parse(root.querySelector("script[type='application/json']").textContent);
    this.root = root;
    this.dims = data.dims.concat([{name: data.metric, kind: "num", metric: true}]);
    this.rows = data.rows.map(function (r) { return {id: r.id, state: r.state, v: r.values.concat([r.metric])}; });
    this.goal = data.goal;
    this.order = this.dims.map(function (_, i) { return i; });
    this.brush = {};
    this.sortKey = this.dims.length - 1;
    this.sortDown = data.goal === "maximize";
    this.scales();
    this.svgBox = root.querySelector(".pc-svg");
    this.count = root.querySelector(".pc-count");
    this.table = root.querySelector(".pc-table");
    this.draw();
  }

  Plot.prototype.scales = function () {
    var rows = this.rows;
    this.dims.forEach(function (d, j) {
      var vals = rows.map(function (r) { return r.v[j]; });
      if (d.kind === "cat") {
        d.cats = d.cats || Array.from(new Set(vals.map(String))).sort();
        d.pos = function (v) { var k = d.cats.indexOf(String(v)); return d.cats.length > 1 ? k / (d.cats.length - 1) : 0.5; };
        d.ticks = d.cats.map(function (c) { return [d.pos(c), c]; });
        return;
      }
      var f = d.kind === "log" ? function (v) { return Math.log10(v); } : function (v) { return v; };
      var xs = vals.filter(function (v) { return typeof v === "number" && isFinite(v); }).map(f);
      var lo = Math.min.apply(null, xs), hi = Math.max.apply(null, xs);
      if (!isFinite(lo)) { lo = 0; hi = 1; }
      d.pos = function (v) { return hi > lo ? (f(v) - lo) / (hi - lo) : 0.5; };
      d.ticks = [];
      for (var k = 0; k <= 4; k++) {
        var x = lo + (hi - lo) * k / 4;
        d.ticks.push([hi > lo ? k / 4 : 0.5, fmt(d.kind === "log" ? Math.pow(10, x) : x)]);
        if (hi === lo) break;
      }
    });
    var m = this.dims.length - 1, ys = rows.map(function (r) { return r.v[m]; }).filter(isFinite);
    this.mlo = Math.min.apply(null, ys); this.mhi = Math.max.apply(null, ys);
  };

  Plot.prototype.kept = function (r) {
    for (var j in this.brush) {
      var b = this.brush[j], p = this.dims[j].pos(r.v[j]);
      if (!(p >= b[0] && p <= b[1])) return false;
    }
    return true;
  };

  Plot.prototype.draw = function () {
    var self = this, n = this.order.length, gap = 104, left = 40, top = 46, h = 240;
    var width = left * 2 + gap * (n - 1) + 60;
    this.svgBox.replaceChildren();
    var svg = el("svg", {width: width, height: top + h + 30, viewBox: "0 0 " + width + " " + (top + h + 30),
                         role: "img", "aria-label": "parallel coordinates of the sweep's trials"}, this.svgBox);
    var y = function (p) { return top + (1 - p) * h; };
    var lines = el("g", {"class": "pc-lines"}, svg);
    var kept = 0;
    var ranked = this.rows.slice().sort(function (a, b) { return (a.v[n - 1] - b.v[n - 1]) * (self.goal === "maximize" ? 1 : -1); });
    ranked.forEach(function (r) {
      var pts = self.order.map(function (j, i) { return (left + i * gap) + "," + y(self.dims[j].pos(r.v[j])); });
      var t = self.mhi > self.mlo ? (r.v[self.dims.length - 1] - self.mlo) / (self.mhi - self.mlo) : 1;
      if (self.goal !== "maximize") t = 1 - t;
      var on = self.kept(r);
      kept += on;
      el("polyline", {points: pts.join(" "), "class": "pc-line" + (on ? "" : " pc-out") + (r.state === "pruned" ? " pc-pruned" : ""),
                      stroke: on ? colour(t) : "#ccc", "data-trial": r.id}, lines);
    });
    this.order.forEach(function (j, i) {
      var d = self.dims[j], x = left + i * gap;
      var g = el("g", {"class": "pc-axis", "data-name": d.name, transform: "translate(" + x + ",0)"}, svg);
      el("line", {x1: 0, x2: 0, y1: top, y2: top + h, stroke: "#333"}, g);
      d.ticks.forEach(function (tk) {
        el("line", {x1: -3, x2: 0, y1: y(tk[0]), y2: y(tk[0]), stroke: "#333"}, g);
        var label = el("text", {x: 5, y: y(tk[0]) + 3, "class": "pc-tick"}, g);
        label.textContent = tk[1].length > 12 ? tk[1].slice(0, 11) + "…" : tk[1];
      });
      var name = el("text", {x: 0, y: top - 24, "text-anchor": "middle", "class": "pc-name" + (d.metric ? " pc-metric" : "")}, g);
      name.textContent = d.name.length > 14 ? d.name.slice(0, 13) + "…" : d.name;
      el("title", {}, name).textContent = d.name + " (click: sort the table by it)";
      name.addEventListener("click", function () { self.sortBy(j); });
      [["◀", -1, -30], ["▶", 1, 18]].forEach(function (a) {
        if ((a[1] < 0 && i === 0) || (a[1] > 0 && i === n - 1)) return;
        var b = el("text", {x: a[2] + 6, y: top - 8, "class": "pc-move", role: "button",
                            "aria-label": "move " + d.name + (a[1] < 0 ? " left" : " right")}, g);
        b.textContent = a[0];
        b.addEventListener("click", function () { self.move(i, a[1]); });
      });
      if (self.brush[j]) {
        var bb = self.brush[j];
        el("rect", {x: -7, width: 14, y: y(bb[1]), height: Math.max(2, y(bb[0]) - y(bb[1])), "class": "pc-brush"}, g);
      }
      var hit = el("rect", {x: -14, width: 28, y: top - 4, height: h + 8, "class": "pc-hit", "data-axis": j}, g);
      self.brushable(hit, j, y, top, h);
    });
    this.count.textContent = kept + " of " + this.rows.length + " trials kept" +
      (Object.keys(this.brush).length ? " (click an axis to clear its range)" : " (drag along an axis to keep a range)");
    this.drawTable();
  };

  Plot.prototype.brushable = function (hit, j, y, top, h) {
    var self = this;
    hit.addEventListener("pointerdown", function (ev) {
      ev.preventDefault();
      var box = hit.getBoundingClientRect(), scale = (h + 8) / box.height;
      var at = function (e) { return Math.max(0, Math.min(1, 1 - ((e.clientY - box.top) * scale - 4) / h)); };
      var start = at(ev), moved = false;
      hit.setPointerCapture && hit.setPointerCapture(ev.pointerId);
      var move = function (e) {
        var now = at(e);
        if (Math.abs(now - start) > 0.02) moved = true;
        if (moved) { self.brush[j] = [Math.min(start, now), Math.max(start, now)]; self.drawLinesOnly(); }
      };
      var up = function () {
        hit.removeEventListener("pointermove", move);
        hit.removeEventListener("pointerup", up);
        if (!moved) delete self.brush[j];
        self.draw();
      };
      hit.addEventListener("pointermove", move);
      hit.addEventListener("pointerup", up);
    });
  };

  Plot.prototype.drawLinesOnly = function () {
    var self = this;
    var byId = {};
    this.rows.forEach(function (r) { byId[r.id] = r; });
    this.svgBox.querySelectorAll(".pc-line").forEach(function (line) {
      var on = self.kept(byId[line.getAttribute("data-trial")]);
      line.classList.toggle("pc-out", !on);
    });
  };

  Plot.prototype.move = function (i, step) {
    var k = i + step, o = this.order;
    if (k < 0 || k >= o.length) return;
    var t = o[i]; o[i] = o[k]; o[k] = t;
    this.draw();
  };

  Plot.prototype.sortBy = function (j) {
    if (this.sortKey === j) this.sortDown = !this.sortDown;
    else { this.sortKey = j; this.sortDown = true; }
    this.drawTable();
  };

  Plot.prototype.drawTable = function () {
    var self = this, j = this.sortKey, sign = this.sortDown ? -1 : 1;
    var rows = this.rows.filter(function (r) { return self.kept(r); }).sort(function (a, b) {
      var x = a.v[j], z = b.v[j];
      if (typeof x === "number" && typeof z === "number") return sign * (x - z);
      return sign * String(x).localeCompare(String(z));
    });
    // Built with createElement and textContent, never innerHTML: a swept value is data (a free-text key such as
    // wandb_project can hold markup), so nothing from the sweep can become an element or a handler here.
    var tableEl = document.createElement("table"), headRow = tableEl.insertRow();
    var th = function (text, col) {
      var cell = document.createElement("th");
      cell.textContent = text;
      if (col !== undefined) {
        cell.setAttribute("data-col", String(col));
        cell.addEventListener("click", function () { self.sortBy(col); });
      }
      headRow.appendChild(cell);
    };
    th("trial");
    this.order.forEach(function (k) { th(self.dims[k].name + (k === j ? (self.sortDown ? " ▼" : " ▲") : ""), k); });
    th("state");
    rows.forEach(function (r) {
      var tr = tableEl.insertRow();
      var td = function (text) { tr.insertCell().textContent = text; };
      td(String(r.id));
      self.order.forEach(function (k) { td(fmt(r.v[k])); });
      td(String(r.state));
    });
    this.table.replaceChildren(tableEl);
  };

  document.querySelectorAll(".parcoords").forEach(function (root) { root.plot = new Plot(root); });
})();
