// The chat playground: settings -> a /v1/chat/completions request (streamed or not), the reply rendered safely,
// tool calls shown with a field for each result, routing shown per token, and the live dashboard beside it.

import { ApiError, getJSON, getKey, postJSON, postStream, setKey } from "./api.js";
import { Dashboard } from "./dashboard.js";
import { renderContent, renderText } from "./render.js";
import {
  recolour, renderHeatmap, renderLegend, renderTokens, routingCounts, tooltipNodes,
} from "./routing.js";

const $ = (id) => document.getElementById(id);

const state = {
  history: [], // API messages of the conversation (the system prompt is added per request)
  views: [], // assistant message views that carry routing (re-coloured when the layer changes)
  controller: null, // AbortController of the request in flight
  pendingCalls: [], // tool calls waiting for their results
  numLayers: 0,
  numExperts: 0,
};

// ------------------------------------------------------------------ status, key, errors
function setStatus(text) {
  $("status").textContent = text;
}

function askForKey(reason) {
  $("keybar").hidden = false;
  $("key-reason").textContent = reason || "This server needs an API key.";
  $("key-input").focus();
}

function handleError(err, view) {
  if (err.name === "AbortError") return;
  if (err instanceof ApiError && err.status === 401) {
    askForKey(getKey() ? "The API key was refused; enter the right one." : "This server needs an API key.");
  }
  const message = err instanceof ApiError ? `error ${err.status}: ${err.message}` : `error: ${err.message}`;
  if (view) {
    view.el.classList.add("error");
    view.meta.textContent = message;
  } else {
    addMessage("error", message).el.classList.add("error");
  }
  setStatus(message);
}

// ------------------------------------------------------------------ settings -> request
function parseJSONField(id, what) {
  const text = $(id).value.trim();
  if (!text) return undefined;
  try {
    return JSON.parse(text);
  } catch (err) {
    throw new Error(`${what} is not valid JSON: ${err.message}`);
  }
}

function toolsFromField() {
  const tools = parseJSONField("tools", "tool definitions");
  if (tools !== undefined && !Array.isArray(tools)) throw new Error("tool definitions must be a JSON list");
  return tools && tools.length ? tools : undefined;
}

function refreshToolChoices() {
  const select = $("tool-choice");
  const keep = select.value;
  let names = [];
  try {
    names = (toolsFromField() || []).map((t) => t && t.function && t.function.name).filter(Boolean);
    $("tools-error").textContent = "";
  } catch (err) {
    $("tools-error").textContent = err.message;
  }
  for (const option of [...select.options]) if (option.value.startsWith("fn:")) option.remove();
  for (const name of names) {
    const option = document.createElement("option");
    option.value = `fn:${name}`;
    option.textContent = `${name} (force this one)`;
    select.append(option);
  }
  select.value = [...select.options].some((o) => o.value === keep) ? keep : "auto";
}

function numberField(id) {
  const value = $(id).value.trim();
  return value === "" ? undefined : Number(value);
}

export function buildRequest(messages) {
  const body = { model: $("model").value, messages, stream: $("stream").checked };
  const system = $("system").value.trim();
  if (system) body.messages = [{ role: "system", content: system }, ...messages];
  for (const [id, key] of [["temperature", "temperature"], ["top-p", "top_p"], ["max-tokens", "max_tokens"],
    ["seed", "random_seed"]]) {
    const value = numberField(id);
    if (value !== undefined) body[key] = value;
  }
  const stops = $("stop").value.split("\n").filter((s) => s !== "");
  if (stops.length) body.stop = stops;
  const format = $("response-format").value;
  if (format === "json_object") body.response_format = { type: "json_object" };
  if (format === "json_schema") {
    const schema = parseJSONField("schema", "the JSON schema");
    if (schema === undefined) throw new Error("JSON schema mode needs a schema");
    body.response_format = { type: "json_schema", json_schema: { name: "response", schema, strict: true } };
  }
  const tools = toolsFromField();
  if (tools) {
    body.tools = tools;
    const choice = $("tool-choice").value;
    body.tool_choice = choice.startsWith("fn:") ? { type: "function", function: { name: choice.slice(3) } } : choice;
    if (!$("parallel-tools").checked) body.parallel_tool_calls = false;
  }
  if ($("routing").checked || $("prompt-routing").checked) body.return_routing = true;
  if ($("prompt-routing").checked) body.return_prompt_routing = true;
  return body;
}

