// The attention view and the logit-lens table of gemma3_lab, drawn from a payload built by
// gemma3_lab/app/ui/attention_view.py. Runs as the body of Gradio's js_on_load: `element`,
// `props` and `watch` come from gr.HTML, VIEW_CSS is prepended by Python. Everything after
// the payload arrives happens here: no request goes to the server.

const host = element.querySelector(".g3v-host") || element;
const root = host.shadowRoot || host.attachShadow({ mode: "open" });
const state = { layer: null, head: "all", query: null, pinned: false, cell: null };

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function fmt(units, p) {
  return (units / p.scale).toFixed(p.decimals);
}

function shade(units, p) {
  return "rgba(37, 99, 235, " + (units / p.scale).toFixed(3) + ")";
}

// white text once the blue is dark enough that black would be hard to read
function ink(units, p) {
  return units / p.scale > 0.55 ? "#fff" : "";
}

function legend(p, what) {
  const box = el("div", "legend");
  box.append(el("span", "", "0"), el("span", "bar"), el("span", "", "1"),
             el("span", "note", what + ", shown to " + p.decimals + " decimals"));
  return box;
}

// ------------------------------------------------------------------ attention

function decode(layer, nHeads) {
  if (!layer._w) {
    const bin = atob(layer.data);
    const bytes = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    layer._w = new Uint16Array(bytes.buffer);
    layer._start = [];
    let a = 0;
    for (const n of layer.len) { layer._start.push(a); a += n; }
    layer._total = a;
  }
  return layer._w;
}

// weight (in units) of key `k` for query row `r`, head `h`
function weight(layer, nHeads, r, h, k) {
  const w = decode(layer, nHeads);
  const lo = layer.lo[r];
  if (k < lo || k >= lo + layer.len[r]) return 0;
  return w[h * layer._total + layer._start[r] + (k - lo)];
}

function tokenStrip(p, head) {
  const strip = el("div", "strip");
  strip.dataset.head = head;
  p.tokens.forEach((t, k) => {
    const s = el("span", "tok", t);
    s.tabIndex = 0;
    s.dataset.pos = k;
    strip.append(s);
  });
  return strip;
}

function describeLayer(L) {
  return "layer " + L.layer + " · " + L.type + (L.type === "local" ? " (window " + L.window + ")" : " (whole prefix)");
}

// the n keys query row r of head h weighs most, as '"piece" (slot) 0.123, ...'
function topKeys(L, p, r, h, n) {
  const top = [];
  for (let k = L.lo[r]; k < L.lo[r] + L.len[r]; k++) top.push([weight(L, p.n_heads, r, h, k), k]);
  top.sort((a, b) => b[0] - a[0] || a[1] - b[1]);
  return top.slice(0, n).map(([u, k]) => JSON.stringify(p.tokens[k]) + " (" + k + ") " + fmt(u, p)).join(", ");
}

function paintAttention(p) {
  const L = p.layers[state.layer];
  const q = state.query;
  const r = q === null ? -1 : p.positions.indexOf(q);
  const info = root.querySelector(".info");
  root.querySelector(".kind").textContent = describeLayer(L);
  root.querySelector(".kind").dataset.type = L.type;
  const edge = r >= 0 && L.type === "local" ? q - L.window + 1 : null;
  for (const strip of root.querySelectorAll(".strip")) {
    const h = Number(strip.dataset.head);
    const title = strip.parentElement.querySelector(".head-title");
    if (title) title.textContent = "head " + h + (r >= 0 ? " · most: " + topKeys(L, p, r, h, 1) : "");
    for (const s of strip.children) {
      const k = Number(s.dataset.pos);
      const u = r >= 0 ? weight(L, p.n_heads, r, h, k) : 0;
      s.dataset.w = r >= 0 ? String(u) : "";
      s.style.background = r >= 0 && u > 0 ? shade(u, p) : "";
      s.style.color = ink(u, p);
      s.classList.toggle("query", k === q);
      s.classList.toggle("pinned", k === q && state.pinned);
      s.classList.toggle("outside", edge !== null && k < edge);
      s.classList.toggle("edge", edge !== null && edge > 0 && k === edge);
      s.classList.toggle("future", r >= 0 && k > q);
      s.classList.toggle("norow", p.positions.indexOf(k) < 0);
      s.setAttribute("aria-label", p.tokens[k] + " (slot " + k + ")" +
        (r >= 0 ? ": " + fmt(u, p) + " from slot " + q + ", head " + h : ""));
    }
  }
  if (q === null) {
    info.textContent = "Hover or focus a token to see where it attends; click pins it; arrow keys move.";
  } else if (r < 0) {
    info.textContent = "slot " + q + " " + JSON.stringify(p.tokens[q]) + " has no attention row in this capture.";
  } else {
    const h = state.head === "all" ? 0 : Number(state.head);
    info.textContent = (state.pinned ? "pinned " : "") + "slot " + q + " " + JSON.stringify(p.tokens[q]) +
      " · head " + h + " attends most to: " + topKeys(L, p, r, h, 3) +
      (edge !== null && edge > 0 ? " · window starts at slot " + edge : "");
  }
}

