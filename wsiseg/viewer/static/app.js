// wsiseg view: the slide (deep-zoom tiles), the probability maps (tiles of the OME-Zarr pyramid),
// nucleus outlines and cellularity windows (drawn on a canvas above the tiles), a read-out under
// the pointer. World coordinates = slide level-0 px: the slide is placed with width = its level-0
// width, each map with width = its stored level-0 width x scale_from_level0.
"use strict";
(function () {
  const OUTLINE_UM_PER_PX = 1.0;  // outlines are drawn at this many um per screen px or closer
  const CELL_CMAP = "magma";       // as heatmap.png
  const $ = (id) => document.getElementById(id);
  const api = (run, rest) => `/api/runs/${encodeURIComponent(run)}/${rest}`;
  const fmt = (v, d = 3) => (v === null || v === undefined || Number.isNaN(v)) ? "-" : Number(v).toFixed(d);

  const state = {
    run: null, info: null, viewer: null, colormaps: {}, cmap: "channel",
    slideItem: null, channelItems: [], vcanvas: null,
    cell: null, cellOn: false, cellOpacity: 0.5, cellRegressor: null,
    nucleiOn: true, nucleiOpacity: 1.0, typeOn: {}, outlines: { box: null, features: [], truncated: false, count: 0 },
    fetches: 0, outlineSeq: 0, drawnAt: 0,
  };

  async function getJSON(url, opts) {
    state.fetches++;
    try {
      const r = await fetch(url, opts);
      if (!r.ok) throw new Error(`${url}: HTTP ${r.status}`);
      return await r.json();
    } finally {
      state.fetches--;
    }
  }

  function el(tag, attrs = {}, children = []) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (k === "text") e.textContent = v;
      else if (k in e && typeof v !== "string") e[k] = v;
      else e.setAttribute(k, v);
    }
    for (const c of children) e.append(c);
    return e;
  }

  const rgb = (c, a = 1) => `rgba(${c[0]},${c[1]},${c[2]},${a})`;
  function cmapColor(name, v) {  // v in [0, 1] -> CSS colour from a 256-entry table
    const lut = state.colormaps[name];
    const c = lut[Math.max(0, Math.min(255, Math.round(v * 255)))];
    return rgb(c);
  }

  function drawBar(canvas, fill) {
    const ctx = canvas.getContext("2d");
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    for (let i = 0; i < canvas.width; i++) {
      ctx.fillStyle = fill(i / (canvas.width - 1));
      ctx.fillRect(i, 0, 1, canvas.height);
    }
  }

  // ---- layers -------------------------------------------------------------------------------

  function addItem(options) {
    return new Promise((resolve, reject) => {
      state.viewer.addTiledImage({ ...options, success: (e) => resolve(e.item), error: (e) => reject(new Error(e.message)) });
    });
  }

  function mapTileSource(ch) {
    const m = state.info.map;
    const top = Math.ceil(Math.log2(Math.max(m.width, m.height, 2)));
    const run = state.run;
    return {
      width: m.width, height: m.height, tileSize: m.tile, tileOverlap: 0,
      minLevel: Math.max(0, top - (m.levels - 1)), maxLevel: top,
      getTileUrl: (level, x, y) => api(run, `map/${ch}/${top - level}/${x}_${y}.png?cmap=${state.cmap}`),
    };
  }

  async function addChannel(ch, index) {
    const m = state.info.map;
    return addItem({ tileSource: mapTileSource(ch), x: 0, y: 0, width: m.width * m.scale_from_level0,
                     opacity: 0, preload: false, index });
  }

  function channelOpacity(i) {
    return $(`layer-map-${i}`).checked ? Number($(`opacity-map-${i}`).value) : 0;
  }

  function syncOpacities() {
    if (state.slideItem) state.slideItem.setOpacity($("layer-slide").checked ? Number($("opacity-slide").value) : 0);
    state.channelItems.forEach((item, i) => item && item.setOpacity(channelOpacity(i)));
    redraw();
  }

  async function setColormap(name) {
    state.cmap = name;
    drawCmapBar();
    const offset = state.slideItem ? 1 : 0;
    for (let i = 0; i < state.channelItems.length; i++) {
      const old = state.channelItems[i];
      const index = state.viewer.world.getIndexOfItem(old);
      state.viewer.world.removeItem(old);
      state.channelItems[i] = await addChannel(i, index >= 0 ? index : i + offset);
    }
    syncOpacities();
  }

  function drawCmapBar() {
    const chans = state.info ? state.info.map.channels : [];
    const on = chans.filter((c) => $(`layer-map-${c.index}`) && $(`layer-map-${c.index}`).checked);
    const c = (on[0] || chans[0] || { color: [255, 0, 0] }).color;
    drawBar($("cmap-bar"), state.cmap === "channel" ? (v) => rgb(c, v) : (v) => cmapColor(state.cmap, v));
  }

  function buildLayerControls(info) {
    const chans = $("channels");
    chans.replaceChildren();
    for (const c of info.map.channels) {
      const box = el("input", { type: "checkbox", id: `layer-map-${c.index}` });
      const range = el("input", { type: "range", id: `opacity-map-${c.index}`, min: "0", max: "1", step: "0.05",
                                  value: "0.7", "aria-label": `${c.label} opacity` });
      box.addEventListener("change", () => { syncOpacities(); drawCmapBar(); });
      range.addEventListener("input", syncOpacities);
      chans.append(el("div", { class: "layer" }, [
        el("label", {}, [box, " ", el("span", { class: "swatch", style: `background:${rgb(c.color)}` }), c.label]), range]));
    }
    const sel = $("cmap");
    sel.replaceChildren(...["channel", ...Object.keys(state.colormaps)].map(
      (n) => el("option", { value: n, text: n === "channel" ? "channel colour" : n })));
    sel.value = state.cmap;

    const nl = $("nuclei-layer");
    nl.replaceChildren();
    if (!info.nuclei) {
      nl.append(el("p", { class: "dim", text: "no nuclei.geojson (run with --instances)" }));
    } else {
      const box = el("input", { type: "checkbox", id: "layer-nuclei", checked: state.nucleiOn });
      const range = el("input", { type: "range", id: "opacity-nuclei", min: "0", max: "1", step: "0.05",
                                  value: String(state.nucleiOpacity), "aria-label": "outline opacity" });
      box.addEventListener("change", () => { state.nucleiOn = box.checked; refreshOutlines(); redraw(); });
      range.addEventListener("input", () => { state.nucleiOpacity = Number(range.value); redraw(); });
      nl.append(el("div", { class: "layer" }, [el("label", {}, [box, ` outlines (${info.nuclei.count})`]), range]));
      const types = el("div", { class: "types" });
      info.nuclei.types.forEach((t, i) => {
        state.typeOn[i] = true;
        const tb = el("input", { type: "checkbox", id: `layer-type-${i}`, checked: true });
        tb.dataset.type = t.name;
        tb.addEventListener("change", () => { state.typeOn[i] = tb.checked; redraw(); });
        types.append(el("div", {}, [el("label", {}, [tb, " ", el("span", { class: "swatch", style: `background:${rgb(t.color)}` }),
                                                      `${t.name} (${t.count})`])]));
      });
      nl.append(types, el("p", { class: "dim", text: `drawn from ${OUTLINE_UM_PER_PX} um per screen px and closer` }));
    }

    const cl = $("cell-layer");
    cl.replaceChildren();
    if (!info.cellularity || !info.cellularity.windows) {
      cl.append(el("p", { class: "dim", text: "no cellularity.csv" }));
    } else {
      const box = el("input", { type: "checkbox", id: "layer-cell", checked: state.cellOn });
      const range = el("input", { type: "range", id: "opacity-cell", min: "0", max: "1", step: "0.05",
                                  value: String(state.cellOpacity), "aria-label": "cellularity opacity" });
      box.addEventListener("change", () => { state.cellOn = box.checked; redraw(); });
      range.addEventListener("input", () => { state.cellOpacity = Number(range.value); redraw(); });
      const reg = el("select", { id: "cell-regressor" }, info.cellularity.regressors.map((r) => el("option", { value: r, text: r })));
      state.cellRegressor = info.cellularity.regressors[0];
      reg.addEventListener("change", () => { state.cellRegressor = reg.value; redraw(); });
      const bar = el("canvas", { class: "colorbar", width: 256, height: 12, id: "cell-bar" });
      cl.append(el("div", { class: "layer" }, [el("label", {}, [box, ` ${info.cellularity.windows} windows`]), range]),
                el("label", { class: "row" }, ["regressor ", reg]), bar,
                el("div", { class: "ticks" }, [el("span", { text: "0" }), el("span", { text: "0.5" }), el("span", { text: "1" })]));
      drawBar(bar, (v) => cmapColor(CELL_CMAP, v));
    }
    drawCmapBar();
  }

  function buildSummary(info) {
    const s = info.summary;
    const cell = info.cellularity && info.cellularity.tissue_weighted_mean;
    const rows = [
      ["slide", `${info.input} (${info.dimensions[0]} x ${info.dimensions[1]} px${info.slide.kind === "image" ? ", image" : ""})`],
      ["model", `${s.model || "-"}${s.backend && s.backend !== "torch" ? ` (${s.backend})` : ""}`],
      ["resolution", `map ${fmt(s.mpp)} um/px, slide ${fmt(s.slide_mpp)} um/px`],
      ["tiles", `${s.tiles_with_tissue} with tissue of ${s.tiles_total}`],
      ["time", `${fmt(s.seconds, 1)} s, ${s.tiles_per_second} tiles/s on ${s.device}`],
      ["cellularity", cell && Object.keys(cell).length
        ? Object.entries(cell).map(([k, v]) => `${k} ${fmt(v)}`).join(", ") + " (tissue-weighted mean)" : "-"],
      ["nuclei", info.nuclei ? String(info.nuclei.count) : "-"],
    ];
    $("summary-table").replaceChildren(...rows.map(([k, v], i) =>
      el("tr", { id: `summary-${k}` }, [el("td", { text: k }), el("td", { text: v })])));
    $("files").replaceChildren(...Object.entries(info.files || {}).map(([n, u]) => el("a", { href: u, target: "_blank", text: n })));
    $("note").hidden = !info.slide.note;
    $("note").textContent = info.slide.note || "";
  }

  // ---- the canvas above the tiles: cellularity windows and nucleus outlines ------------------

  function screenScale() {  // screen px per level-0 px, and the screen position of level-0 (0, 0)
    const vp = state.viewer.viewport;
    const p0 = vp.pixelFromPoint(new OpenSeadragon.Point(0, 0), true);
    const p1 = vp.pixelFromPoint(new OpenSeadragon.Point(1000, 0), true);
    return { s: (p1.x - p0.x) / 1000, x: p0.x, y: p0.y };
  }

  function umPerScreenPx() {
    const mpp = state.info.slide_mpp || state.info.map.mpp / state.info.map.scale_from_level0;
    return mpp / screenScale().s;
  }

  function outlinesReadable() {
    return state.info && state.info.nuclei && umPerScreenPx() <= OUTLINE_UM_PER_PX * 1.0001;
  }

  function redraw() {
    state.drawnAt = performance.now();
    const cv = state.vcanvas;
    if (!cv || !state.info) return;
    const dpr = window.devicePixelRatio || 1;
    const w = state.viewer.container.clientWidth, h = state.viewer.container.clientHeight;
    if (cv.width !== Math.round(w * dpr) || cv.height !== Math.round(h * dpr)) {
      cv.width = Math.round(w * dpr);
      cv.height = Math.round(h * dpr);
    }
    const ctx = cv.getContext("2d");
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.clearRect(0, 0, cv.width, cv.height);
    const t = screenScale();
    ctx.setTransform(dpr * t.s, 0, 0, dpr * t.s, dpr * t.x, dpr * t.y);  // draw in level-0 px
    if (state.cellOn && state.cell) {
      ctx.globalAlpha = state.cellOpacity;
      const vals = state.cell.values[state.cellRegressor] || [];
      state.cell.boxes.forEach((b, i) => {
        if (vals[i] === null || vals[i] === undefined) return;
        ctx.fillStyle = cmapColor(CELL_CMAP, vals[i]);
        ctx.fillRect(b[0], b[1], b[2], b[3]);
      });
    }
    const readable = outlinesReadable();
    $("hint").hidden = !(state.nucleiOn && state.info.nuclei && (!readable || state.outlines.truncated));
    $("hint").textContent = state.outlines.truncated && readable
      ? `${state.outlines.count} nuclei here: zoom in to see their outlines` : "zoom in to see nucleus outlines";
    if (state.nucleiOn && readable && state.outlines.features.length) {
      ctx.globalAlpha = state.nucleiOpacity;
      ctx.lineWidth = Math.max(1, 1.5 * dpr) / (dpr * t.s);
      state.info.nuclei.types.forEach((type, ti) => {
        if (!state.typeOn[ti]) return;
        ctx.beginPath();
        for (const f of state.outlines.features) {
          if (f[1] !== ti) continue;
          for (let r = 2; r < f.length; r++) {
            const p = f[r];
            ctx.moveTo(p[0], p[1]);
            for (let k = 2; k < p.length; k += 2) ctx.lineTo(p[k], p[k + 1]);
            ctx.closePath();
          }
        }
        ctx.strokeStyle = rgb(type.color);
        ctx.stroke();
      });
    }
    ctx.globalAlpha = 1;
  }

  async function refreshOutlines() {
    if (!state.nucleiOn || !outlinesReadable()) { redraw(); return; }
    const b = state.viewer.viewport.getBounds(true);
    const have = state.outlines.box;
    if (have && b.x >= have[0] && b.y >= have[1] && b.x + b.width <= have[2] && b.y + b.height <= have[3]) { redraw(); return; }
    const box = [b.x - b.width / 4, b.y - b.height / 4, b.x + b.width * 1.25, b.y + b.height * 1.25].map(Math.round);
    const seq = ++state.outlineSeq;
    const run = state.run;
    try {
      const res = await getJSON(api(run, `nuclei?box=${box.join(",")}`));
      if (seq !== state.outlineSeq || run !== state.run) return;
      state.outlines = { box: res.truncated ? null : box, features: res.features, truncated: res.truncated, count: res.count };
    } catch (e) {
      console.warn(String(e));
    }
    redraw();
  }

  // ---- read-out under the pointer -----------------------------------------------------------

  const readout = { inflight: false, pending: null };

  function queueReadout(x, y) {
    readout.pending = { x, y, run: state.run };
    if (!readout.inflight) sendReadout();
  }

  async function sendReadout() {
    const p = readout.pending;
    readout.pending = null;
    if (!p) return;
    readout.inflight = true;
    try {
      const r = await getJSON(api(p.run, `at?x=${p.x}&y=${p.y}`));
      if (p.run === state.run) showReadout(r);
    } catch (e) {
      console.warn(String(e));
    } finally {
      readout.inflight = false;
      if (readout.pending) sendReadout();
    }
  }

  function showReadout(r) {
    $("ro-xy").textContent = `${r.x}, ${r.y}`;
    const rows = Object.entries(r.probabilities || {}).map(([k, v]) =>
      el("tr", { "data-channel": k }, [el("td", { text: k }), el("td", { class: "value", text: fmt(v) })]));
    $("ro-prob").replaceChildren(...rows);
    const c = r.cellularity;
    $("ro-cell").textContent = c ? Object.entries(c.cellularity).map(([k, v]) => `${k} ${fmt(v)}`).join(", ")
      + ` (window ${c.window[0]}, ${c.window[1]}; tissue ${fmt(c.tissue_fraction, 2)})` : "-";
    const n = r.nucleus;
    $("ro-nucleus-id").textContent = n ? String(n.id) : "-";
    $("ro-nucleus-type").textContent = n && n.type ? n.type : "-";
    $("ro-nucleus-area").textContent = n && n.area_um2 !== null && n.area_um2 !== undefined ? `${fmt(n.area_um2, 1)} um²` : "-";
    const skip = new Set(["Label", "label", "area_um2", "Area µm^2", "Area px (stored)"]);
    $("ro-nucleus-more").textContent = n && n.measurements
      ? Object.entries(n.measurements).filter(([k]) => !skip.has(k)).map(([k, v]) => `${k} ${fmt(v)}`).join(", ") : "";
  }

  function onPointerMove(ev) {
    if (!state.viewer || !state.info) return;
    state.pointer = { clientX: ev.clientX, clientY: ev.clientY };
    const rect = state.viewer.container.getBoundingClientRect();
    const p = state.viewer.viewport.viewerElementToViewportCoordinates(
      new OpenSeadragon.Point(ev.clientX - rect.left, ev.clientY - rect.top));
    const [w, h] = state.info.dimensions;
    if (p.x < 0 || p.y < 0 || p.x >= w || p.y >= h) return;
    queueReadout(Math.floor(p.x), Math.floor(p.y));
  }

  // ---- runs ---------------------------------------------------------------------------------

  async function openRun(name) {
    state.run = name;
    state.info = null;
    state.outlines = { box: null, features: [], truncated: false, count: 0 };
    const info = await getJSON(api(name, "info"));
    if (state.run !== name) return;
    state.info = info;
    state.cell = info.cellularity ? await getJSON(api(name, "cellularity")) : null;
    buildSummary(info);
    buildLayerControls(info);
    if (state.viewer) state.viewer.destroy();
    const viewer = OpenSeadragon({
      element: $("viewer"), prefixUrl: "/static/openseadragon/images/", drawer: "canvas",
      showNavigator: true, navigatorPosition: "TOP_RIGHT", maxZoomPixelRatio: 8, visibilityRatio: 0.2,
      gestureSettingsMouse: { clickToZoom: false }, preserveImageSizeOnResize: true,
    });
    state.viewer = viewer;
    state.slideItem = null;
    state.channelItems = [];
    const cv = el("canvas", { class: "vector" });
    viewer.canvas.insertAdjacentElement("afterend", cv);
    state.vcanvas = cv;
    viewer.addHandler("update-viewport", redraw);
    viewer.addHandler("animation-finish", () => {
      refreshOutlines();
      if (state.pointer) onPointerMove(state.pointer);  // the view moved under a still pointer
    });
    viewer.addHandler("canvas-exit", () => { state.pointer = null; });
    viewer.addHandler("resize", redraw);
    if (info.slide.available) {
      state.slideItem = await addItem({ tileSource: api(name, "slide.dzi"), x: 0, y: 0, width: info.dimensions[0], index: 0 });
    }
    for (const c of info.map.channels) state.channelItems.push(await addChannel(c.index, viewer.world.getItemCount()));
    viewer.viewport.goHome(true);
    syncOpacities();
    refreshOutlines();
    document.title = `wsiseg view: ${info.input}`;
  }

  async function main() {
    state.colormaps = await getJSON("/api/colormaps");
    const runs = await getJSON("/api/runs");
    const picker = $("run-picker");
    picker.replaceChildren(...runs.map((r) => el("option", { value: r.name, text: r.name })));
    picker.hidden = runs.length < 2;
    const wanted = decodeURIComponent(location.hash.replace(/^#run=/, ""));
    const first = runs.some((r) => r.name === wanted) ? wanted : runs[0].name;
    picker.value = first;
    picker.addEventListener("change", () => { location.hash = `run=${encodeURIComponent(picker.value)}`; openRun(picker.value); });
    $("layer-slide").addEventListener("change", syncOpacities);
    $("opacity-slide").addEventListener("input", syncOpacities);
    $("cmap").addEventListener("change", (e) => setColormap(e.target.value));
    $("viewer").addEventListener("pointermove", onPointerMove);
    await openRun(first);
    state.ready = true;
  }

  // For scripts and tests: the viewer, whether everything visible is drawn, and the page position
  // (CSS px) of a level-0 point.
  window.wsisegView = {
    state,
    get viewer() { return state.viewer; },
    idle() {
      if (!state.ready || state.fetches > 0 || readout.inflight || !state.viewer || state.viewer.isAnimating()) return false;
      if (performance.now() - state.drawnAt < 250) return false;  // settled: nothing drawn for a moment
      const w = state.viewer.world;
      for (let i = 0; i < w.getItemCount(); i++) {
        const item = w.getItemAt(i);
        if (item.getOpacity() > 0 && !item.getFullyLoaded()) return false;
      }
      return true;
    },
    toPage(x, y) {
      const rect = state.viewer.container.getBoundingClientRect();
      const p = state.viewer.viewport.viewportToViewerElementCoordinates(new OpenSeadragon.Point(x, y));
      return { x: rect.left + p.x, y: rect.top + p.y };
    },
    show(x0, y0, x1, y1) {  // fit the level-0 box in the view, at once
      state.viewer.viewport.fitBounds(new OpenSeadragon.Rect(x0, y0, x1 - x0, y1 - y0), true);
      state.viewer.forceRedraw();
      redraw();
      refreshOutlines();
    },
  };

  main().catch((e) => { console.error(`wsiseg view: ${e}`); });
})();