// ------------------------------------------------------------------ message views
function addMessage(role, text) {
  const el = document.createElement("div");
  el.className = `msg ${role}`;
  const label = document.createElement("div");
  label.className = "role";
  label.textContent = role;
  const content = document.createElement("div");
  content.className = "content";
  const meta = document.createElement("div");
  meta.className = "meta";
  el.append(label, content, meta);
  renderText(content, text || "");
  $("messages").append(el);
  el.scrollIntoView({ block: "end" });
  return { el, content, meta, label };
}

function currentLayer() {
  return Number($("layer").value || 0);
}

function showTooltip(entry, event) {
  const tip = $("tooltip");
  tip.replaceChildren(...tooltipNodes(entry));
  tip.hidden = false;
  tip.style.left = `${Math.min(event.clientX + 12, window.innerWidth - 330)}px`;
  tip.style.top = `${event.clientY + 14}px`;
}

function hideTooltip() {
  $("tooltip").hidden = true;
}

/** The routing part of an assistant view: coloured generated tokens, prompt tokens, the message's heatmap. */
function renderRouting(view) {
  const { routing } = view;
  if (!routing.tokens.length && !routing.prompt_tokens) return;
  if (!view.routingEl) {
    view.routingEl = document.createElement("div");
    view.routingEl.className = "routing-block";
    view.tokensEl = document.createElement("div");
    view.tokensEl.className = "tokens";
    view.heatDetails = document.createElement("details");
    const summary = document.createElement("summary");
    summary.textContent = "routing of this message (layer x expert, all top-k choices)";
    view.heatTable = document.createElement("table");
    view.heatTable.className = "heatmap";
    view.heatDetails.append(summary, view.heatTable);
    view.routingEl.append(view.tokensEl, view.heatDetails);
    view.el.insertBefore(view.routingEl, view.meta);
    view.content.hidden = true; // the coloured tokens are the message now
    state.views.push(view);
  }
  const hover = { onHover: showTooltip, onLeave: hideTooltip };
  renderTokens(view.tokensEl, routing.tokens, currentLayer(), hover);
  if (routing.prompt_tokens && !view.promptEl) {
    const details = document.createElement("details");
    const summary = document.createElement("summary");
    summary.textContent = `prompt tokens (${routing.prompt_tokens.length})`;
    view.promptEl = document.createElement("div");
    view.promptEl.className = "tokens prompt-tokens";
    details.append(summary, view.promptEl);
    view.routingEl.prepend(details);
    renderTokens(view.promptEl, routing.prompt_tokens, currentLayer(), hover);
  }
  renderHeatmap(view.heatTable, routingCounts(routing.tokens, state.numExperts));
}

function showToolCalls(view, calls) {
  for (const call of calls) {
    const box = document.createElement("div");
    box.className = "toolcall";
    box.dataset.callId = call.id || "";
    const name = document.createElement("div");
    name.className = "name";
    name.textContent = `call ${call.function.name}`;
    const args = document.createElement("pre");
    let text = call.function.arguments;
    try {
      text = JSON.stringify(JSON.parse(text), null, 2);
    } catch {
      // shown as sent
    }
    args.textContent = text;
    box.append(name, args);
    view.el.insertBefore(box, view.meta);
  }
}

