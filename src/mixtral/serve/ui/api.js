// The page's only way to the server: this server's own API (same origin), with the API key when one is set.

const KEY_STORAGE = "mixtral.apiKey";

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

export function getKey() {
  return sessionStorage.getItem(KEY_STORAGE) || "";
}

export function setKey(key) {
  if (key) sessionStorage.setItem(KEY_STORAGE, key);
  else sessionStorage.removeItem(KEY_STORAGE);
}

function headers(json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  const key = getKey();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

/** The error message of a response body in Mistral's or OpenAI's shape. */
export function errorMessage(body, status) {
  if (body && typeof body === "object") {
    if (typeof body.message === "string") return body.message;
    if (body.error && typeof body.error.message === "string") return body.error.message;
    if (typeof body.detail === "string") return body.detail;
  }
  return `HTTP ${status}`;
}

async function check(response) {
  if (response.ok) return response;
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = null;
  }
  throw new ApiError(response.status, errorMessage(body, response.status));
}

export async function getJSON(path) {
  const response = await check(await fetch(path, { headers: headers(false) }));
  return response.json();
}

export async function postJSON(path, body, signal) {
  const response = await check(await fetch(path, {
    method: "POST", headers: headers(true), body: JSON.stringify(body), signal,
  }));
  return response.json();
}

/** POST with `stream: true`; calls onEvent(payload) for each `data:` JSON event until `[DONE]`. */
export async function postStream(path, body, signal, onEvent) {
  const response = await check(await fetch(path, {
    method: "POST", headers: headers(true), body: JSON.stringify(body), signal,
  }));
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        const payload = JSON.parse(data);
        if (payload.object === "error" || (payload.error && !payload.choices)) {
          throw new ApiError(Number(payload.code) || 500, errorMessage(payload, 500));
        }
        onEvent(payload);
      }
    }
  }
}
