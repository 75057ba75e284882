// Per-token routing in the page: tokens coloured by a layer's first expert, a layer x expert heatmap per
// message, and one token's routing on hover. Input: the `routing` objects of the API (serve/routing.py):
// entries {token_id, token, experts: [L][k], weights: [L][k]}. Token text is inserted as text nodes only.

// Eight distinguishable light colours (dark text stays readable on each); more experts cycle through hues.
export const PALETTE = ["#ffc9c9", "#a5d8ff", "#b2f2bb", "#ffec99", "#d0bfff", "#ffd8a8", "#99e9f2", "#fcc2d7"];

export function expertColour(expert) {
  if (expert < PALETTE.length) return PALETTE[expert];
  return `hsl(${(expert * 47) % 360}, 80%, 82%)`;
}

/** The expert each entry's colour shows: the first (highest-weight) expert of `layer`. */
export function firstExperts(entries, layer) {
  return entries.map((entry) => entry.experts[layer][0]);
}

export function numLayersOf(entries) {
  return entries.length ? entries[0].experts.length : 0;
}

/** Tokens per (layer, expert) over `entries`, every one of the k choices counted: [L][E]. */
export function routingCounts(entries, numExperts) {
  const layers = numLayersOf(entries);
  let experts = numExperts || 0;
  for (const entry of entries) for (const row of entry.experts) for (const e of row) experts = Math.max(experts, e + 1);
  const counts = Array.from({ length: layers }, () => new Array(experts).fill(0));
  for (const entry of entries) entry.experts.forEach((row, l) => row.forEach((e) => { counts[l][e] += 1; }));
  return counts;
}

const CONTROL = /^(<\/?s>|\[\/?[A-Z_]+\])$/;

/** Spans, one per token, coloured by `layer`'s first expert; `onHover(entry, event)` / `onLeave()` for tooltips. */
export function renderTokens(container, entries, layer, { onHover, onLeave } = {}) {
  container.replaceChildren();
  entries.forEach((entry, index) => {
    const span = document.createElement("span");
    span.className = CONTROL.test(entry.token) ? "tok control" : "tok";
    span.textContent = entry.token;
    const expert = entry.experts[layer][0];
    span.dataset.index = String(index);
    span.dataset.expert = String(expert);
    span.style.backgroundColor = expertColour(expert);
    if (onHover) span.addEventListener("mouseenter", (event) => onHover(entry, event));
    if (onLeave) span.addEventListener("mouseleave", onLeave);
    container.append(span);
  });
}

/** Re-colour already rendered token spans for another layer (no re-render). */
export function recolour(container, entries, layer) {
  for (const span of container.querySelectorAll(".tok")) {
    const expert = entries[Number(span.dataset.index)].experts[layer][0];
    span.dataset.expert = String(expert);
    span.style.backgroundColor = expertColour(expert);
  }
}

/** One token's routing as a small table: layer, experts (weights). */
export function tooltipNodes(entry) {
  const title = document.createElement("div");
  title.textContent = `token ${JSON.stringify(entry.token)} (id ${entry.token_id})`;
  const table = document.createElement("table");
  entry.experts.forEach((row, l) => {
    const tr = document.createElement("tr");
    const layer = document.createElement("td");
    layer.textContent = `layer ${l}`;
    const picks = document.createElement("td");
    picks.textContent = row.map((e, j) => `e${e} ${(entry.weights[l][j] * 100).toFixed(1)}%`).join("  ");
    tr.append(layer, picks);
    table.append(tr);
  });
  return [title, table];
}

/** A layer x expert table of counts, each cell shaded by its share of the layer's routings. */
export function renderHeatmap(table, counts, { imbalance = null } = {}) {
  table.replaceChildren();
  if (!counts || !counts.length) return;
  const experts = counts[0].length;
  const head = document.createElement("tr");
  head.append(document.createElement("th"));
  for (let e = 0; e < experts; e++) {
    const th = document.createElement("th");
    th.textContent = `e${e}`;
    head.append(th);
  }
  if (imbalance) {
    const th = document.createElement("th");
    th.textContent = "max/mean";
    head.append(th);
  }
  table.append(head);
  counts.forEach((row, l) => {
    const tr = document.createElement("tr");
    const th = document.createElement("th");
    th.textContent = `L${l}`;
    tr.append(th);
    const total = row.reduce((a, b) => a + b, 0);
    row.forEach((count, e) => {
      const td = document.createElement("td");
      const share = total ? count / total : 0;
      td.textContent = String(count);
      td.dataset.layer = String(l);
      td.dataset.expert = String(e);
      td.dataset.count = String(count);
      td.title = `layer ${l}, expert ${e}: ${count} tokens (${(share * 100).toFixed(1)}% of the layer)`;
      // Shade relative to a uniform share: 2/E of the layer (twice balanced) is full colour.
      const strength = Math.min(1, share * experts / 2);
      td.style.backgroundColor = `rgba(59, 91, 219, ${(0.08 + 0.82 * strength).toFixed(3)})`;
      td.style.color = strength > 0.55 ? "#fff" : "#1d2330";
      tr.append(td);
    });
    if (imbalance) {
      const td = document.createElement("td");
      td.className = "imbalance";
      td.dataset.layer = String(l);
      td.textContent = Number(imbalance[l]).toFixed(2);
      tr.append(td);
    }
    table.append(tr);
  });
}

/** The legend: one swatch per expert. */
export function renderLegend(el, numExperts) {
  el.replaceChildren();
  for (let e = 0; e < numExperts; e++) {
    const span = document.createElement("span");
    span.textContent = `expert ${e}`;
    span.style.backgroundColor = expertColour(e);
    el.append(span);
  }
}