function askForToolResults(calls) {
  state.pendingCalls = calls;
  const fields = $("tool-result-fields");
  fields.replaceChildren();
  for (const call of calls) {
    const label = document.createElement("label");
    label.textContent = `result of ${call.function.name} (${call.id})`;
    const area = document.createElement("textarea");
    area.rows = 2;
    area.dataset.callId = call.id;
    area.className = "tool-result";
    label.append(area);
    fields.append(label);
  }
  $("tool-results").hidden = false;
  const first = fields.querySelector("textarea");
  if (first) first.focus();
}

// ------------------------------------------------------------------ one completion
function setBusy(busy) {
  $("send").disabled = busy;
  $("send-results").disabled = busy;
  $("stop-button").disabled = !busy;
}

function mergeToolCalls(into, deltas) {
  for (const delta of deltas) {
    const index = delta.index ?? into.length;
    const existing = into[index];
    if (!existing) {
      into[index] = { id: delta.id, type: "function",
        function: { name: delta.function.name, arguments: delta.function.arguments || "" } };
    } else {
      if (delta.id) existing.id = delta.id;
      if (delta.function?.name) existing.function.name = delta.function.name;
      existing.function.arguments += delta.function?.arguments || "";
    }
  }
}

/** Send the conversation plus `turn` (the new messages); they join the history only once the request is valid. */
async function complete(turn) {
  let body;
  try {
    body = buildRequest([...state.history, ...turn.map((t) => t.message)]);
  } catch (err) {
    handleError(err);
    return false;
  }
  for (const { message, show } of turn) {
    state.history.push(message);
    show();
  }
  const view = addMessage("assistant", "");
  view.text = "";
  view.toolCalls = [];
  view.routing = { tokens: [], prompt_tokens: null };
  view.el.dataset.deltas = "0";
  const markdown = $("markdown").checked;
  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  setStatus("generating...");
  let finish = null;
  let usage = null;
  try {
    if (body.stream) {
      await postStream("/v1/chat/completions", body, controller.signal, (chunk) => {
        if (chunk.usage) usage = chunk.usage;
        for (const choice of chunk.choices || []) {
          if (choice.index !== 0) continue;
          const delta = choice.delta || {};
          if (delta.content) {
            view.text += delta.content;
            view.el.dataset.deltas = String(Number(view.el.dataset.deltas) + 1);
            renderContent(view.content, view.text, markdown);
          }
          if (delta.tool_calls) mergeToolCalls(view.toolCalls, delta.tool_calls);
          if (choice.routing) {
            view.routing.tokens.push(...(choice.routing.tokens || []));
            if (choice.routing.prompt_tokens) view.routing.prompt_tokens = choice.routing.prompt_tokens;
            renderRouting(view);
          }
          if (choice.finish_reason) finish = choice.finish_reason;
        }
      });
    } else {
      const response = await postJSON("/v1/chat/completions", body, controller.signal);
      const choice = response.choices[0];
      usage = response.usage;
      finish = choice.finish_reason;
      view.text = choice.message.content || "";
      view.toolCalls = choice.message.tool_calls || [];
      renderContent(view.content, view.text, markdown);
      if (choice.routing) {
        view.routing = { tokens: choice.routing.tokens || [], prompt_tokens: choice.routing.prompt_tokens || null };
        renderRouting(view);
      }
    }
  } catch (err) {
    if (err.name === "AbortError") finish = "stopped";
    else {
      handleError(err, view);
      finish = "error";
    }
  } finally {
    state.controller = null;
    setBusy(false);
  }
  view.el.dataset.done = "true";
  view.el.dataset.finishReason = finish || "";
  if (finish !== "error") {
    const parts = [`finish: ${finish}`];
    if (usage) parts.push(`${usage.prompt_tokens} prompt + ${usage.completion_tokens} generated tokens`);
    if ((body.return_routing) && !view.routing.tokens.length) parts.push("no routing in the response");
    view.meta.textContent = parts.join(" | ");
    setStatus("");
  }
  if (finish === "error") return true;
  if (view.toolCalls.length) {
    showToolCalls(view, view.toolCalls);
    state.history.push({ role: "assistant", content: "", tool_calls: view.toolCalls });
    askForToolResults(view.toolCalls);
  } else if (view.text || finish !== "stopped") {
    state.history.push({ role: "assistant", content: view.text });
  }
  return true;
}

