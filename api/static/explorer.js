// cbmflow parcel explorer: plain JavaScript on the API's own routes, no build step.
//
// Everything the page shows is also in `window.explorer.state` (and the uPlot instances in
// `window.explorer.charts`), so a browser test reads the same numbers a person sees.
"use strict";

(function () {
  const TOKEN_KEY = "cbmflow.session";
  const DAY_S = 86400;
  const CHART_HEIGHT = 112;
  // Okabe-Ito: distinguishable with the common colour-vision deficiencies.
  const CROP_COLOURS = ["#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7", "#999999",
    "#8C510A", "#01665E", "#762A83", "#B2182B"];
  const MARKERS = {
    clear: { shape: "circle", colour: "#1b7837", fill: true, label: "cloud-free (SCL)" },
    cloudy: { shape: "cross", colour: "#8a8a8a", fill: false, alpha: 0.55, label: "cloudy / masked" },
    vv: { shape: "square", colour: "#2166ac", fill: true, label: "VV" },
    vh: { shape: "triangle", colour: "#c2410c", fill: true, label: "VH" },
    cvv: { shape: "diamond", colour: "#2166ac", fill: true, label: "VV" },
    cvh: { shape: "ring", colour: "#c2410c", fill: false, label: "VH" },
  };

  const state = {
    status: "starting", // starting | login | ready | loading-parcel | parcel | error
    user: null,
    datasets: [],
    aoi: null,
    year: null,
    tilejson: null,
    scenes: [],
    scene: null,
    pid: null,
    parcel: null, // {pid, crop, crop_code, area_m2, lon, lat}
    ndvi: [], // {acquired, t, scene_id, value, cloud, clear}
    s1: [], // {acquired, t, scene_id, vv, vh, vv_db, vh_db}
    coherence: [], // {acquired, t, scene_id, vv, vh}
    selected: null, // seconds since the epoch of the date shown in the readout
    timings: {}, // clickToChartMs, deepLinkToChartMs
    error: null,
  };
  const charts = { ndvi: null, s1: null, coherence: null };
  const chipCache = new Map();
  let map = null;
  let loadSeq = 0;
  let hovered = null; // the chart under the mouse pointer

  const $ = (id) => document.getElementById(id);
  window.explorer = { state, charts, openParcel, get map() { return map; } };

  // --- the API -------------------------------------------------------------------------------

  class AuthError extends Error {}

  async function api(path, params, accept) {
    const url = new URL(path, location.origin);
    for (const [k, v] of Object.entries(params || {})) {
      if (v !== undefined && v !== null) url.searchParams.set(k, v);
    }
    const resp = await fetch(url, { headers: { Authorization: "Bearer " + state.token } });
    if (resp.status === 401) {
      logout("Your session ended; log in again.");
      throw new AuthError("unauthorized");
    }
    if (!resp.ok) {
      let message = resp.status + " " + resp.statusText;
      try { message = (await resp.json()).error.message; } catch (_) { /* not JSON */ }
      const err = new Error(message);
      err.status = resp.status;
      throw err;
    }
    return accept === "text" ? resp.text() : resp.json();
  }

  function datasetBase() {
    return "/api/v1/datasets/" + encodeURIComponent(state.aoi) + "/" + state.year;
  }

  // --- login ---------------------------------------------------------------------------------

  function basic(user, password) {
    const bytes = new TextEncoder().encode(user + ":" + password);
    let text = "";
    bytes.forEach((b) => { text += String.fromCharCode(b); });
    return "Basic " + btoa(text);
  }

  async function login(event) {
    event.preventDefault();
    $("login-error").textContent = "";
    const user = $("login-user").value;
    const password = $("login-password").value;
    try {
      const resp = await fetch("/api/v1/auth/token", { method: "POST", headers: { Authorization: basic(user, password) } });
      const body = await resp.json();
      if (!resp.ok) throw new Error(body.error ? body.error.message : resp.statusText);
      sessionStorage.setItem(TOKEN_KEY, body.token);
      $("login-password").value = "";
      await start();
    } catch (err) {
      $("login-error").textContent = "Login failed: " + err.message;
    }
  }

  function logout(message) {
    sessionStorage.removeItem(TOKEN_KEY);
    state.token = null;
    state.user = null;
    state.status = "login";
    $("main").hidden = true;
    $("controls").hidden = true;
    $("who").hidden = true;
    $("login").hidden = false;
    $("login-error").textContent = message || "";
    $("login-user").focus();
  }

  // --- start-up ------------------------------------------------------------------------------

  async function start() {
    state.status = "starting";
    // `#token=...` (scripted use): kept for the tab, then taken out of the address bar.
    const hash = new URLSearchParams(location.hash.slice(1));
    if (hash.get("token")) {
      sessionStorage.setItem(TOKEN_KEY, hash.get("token"));
      history.replaceState(null, "", location.pathname + location.search);
    }
    state.token = sessionStorage.getItem(TOKEN_KEY);
    if (!state.token) {
      logout("");
      return;
    }
    let who;
    try {
      who = await api("/api/v1/auth/token");
    } catch (err) {
      if (!(err instanceof AuthError)) logout("Could not reach the API: " + err.message);
      return;
    }
    // A new login (another user, a pasted #token link) starts from nothing of the previous one.
    clearParcel();
    if (map) { map.remove(); map = null; }
    $("legend").replaceChildren();
    $("map-hint").textContent = "";
    $("panel-error").textContent = "";
    $("panel-empty").textContent = "Click a parcel on the map, or type its id above.";
    state.aoi = null;
    state.year = null;
    state.tilejson = null;
    state.scenes = [];
    state.user = who.user;
    $("who-name").textContent = who.user + (who.expires_at ? " (session until " + who.expires_at.slice(11, 16) + " UTC)" : "");
    $("login").hidden = true;
    $("who").hidden = false;
    $("controls").hidden = false;
    $("main").hidden = false;

    state.datasets = (await api("/api/v1/datasets")).datasets;
    const select = $("dataset");
    select.replaceChildren();
    for (const ds of state.datasets) {
      const opt = document.createElement("option");
      opt.value = ds.aoi + "/" + ds.year;
      opt.textContent = ds.aoi + " " + ds.year + (ds.description ? " — " + ds.description : "");
      select.append(opt);
    }
    const query = new URLSearchParams(location.search);
    const wanted = state.datasets.find((d) => d.aoi === query.get("dataset") && String(d.year) === (query.get("year") || String(d.year)));
    if (!state.datasets.length) {
      state.status = "ready";
      $("map-hint").textContent = "No dataset is granted to " + who.user + ".";
      $("panel-empty").textContent = "Ask an administrator for a grant (cbmflow users grant).";
      return;
    }
    if (query.get("dataset") && !wanted) {
      $("panel-error").textContent = "Dataset " + query.get("dataset") + " " + (query.get("year") || "") + " is not available to you.";
    }
    const ds = wanted || state.datasets[0];
    select.value = ds.aoi + "/" + ds.year;
    await openDataset(ds.aoi, ds.year, wanted ? query.get("pid") : null);
  }

  async function openDataset(aoi, year, pid) {
    const started = performance.now();
    state.aoi = aoi;
    state.year = Number(year);
    state.status = "loading-dataset";
    clearParcel();
    // A deep link's parcel is asked for while the map starts, and its charts are drawn before
    // the background imagery is requested (the slowest thing the API renders).
    const pending = pid ? fetchParcel(pid) : null;
    if (pending) pending.catch(() => {}); // its error is reported by openParcel below
    state.tilejson = await api(datasetBase() + "/tiles.json");
    buildLegend(state.tilejson.crops);
    buildMap(state.tilejson);
    if (pid) await openParcel(pid, { fly: true, timing: "deepLinkToChartMs", started, pending });
    await loadScenes();
    if (!pid) state.status = "ready";
    updateUrl();
  }

  // --- the map -------------------------------------------------------------------------------

  function cropColour(crops) {
    const expr = ["match", ["coalesce", ["get", "crop"], ""]];
    crops.forEach((c, i) => { expr.push(c.name, CROP_COLOURS[i % CROP_COLOURS.length]); });
    expr.push("#bbbbbb");
    return crops.length ? expr : "#bbbbbb";
  }

  function buildLegend(crops) {
    const legend = $("legend");
    legend.replaceChildren();
    crops.slice(0, CROP_COLOURS.length).forEach((c, i) => {
      const row = document.createElement("div");
      const sw = document.createElement("span");
      sw.className = "swatch";
      sw.style.background = CROP_COLOURS[i];
      row.append(sw, document.createTextNode((c.name || "(no crop)") + " · " + c.parcels));
      legend.append(row);
    });
  }

  function authorised(url) {
    if (url.startsWith(location.origin + "/api/")) {
      return { url, headers: { Authorization: "Bearer " + state.token } };
    }
    return { url };
  }

  function buildMap(tj) {
    if (map) map.remove();
    state.mapLoaded = false;
    maplibregl.setWorkerUrl("/static/maplibre-gl-csp-worker.js");
    map = new maplibregl.Map({
      container: "map",
      style: {
        version: 8,
        sources: { parcels: { type: "vector", tiles: tj.tiles, minzoom: tj.minzoom, maxzoom: 16, bounds: tj.bounds } },
        layers: [
          { id: "background", type: "background", paint: { "background-color": "#e9e9e2" } },
          { id: "parcels-fill", type: "fill", source: "parcels", "source-layer": "parcels",
            paint: { "fill-color": cropColour(tj.crops), "fill-opacity": 0.45 } },
          { id: "parcels-line", type: "line", source: "parcels", "source-layer": "parcels",
            paint: { "line-color": "#222", "line-width": 0.8 } },
          { id: "parcels-selected", type: "line", source: "parcels", "source-layer": "parcels",
            filter: ["==", ["get", "pid"], ""], paint: { "line-color": "#ff00aa", "line-width": 3 } },
        ],
      },
      bounds: [[tj.bounds[0], tj.bounds[1]], [tj.bounds[2], tj.bounds[3]]],
      fitBoundsOptions: { padding: 20 },
      maxZoom: 19,
      transformRequest: authorised,
      attributionControl: false,
      preserveDrawingBuffer: true, // the PNG export and screenshots read the canvas back
    });
    map.addControl(new maplibregl.NavigationControl({ showCompass: false }), "top-right");
    map.addControl(new maplibregl.ScaleControl(), "bottom-right");
    map.on("click", "parcels-fill", (e) => {
      const started = performance.now();
      const f = e.features && e.features[0];
      if (f) openParcel(f.properties.pid, { timing: "clickToChartMs", started });
    });
    map.on("mouseenter", "parcels-fill", () => { map.getCanvas().style.cursor = "pointer"; });
    map.on("mouseleave", "parcels-fill", () => { map.getCanvas().style.cursor = ""; });
    const hint = () => {
      $("map-hint").textContent = map.getZoom() < tj.minzoom - 0.01 ? "Zoom in to see parcels" : "";
    };
    map.on("zoomend", hint);
    map.on("load", () => { state.mapLoaded = true; hint(); });
    // Tile failures are kept (the last few) for whoever debugs a blank map, the browser test too.
    map.on("error", (e) => {
      state.mapErrors = [...(state.mapErrors || []).slice(-9), String(e.error && e.error.message ? e.error.message : e.error)];
    });
  }

  async function loadScenes() {
    const body = await api("/api/v1/scenes", { aoi: state.aoi, card: "s2", from: state.year + "-01-01", to: state.year + "-12-31", limit: 500 });
    state.scenes = body.scenes.slice().reverse(); // oldest first
    const select = $("scene");
    select.replaceChildren(new Option("none", ""));
    for (const s of state.scenes) select.append(new Option(s.acquired.slice(0, 10) + " " + s.product_name.slice(0, 3), String(s.id)));
    // Mid-season by default: the scene nearest to 1 July, among those in which the open parcel
    // (a deep link's) was cloud-free when there are any: a cloudy background helps nobody.
    const mid = Date.UTC(state.year, 6, 1) / 1000;
    const clear = new Set(state.ndvi.filter((o) => o.clear).map((o) => o.scene_id));
    const pool = state.scenes.some((s) => clear.has(s.id)) ? state.scenes.filter((s) => clear.has(s.id)) : state.scenes;
    let best = null;
    for (const s of pool) {
      if (best === null || Math.abs(Date.parse(s.acquired) / 1000 - mid) < Math.abs(Date.parse(best.acquired) / 1000 - mid)) best = s;
    }
    select.value = best ? String(best.id) : "";
    setScene(best ? best.id : null);
  }

  function setScene(id) {
    state.scene = id;
    const apply = () => {
      if (map.getLayer("imagery")) map.removeLayer("imagery");
      if (map.getSource("imagery")) map.removeSource("imagery");
      if (!id) return;
      map.addSource("imagery", {
        type: "raster", tileSize: 256, bounds: state.tilejson.bounds, maxzoom: 17,
        tiles: [location.origin + datasetBase() + "/scenes/" + id + "/truecolor/{z}/{x}/{y}.png"],
      });
      map.addLayer({ id: "imagery", type: "raster", source: "imagery" }, "parcels-fill");
    };
    // Not isStyleLoaded(): it is false for a moment after any style change (a filter), and the
    // "load" event that would then be awaited has long fired.
    if (state.mapLoaded) apply(); else map.once("load", apply);
  }

  // --- a parcel ------------------------------------------------------------------------------

  function clearParcel() {
    state.pid = null;
    state.parcel = null;
    state.ndvi = [];
    state.s1 = [];
    state.coherence = [];
    state.selected = null;
    $("panel-body").hidden = true;
    $("panel-empty").hidden = false;
    for (const key of Object.keys(charts)) {
      if (charts[key]) charts[key].destroy();
      charts[key] = null;
    }
  }

  const seconds = (iso) => Date.parse(iso) / 1000;

  function centroid(geometry) {
    // The middle of the bounding box is enough to place a 1.28 km chip on a parcel.
    let w = Infinity, s = Infinity, e = -Infinity, n = -Infinity;
    const walk = (c) => {
      if (typeof c[0] === "number") {
        w = Math.min(w, c[0]); e = Math.max(e, c[0]); s = Math.min(s, c[1]); n = Math.max(n, c[1]);
      } else c.forEach(walk);
    };
    walk(geometry.coordinates);
    return { lon: (w + e) / 2, lat: (s + n) / 2, bounds: [[w, s], [e, n]] };
  }

  function fetchParcel(pid) {
    // The five requests of a parcel, all at once.
    const base = datasetBase();
    const series = (card, bands) => api(base + "/timeseries", { pid, card, bands });
    return Promise.all([
      api(base + "/parcel", { pid }),
      api(base + "/index", { pid, index: "ndvi" }),
      api(base + "/index", { pid, index: "ndvi", max_cloud: 1 }),
      series("bs", "VVb,VHb"),
      series("c6", "VVc,VHc"),
    ]);
  }

  async function openParcel(pid, options) {
    options = options || {};
    const seq = ++loadSeq;
    const started = options.started || performance.now();
    state.status = "loading-parcel";
    state.error = null;
    $("panel-error").textContent = "";
    $("panel").setAttribute("aria-busy", "true");
    let parcel, clear, all, bs, c6;
    try {
      [parcel, clear, all, bs, c6] = await (options.pending || fetchParcel(pid));
    } catch (err) {
      if (seq !== loadSeq || err instanceof AuthError) return;
      state.status = "error";
      state.error = err.message;
      $("panel").setAttribute("aria-busy", "false");
      $("panel-error").textContent = err.status === 404 ? "No parcel " + pid + " in " + state.aoi + " " + state.year + "." : err.message;
      return;
    }
    if (seq !== loadSeq) return; // a later click won
    const where = centroid(parcel.geometry);
    state.pid = pid;
    state.parcel = { pid, crop: parcel.properties.crop_name, crop_code: parcel.properties.crop_code,
      area_m2: parcel.properties.area_m2, lon: where.lon, lat: where.lat };
    const clearScenes = new Set(clear.observations.map((o) => o.scene_id));
    state.ndvi = all.observations.filter((o) => o.value !== null).map((o) => ({
      acquired: o.acquired, t: seconds(o.acquired), scene_id: o.scene_id, value: o.value, cloud: o.cloud,
      clear: clearScenes.has(o.scene_id),
    }));
    state.s1 = pairs(bs.observations, "VVb", "VHb").map((p) => ({
      ...p, vv_db: p.vv > 0 ? 10 * Math.log10(p.vv) : null, vh_db: p.vh > 0 ? 10 * Math.log10(p.vh) : null,
    }));
    state.coherence = pairs(c6.observations, "VVc", "VHc");
    state.selected = null;
    showFacts();
    if (map) {
      map.setFilter("parcels-selected", ["==", ["get", "pid"], pid]);
      if (options.fly) map.fitBounds(where.bounds, { padding: 120, maxZoom: 17, duration: 0 });
    }
    drawCharts();
    updateUrl();
    $("panel").setAttribute("aria-busy", "false");
    requestAnimationFrame(() => {
      if (options.timing) state.timings[options.timing] = Math.round(performance.now() - started);
      state.status = "parcel";
    });
  }

  function pairs(observations, a, b) {
    // One row per scene with both polarisations' parcel means (the API gives one row per band).
    const by = new Map();
    for (const o of observations) {
      const row = by.get(o.scene_id) || { acquired: o.acquired, t: seconds(o.acquired), scene_id: o.scene_id, vv: null, vh: null };
      if (o.band === a) row.vv = o.mean;
      if (o.band === b) row.vh = o.mean;
      by.set(o.scene_id, row);
    }
    return [...by.values()].sort((x, y) => x.t - y.t || x.scene_id - y.scene_id);
  }

  function showFacts() {
    const p = state.parcel;
    $("panel-empty").hidden = true;
    $("panel-body").hidden = false;
    $("parcel-title").textContent = "Parcel " + p.pid;
    $("parcel-crop").textContent = (p.crop || "unknown") + (p.crop_code ? " (" + p.crop_code + ")" : "");
    $("parcel-area").textContent = (p.area_m2 / 10000).toFixed(2) + " ha (" + Math.round(p.area_m2).toLocaleString("en") + " m²)";
    $("readout-values").replaceChildren();
    showChip(null);
  }

  // --- charts --------------------------------------------------------------------------------

  function drawShape(ctx, shape, x, y, r) {
    ctx.beginPath();
    switch (shape) {
      case "circle": case "ring": ctx.arc(x, y, r, 0, 2 * Math.PI); break;
      case "square": ctx.rect(x - r, y - r, 2 * r, 2 * r); break;
      case "triangle": ctx.moveTo(x, y - r * 1.2); ctx.lineTo(x + r * 1.1, y + r * 0.9); ctx.lineTo(x - r * 1.1, y + r * 0.9); ctx.closePath(); break;
      case "diamond": ctx.moveTo(x, y - r * 1.3); ctx.lineTo(x + r * 1.1, y); ctx.lineTo(x, y + r * 1.3); ctx.lineTo(x - r * 1.1, y); ctx.closePath(); break;
      case "cross": ctx.moveTo(x - r, y - r); ctx.lineTo(x + r, y + r); ctx.moveTo(x + r, y - r); ctx.lineTo(x - r, y + r); break;
    }
  }

  function markerHook(u) {
    // uPlot draws lines; the markers are drawn here so that each series has its own shape.
    const ctx = u.ctx;
    const r = 4 * devicePixelRatio;
    ctx.save();
    ctx.beginPath();
    ctx.rect(u.bbox.left, u.bbox.top, u.bbox.width, u.bbox.height);
    ctx.clip();
    u.series.forEach((s, i) => {
      if (i === 0 || !s.show || !s.marker) return;
      const m = MARKERS[s.marker];
      ctx.globalAlpha = m.alpha || 1;
      ctx.strokeStyle = m.colour;
      ctx.fillStyle = m.colour;
      ctx.lineWidth = 1.6 * devicePixelRatio;
      u.data[i].forEach((v, j) => {
        if (v === null || v === undefined) return;
        const x = u.valToPos(u.data[0][j], "x", true);
        const y = u.valToPos(v, s.scale, true);
        drawShape(ctx, m.shape, x, y, r);
        if (m.fill && m.shape !== "cross") ctx.fill(); else ctx.stroke();
      });
    });
    ctx.restore();
  }

  function legendHtml(keys) {
    return keys.map((k) => {
      const m = MARKERS[k];
      const c = document.createElement("canvas");
      c.width = 14; c.height = 14;
      const ctx = c.getContext("2d");
      ctx.strokeStyle = m.colour; ctx.fillStyle = m.colour; ctx.lineWidth = 1.6; ctx.globalAlpha = m.alpha || 1;
      drawShape(ctx, m.shape, 7, 7, 4.5);
      if (m.fill && m.shape !== "cross") ctx.fill(); else ctx.stroke();
      return '<span><img alt="" width="14" height="14" src="' + c.toDataURL() + '">' + m.label + "</span>";
    }).join("");
  }

  function seasonRange() {
    const times = [...state.ndvi, ...state.s1, ...state.coherence].map((o) => o.t);
    if (!times.length) return [Date.UTC(state.year, 0, 1) / 1000, Date.UTC(state.year, 11, 31) / 1000];
    return [Math.min(...times) - 5 * DAY_S, Math.max(...times) + 5 * DAY_S];
  }

  function chartWidth() {
    return Math.max(280, $("panel").clientWidth - 30);
  }

  function makeChart(key, el, rows, seriesSpec, yRange) {
    if (charts[key]) charts[key].destroy();
    charts[key] = null;
    el.replaceChildren();
    if (!rows.length) {
      const p = document.createElement("p");
      p.className = "empty";
      p.textContent = { ndvi: "No Sentinel-2 observations of this parcel.", s1: "No backscatter observations of this parcel.",
        coherence: "No coherence observations of this parcel." }[key];
      el.append(p);
      el.setAttribute("aria-label", p.textContent);
      return;
    }
    const [xmin, xmax] = seasonRange();
    const data = [rows.map((r) => r.t), ...seriesSpec.map((s) => rows.map(s.value))];
    const width = chartWidth();
    const opts = {
      width, height: CHART_HEIGHT,
      legend: { show: false },
      cursor: { sync: { key: "explorer" }, points: { size: 9 }, drag: { x: false, y: false } },
      scales: { x: { time: true, range: () => [xmin, xmax] }, y: yRange ? { range: yRange } : { auto: true } },
      axes: [{ space: 60 }, { size: 44, space: 22 }],
      series: [{}, ...seriesSpec.map((s) => ({
        label: s.label, marker: s.marker, stroke: MARKERS[s.marker].colour, width: s.line ? 1.5 : 0,
        spanGaps: true, points: { show: false }, paths: s.line ? undefined : () => null,
      }))],
      hooks: {
        draw: [markerHook],
        // Only the chart under the pointer selects: the others follow it (cursor sync) and must
        // not answer with their own nearest dates.
        setCursor: [(u) => { if (hovered === key && u.cursor.idx !== null && u.cursor.idx !== undefined) select(u.data[0][u.cursor.idx], key); }],
      },
    };
    const chart = new uPlot(opts, data, el);
    chart.rows = rows;
    charts[key] = chart;
    el.setAttribute("aria-label", el.getAttribute("aria-label").split(":")[0] + ": " + rows.length + " observations; use the arrow keys to step through them");
  }

  function drawCharts() {
    makeChart("ndvi", $("chart-ndvi"), state.ndvi, [
      { label: "NDVI cloud-free", marker: "clear", line: true, value: (r) => (r.clear ? r.value : null) },
      { label: "NDVI cloudy", marker: "cloudy", line: false, value: (r) => (r.clear ? null : r.value) },
    ], [-0.2, 1]);
    makeChart("s1", $("chart-s1"), state.s1, [
      { label: "VV dB", marker: "vv", line: true, value: (r) => r.vv_db },
      { label: "VH dB", marker: "vh", line: true, value: (r) => r.vh_db },
    ], null);
    makeChart("coherence", $("chart-coherence"), state.coherence, [
      { label: "VV coherence", marker: "cvv", line: true, value: (r) => r.vv },
      { label: "VH coherence", marker: "cvh", line: true, value: (r) => r.vh },
    ], [0, 1]);
    $("legend-ndvi").innerHTML = legendHtml(["clear", "cloudy"]);
    $("legend-s1").innerHTML = legendHtml(["vv", "vh"]);
    $("legend-coherence").innerHTML = legendHtml(["cvv", "cvh"]);
  }

  // --- the selected date ---------------------------------------------------------------------

  const fmt = (v, digits) => (v === null || v === undefined ? "–" : v.toFixed(digits));
  const day = (t) => new Date(t * 1000).toISOString().slice(0, 10);

  function near(rows, t) {
    let best = null;
    for (const r of rows) if (best === null || Math.abs(r.t - t) < Math.abs(best.t - t)) best = r;
    return best && Math.abs(best.t - t) <= 0.5 * DAY_S ? best : null;
  }

  function select(t, from) {
    state.selected = t;
    const n = near(state.ndvi, t), b = near(state.s1, t), c = near(state.coherence, t);
    const rows = ["<table><caption class='sr-only'>Values on " + day(t) + "</caption>",
      "<tr><th>Date</th><td>" + day(t) + "</td></tr>"];
    if (n) rows.push("<tr><th>NDVI</th><td>" + fmt(n.value, 3) + " (" + (n.clear ? "cloud-free" : "cloudy") +
      ", masked " + (n.cloud === null ? "unknown" : Math.round(100 * n.cloud) + " %") + ")</td></tr>");
    if (b) rows.push("<tr><th>VV / VH</th><td>" + fmt(b.vv_db, 2) + " / " + fmt(b.vh_db, 2) + " dB</td></tr>");
    if (c) rows.push("<tr><th>Coherence VV / VH</th><td>" + fmt(c.vv, 3) + " / " + fmt(c.vh, 3) + "</td></tr>");
    if (!n && !b && !c) rows.push("<tr><td colspan=2>no observation on this date</td></tr>");
    rows.push("</table>");
    $("readout-values").innerHTML = rows.join("");
    for (const [key, chart] of Object.entries(charts)) {
      if (!chart || key === from) continue;
      const j = chart.data[0].findIndex((x) => Math.abs(x - t) < 0.5 * DAY_S);
      if (j >= 0) chart.setCursor({ left: chart.valToPos(chart.data[0][j], "x"), top: 10 }, false);
    }
    const s2 = near(state.ndvi, t) || nearestS2(t);
    scheduleChip(s2);
  }

  function nearestS2(t) {
    let best = null;
    for (const r of state.ndvi) if (best === null || Math.abs(r.t - t) < Math.abs(best.t - t)) best = r;
    return best;
  }

  let chipTimer = null;
  function scheduleChip(obs) {
    clearTimeout(chipTimer);
    state.chipFor = obs ? obs.scene_id : null;
    if (!obs) { showChip(null); return; }
    chipTimer = setTimeout(() => loadChip(obs), 120);
  }

  function showChip(src, alt, caption) {
    $("chip-img").hidden = !src;
    $("chip-empty").hidden = !!src;
    if (src) {
      $("chip-img").src = src;
      $("chip-img").alt = alt;
    }
    $("chip-caption").textContent = src ? caption : "";
    state.chip = src ? { scene_id: state.chipFor, caption } : null;
  }

  async function loadChip(obs) {
    const p = state.parcel;
    const d = obs.acquired.slice(0, 10);
    const key = state.aoi + "|" + p.pid + "|" + d;
    let src = chipCache.get(key);
    if (src === undefined) {
      try {
        const html = await api("/query/chipsByLocation", { lon: p.lon, lat: p.lat, start_date: d, end_date: d, bands: "B04_B03_B02", lut: "2_98" }, "text");
        const img = new DOMParser().parseFromString(html, "text/html").querySelector("img");
        src = img && img.getAttribute("src").startsWith("data:image/png") ? img.getAttribute("src") : null;
      } catch (err) {
        src = null;
      }
      chipCache.set(key, src);
    }
    // Only the chip of the date still selected: an earlier, slower answer must not replace it.
    if (!state.parcel || state.parcel.pid !== p.pid || state.chipFor !== obs.scene_id) return;
    showChip(src, "True-colour chip (1.28 km) around parcel " + p.pid + " on " + d, d + (obs.clear ? " · cloud-free" : " · cloudy"));
  }

  function stepDates(event) {
    const key = event.currentTarget.id.replace("chart-", "");
    const chart = charts[key];
    if (!chart) return;
    const xs = chart.data[0];
    let j = xs.findIndex((x) => Math.abs(x - (state.selected ?? -Infinity)) < 0.5 * DAY_S);
    if (event.key === "ArrowRight") j = j < 0 ? 0 : Math.min(xs.length - 1, j + 1);
    else if (event.key === "ArrowLeft") j = j < 0 ? xs.length - 1 : Math.max(0, j - 1);
    else if (event.key === "Home") j = 0;
    else if (event.key === "End") j = xs.length - 1;
    else return;
    event.preventDefault();
    chart.setCursor({ left: chart.valToPos(xs[j], "x"), top: 10 }, false);
    select(xs[j], key);
  }

  // --- export --------------------------------------------------------------------------------

  function download(blob, name) {
    const a = document.createElement("a");
    a.href = URL.createObjectURL(blob);
    a.download = name;
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(a.href), 10000);
  }

  function fileStem() {
    return [state.aoi, state.year, state.pid].join("_").replace(/[^A-Za-z0-9._-]/g, "_");
  }

  function csvText() {
    const lines = ["date,acquired,source,scene_id,ndvi,masked_fraction,cloud_free,vv_db,vh_db,coherence_vv,coherence_vh"];
    const rows = [
      ...state.ndvi.map((o) => [o.acquired, "s2", o.scene_id, o.value, o.cloud, o.clear, "", "", "", ""]),
      ...state.s1.map((o) => [o.acquired, "bs", o.scene_id, "", "", "", o.vv_db, o.vh_db, "", ""]),
      ...state.coherence.map((o) => [o.acquired, "c6", o.scene_id, "", "", "", "", "", o.vv, o.vh]),
    ].sort((a, b) => (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0));
    for (const r of rows) lines.push([r[0].slice(0, 10), ...r].map((v) => (v === null || v === undefined ? "" : String(v))).join(","));
    return lines.join("\n") + "\n";
  }

  function exportCsv() {
    if (state.pid) download(new Blob([csvText()], { type: "text/csv" }), fileStem() + ".csv");
  }

  function exportPng() {
    if (state.pid) chartsCanvas().toBlob((blob) => download(blob, fileStem() + ".png"), "image/png");
  }

  function chartsCanvas() {
    const parts = Object.entries(charts).filter(([, c]) => c);
    const dpr = devicePixelRatio;
    const width = Math.max(...parts.map(([, c]) => c.ctx.canvas.width), 400);
    const titleH = 26 * dpr;
    const height = titleH + parts.reduce((h, [, c]) => h + c.ctx.canvas.height + 22 * dpr, 0);
    const out = document.createElement("canvas");
    out.width = width;
    out.height = height;
    const ctx = out.getContext("2d");
    ctx.fillStyle = "#fff";
    ctx.fillRect(0, 0, width, height);
    ctx.fillStyle = "#000";
    ctx.font = 14 * dpr + "px sans-serif";
    ctx.fillText("Parcel " + state.pid + " · " + state.aoi + " " + state.year + " · " + (state.parcel.crop || ""), 8 * dpr, 18 * dpr);
    let y = titleH;
    const names = { ndvi: "NDVI (filled circles cloud-free, crosses cloudy)", s1: "Backscatter dB (squares VV, triangles VH)",
      coherence: "Coherence (diamonds VV, rings VH)" };
    ctx.font = 12 * dpr + "px sans-serif";
    for (const [key, chart] of parts) {
      ctx.fillText(names[key], 8 * dpr, y + 14 * dpr);
      y += 20 * dpr;
      ctx.drawImage(chart.ctx.canvas, 0, y);
      y += chart.ctx.canvas.height + 2 * dpr;
    }
    return out;
  }

  // --- wiring --------------------------------------------------------------------------------

  function updateUrl() {
    const q = new URLSearchParams();
    if (state.aoi) { q.set("dataset", state.aoi); q.set("year", state.year); }
    if (state.pid) q.set("pid", state.pid);
    history.replaceState(null, "", location.pathname + "?" + q.toString());
  }

  function wire() {
    $("login-form").addEventListener("submit", login);
    $("logout").addEventListener("click", () => { clearParcel(); logout("Logged out."); });
    $("dataset").addEventListener("change", (e) => {
      const [aoi, year] = e.target.value.split("/");
      openDataset(aoi, year);
    });
    $("scene").addEventListener("change", (e) => setScene(e.target.value ? Number(e.target.value) : null));
    $("controls").addEventListener("submit", (e) => {
      e.preventDefault();
      const pid = $("search-pid").value.trim();
      if (pid) openParcel(pid, { fly: true, timing: "searchToChartMs", started: performance.now() });
    });
    for (const id of ["chart-ndvi", "chart-s1", "chart-coherence"]) {
      const key = id.replace("chart-", "");
      $(id).addEventListener("keydown", stepDates);
      $(id).addEventListener("mouseenter", () => { hovered = key; });
      $(id).addEventListener("mouseleave", () => { if (hovered === key) hovered = null; });
    }
    $("export-csv").addEventListener("click", exportCsv);
    $("export-png").addEventListener("click", exportPng);
    window.addEventListener("resize", () => {
      for (const c of Object.values(charts)) if (c) c.setSize({ width: chartWidth(), height: CHART_HEIGHT });
    });
  }

  // `#token=...` pasted into an open tab is a same-document navigation: no reload, so log in here.
  window.addEventListener("hashchange", () => {
    if (new URLSearchParams(location.hash.slice(1)).get("token")) start();
  });

  window.explorer.csv = csvText;
  window.explorer.png = () => chartsCanvas().toDataURL("image/png");
  wire();
  start().catch((err) => {
    state.status = "error";
    state.error = String(err && err.message ? err.message : err);
    $("panel-error").textContent = state.error;
  });
})();