function setQuery(p, k, focus) {
  state.query = k;
  paintAttention(p);
  if (focus) {
    const strip = root.activeElement ? root.activeElement.parentElement : root.querySelector(".strip");
    const s = (strip || root.querySelector(".strip")).children[k];
    if (s) s.focus();
  }
}

function buildAttention(p, box) {
  if (state.layer === null || state.layer >= p.layers.length) state.layer = 0;
  const bar = el("div", "controls");
  const layerSel = el("select", "layer");
  layerSel.setAttribute("aria-label", "layer");
  p.layers.forEach((L, i) => layerSel.append(new Option("L" + L.layer + " " + L.type, String(i))));
  layerSel.value = String(state.layer);
  const headSel = el("select", "head");
  headSel.setAttribute("aria-label", "head");
  headSel.append(new Option("all heads", "all"));
  for (let h = 0; h < p.n_heads; h++) headSel.append(new Option("head " + h, String(h)));
  if (state.head !== "all" && Number(state.head) >= p.n_heads) state.head = "all";
  headSel.value = state.head;
  bar.append(layerSel, headSel, el("span", "kind"), legend(p, "attention weight"));
  const info = el("div", "info");
  info.setAttribute("aria-live", "polite");
  const grid = el("div", state.head === "all" ? "heads" : "one");
  const heads = state.head === "all" ? [...Array(p.n_heads).keys()] : [Number(state.head)];
  for (const h of heads) {
    const cell = el("div", "head-box");
    cell.append(el("div", "head-title", "head " + h), tokenStrip(p, h));
    grid.append(cell);
  }
  box.append(bar, info, grid);
  layerSel.addEventListener("change", () => { state.layer = Number(layerSel.value); paintAttention(p); });
  headSel.addEventListener("change", () => { state.head = headSel.value; render(); });
  const pick = (e) => e.target.closest && e.target.closest(".tok");
  grid.addEventListener("mouseover", (e) => { const s = pick(e); if (s && !state.pinned) setQuery(p, Number(s.dataset.pos)); });
  grid.addEventListener("focusin", (e) => { const s = pick(e); if (s && !state.pinned) setQuery(p, Number(s.dataset.pos)); });
  grid.addEventListener("click", (e) => {
    const s = pick(e);
    if (!s) return;
    const k = Number(s.dataset.pos);
    state.pinned = !(state.pinned && state.query === k);
    setQuery(p, k);
  });
  grid.addEventListener("keydown", (e) => {
    const s = pick(e);
    if (!s) return;
    const k = Number(s.dataset.pos), last = p.tokens.length - 1;
    const to = { ArrowRight: k + 1, ArrowLeft: k - 1, Home: 0, End: last }[e.key];
    if (to !== undefined) {
      e.preventDefault();
      setQuery(p, Math.max(0, Math.min(last, to)), true);
    } else if (e.key === "Enter" || e.key === " ") {
      e.preventDefault();
      s.click();
    }
  });
  paintAttention(p);
}

// ------------------------------------------------------------------ logit lens

function lensDetail(p, i, j) {
  const lines = [];
  for (let r = 0; r < p.k; r++) {
    lines.push((r + 1) + ". " + JSON.stringify(p.pieces[p.top[j][i][r]]) + " " + fmt(p.probs[j][i][r], p));
  }
  return "slot " + p.positions[i] + " " + JSON.stringify(p.tokens[i]) + " · " + p.layers[j] + " · top " + p.k +
    ": " + lines.join("   ");
}

