// The live dashboard: GET /v1/stats every few seconds (the numbers of /metrics, plus the last minutes of history).

import { getJSON } from "./api.js";
import { renderHeatmap } from "./routing.js";

const SVG = "http://www.w3.org/2000/svg";

function polyline(values, max, cls) {
  const line = document.createElementNS(SVG, "polyline");
  const n = values.length;
  const points = values.map((v, i) => {
    const x = n > 1 ? (i / (n - 1)) * 300 : 0;
    const y = 58 - (max > 0 ? (v / max) * 54 : 0);
    return `${x.toFixed(1)},${y.toFixed(1)}`;
  });
  line.setAttribute("points", points.join(" "));
  line.setAttribute("class", cls);
  return line;
}

function drawSpark(svg, series) {
  svg.replaceChildren(...series.filter((s) => s.values.length).map((s) => polyline(s.values, s.max, s.cls)));
}

/** Mean of the last `seconds` of a per-interval series. */
function recentMean(values, intervalS, seconds) {
  const n = Math.max(1, Math.round(seconds / intervalS));
  const tail = values.slice(-n);
  return tail.length ? tail.reduce((a, b) => a + b, 0) / tail.length : 0;
}

export class Dashboard {
  constructor(els, { intervalMs = 2000, onUnauthorized = () => {}, onStats = () => {} } = {}) {
    this.els = els;
    this.intervalMs = intervalMs;
    this.onUnauthorized = onUnauthorized;
    this.onStats = onStats;
    this.timer = null;
  }

  start() {
    this.stop();
    const tick = async () => {
      await this.refresh();
      this.timer = setTimeout(tick, this.intervalMs);
    };
    tick();
  }

  stop() {
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
  }

  async refresh() {
    let stats;
    try {
      stats = await getJSON("/v1/stats");
    } catch (err) {
      if (err.status === 401) this.onUnauthorized(err);
      this.els.updated.textContent = `stats unavailable: ${err.message}`;
      return;
    }
    this.render(stats);
    this.onStats(stats);
  }

  render(stats) {
    const { els } = this;
    const h = stats.history;
    els.running.textContent = String(stats.requests_running);
    els.waiting.textContent = String(stats.requests_waiting);
    els.kv.textContent = `${(stats.kv_cache_usage * 100).toFixed(1)}%`;
    els.kv.title = `${stats.kv_cache_total_blocks - stats.kv_cache_free_blocks} of ${stats.kv_cache_total_blocks} blocks`;
    els.tps.textContent = recentMean(h.generation_tokens_per_s, h.interval_s, 10).toFixed(1);
    els.tps.title = "generated tokens per second, mean of the last 10 s";
    els.windowMinutes.textContent = String(Math.round(h.window_s / 60));
    const maxTps = Math.max(1, ...h.generation_tokens_per_s);
    drawSpark(els.sparkTps, [{ values: h.generation_tokens_per_s, max: maxTps, cls: "tps" }]);
    const maxReq = Math.max(1, ...h.requests_running, ...h.requests_waiting);
    drawSpark(els.sparkLoad, [
      { values: h.kv_cache_usage, max: 1, cls: "kv" },
      { values: h.requests_running, max: maxReq, cls: "running" },
      { values: h.requests_waiting, max: maxReq, cls: "waiting" },
    ]);
    renderHeatmap(els.heatmap, stats.expert_tokens, { imbalance: stats.expert_load_imbalance });
    els.updated.textContent = `updated ${new Date().toLocaleTimeString()}; peak ${maxTps.toFixed(1)} tok/s`;
    els.updated.dataset.updates = String(Number(els.updated.dataset.updates || 0) + 1);
  }
}