// ------------------------------------------------------------------ actions
async function sendMessage() {
  const text = $("input").value;
  if (!text.trim() || state.controller) return;
  await complete([{
    message: { role: "user", content: text },
    show: () => {
      $("input").value = "";
      $("tool-results").hidden = true;
      state.pendingCalls = [];
      addMessage("user", text);
    },
  }]);
}

async function sendToolResults() {
  if (state.controller || !state.pendingCalls.length) return;
  const turn = [...$("tool-result-fields").querySelectorAll("textarea")].map((area) => {
    const call = state.pendingCalls.find((c) => c.id === area.dataset.callId);
    const content = area.value;
    return {
      message: { role: "tool", tool_call_id: call.id, name: call.function.name, content },
      show: () => {
        state.pendingCalls = [];
        $("tool-results").hidden = true;
        addMessage("tool", content).label.textContent = `tool result: ${call.function.name}`;
      },
    };
  });
  await complete(turn);
}

function clearConversation() {
  if (state.controller) state.controller.abort();
  state.history = [];
  state.views = [];
  state.pendingCalls = [];
  $("messages").replaceChildren();
  $("tool-results").hidden = true;
  setStatus("");
}

async function loadModels() {
  try {
    const list = await getJSON("/v1/models");
    const select = $("model");
    const keep = select.value;
    select.replaceChildren();
    for (const card of list.data) {
      for (const name of [card.id, ...(card.aliases || [])]) {
        const option = document.createElement("option");
        option.value = name;
        option.textContent = name === card.id ? name : `${name} (alias)`;
        select.append(option);
      }
    }
    if (keep && [...select.options].some((o) => o.value === keep)) select.value = keep;
    setStatus("");
  } catch (err) {
    handleError(err);
  }
}

function onStats(stats) {
  if (stats.num_layers === state.numLayers && stats.num_experts === state.numExperts) return;
  state.numLayers = stats.num_layers;
  state.numExperts = stats.num_experts;
  const select = $("layer");
  select.replaceChildren();
  for (let l = 0; l < stats.num_layers; l++) {
    const option = document.createElement("option");
    option.value = String(l);
    option.textContent = `layer ${l}`;
    select.append(option);
  }
  renderLegend($("legend"), stats.num_experts);
}

function init() {
  const dashboard = new Dashboard({
    running: $("stat-running"), waiting: $("stat-waiting"), kv: $("stat-kv"), tps: $("stat-tps"),
    sparkTps: $("spark-tps"), sparkLoad: $("spark-load"), heatmap: $("expert-heatmap"),
    updated: $("stats-updated"), windowMinutes: $("window-minutes"),
  }, { onUnauthorized: () => askForKey(), onStats });
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    sendMessage();
  });
  $("input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      sendMessage();
    }
  });
  $("stop-button").addEventListener("click", () => state.controller && state.controller.abort());
  $("clear").addEventListener("click", clearConversation);
  $("send-results").addEventListener("click", sendToolResults);
  $("tools").addEventListener("input", refreshToolChoices);
  $("response-format").addEventListener("change", () => {
    $("schema").hidden = $("response-format").value !== "json_schema";
  });
  $("layer").addEventListener("change", () => {
    for (const view of state.views) {
      recolour(view.tokensEl, view.routing.tokens, currentLayer());
      if (view.promptEl) recolour(view.promptEl, view.routing.prompt_tokens, currentLayer());
    }
  });
  $("key-button").addEventListener("click", () => {
    $("keybar").hidden = !$("keybar").hidden;
  });
  $("key-save").addEventListener("click", () => {
    setKey($("key-input").value.trim());
    $("key-input").value = "";
    $("keybar").hidden = true;
    loadModels();
    dashboard.refresh();
  });
  refreshToolChoices();
  loadModels();
  dashboard.start();
}

init();