function buildLens(p, box) {
  const bar = el("div", "controls");
  bar.append(el("span", "kind", "logit lens: top-1 next token after each layer"),
             legend(p, "probability"));
  const info = el("div", "info", "Hover or focus a cell for its top " + p.k + "; arrow keys move; ★ = the token that came next.");
  info.setAttribute("aria-live", "polite");
  const wrap = el("div", "lens-wrap");
  const table = el("table", "lens");
  const head = el("tr");
  head.append(el("th", "corner", "slot · token"));
  p.layers.forEach((l) => head.append(el("th", "", l)));
  const thead = el("thead");
  thead.append(head);
  const body = el("tbody");
  p.tokens.forEach((t, i) => {
    const tr = el("tr", i === p.query ? "inspected" : "");
    tr.append(el("th", "rowhead", p.positions[i] + " " + t));
    const next = i + 1 < p.tokens.length && p.positions[i + 1] === p.positions[i] + 1 ? p.tokens[i + 1] : null;
    p.layers.forEach((l, j) => {
      const u = p.probs[j][i][0], piece = p.pieces[p.top[j][i][0]];
      const td = el("td", "cell");
      td.tabIndex = 0;
      td.dataset.pos = i;
      td.dataset.layer = j;
      td.dataset.p = String(u);
      td.style.background = shade(u, p);
      td.style.color = ink(u, p);
      td.append(el("span", "piece", (piece === next ? "★" : "") + piece), el("span", "prob", fmt(u, p)));
      td.setAttribute("aria-label", lensDetail(p, i, j));
      tr.append(td);
    });
    body.append(tr);
  });
  table.append(thead, body);
  wrap.append(table);
  box.append(bar, info, wrap);
  if (Number.isInteger(p.query) && body.children[p.query]) {  // the inspected slot's row in view
    const row = body.children[p.query];
    requestAnimationFrame(() => { wrap.scrollTop = Math.max(0, row.offsetTop - wrap.clientHeight / 2); });
  }
  const show = (td) => {
    if (!td) return;
    state.cell = [Number(td.dataset.pos), Number(td.dataset.layer)];
    info.textContent = lensDetail(p, state.cell[0], state.cell[1]);
    for (const c of root.querySelectorAll(".cell.query")) c.classList.remove("query");
    td.classList.add("query");
  };
  const pick = (e) => e.target.closest && e.target.closest(".cell");
  table.addEventListener("mouseover", (e) => show(pick(e)));
  table.addEventListener("focusin", (e) => show(pick(e)));
  table.addEventListener("keydown", (e) => {
    const td = pick(e);
    if (!td) return;
    const d = { ArrowRight: [0, 1], ArrowLeft: [0, -1], ArrowDown: [1, 0], ArrowUp: [-1, 0] }[e.key];
    if (!d) return;
    e.preventDefault();
    const i = Math.max(0, Math.min(p.tokens.length - 1, Number(td.dataset.pos) + d[0]));
    const j = Math.max(0, Math.min(p.layers.length - 1, Number(td.dataset.layer) + d[1]));
    body.children[i].children[j + 1].focus();
  });
}

// ------------------------------------------------------------------ entry

function render() {
  root.replaceChildren();
  const style = el("style");
  style.textContent = VIEW_CSS;
  root.append(style);
  const p = props.value;
  if (!p || typeof p !== "object" || !p.kind) {
    root.append(el("div", "empty", "Nothing captured yet."));
    return;
  }
  const box = el("div", "view " + p.kind);
  root.append(box);
  if (p.kind === "attention") buildAttention(p, box);
  else if (p.kind === "lens") buildLens(p, box);
}

// a payload may say where to start: the inspected slot pinned, its layer and head chosen
function start() {
  const p = props.value;
  state.query = null;
  state.pinned = false;
  if (p && p.kind === "attention") {
    if (Number.isInteger(p.query)) { state.query = p.query; state.pinned = true; }
    const i = Number.isInteger(p.layer) ? p.layers.findIndex((L) => L.layer === p.layer) : -1;
    if (i >= 0) state.layer = i;
    if (p.head === "all" || (Number.isInteger(p.head) && p.head >= 0 && p.head < p.n_heads)) state.head = String(p.head);
  }
}

start();
render();
watch("value", () => { start(); render(); });
