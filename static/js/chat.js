// The chat page: history, live answers over the session's WebSocket, timer, cost, switch,
// stop and end. Untrusted text (answers, messages, brand names) only ever reaches the page
// through textContent or the DOM-building Markdown renderer; brand colours are validated
// before they become CSS custom properties.
//
// An answer belongs to the server, not to this tab: leaving or reloading does not stop it.
// Its token frames are numbered (`n`); after (re)connecting the page says which turn it shows
// and the last number it has (`resume`), and the server sends exactly what is missing.

import { renderInto } from "./markdown.js";
import { formatCost, formatMoney } from "./money.js";
import { clockOffset, formatDuration, startTimers } from "./timers.js";

const HEX = /^#[0-9a-fA-F]{6}$/;
const FONT_STACK = /^[\w\s,"'-]{1,200}$/;
const LOGO = /^(https?:\/\/[^\s"'<>()\\]+|\/[^\s"'<>()\\]*)$/;
const SUMMARY_PATH = /^\/sessions\/[0-9a-f-]{36}\/summary\/$/;
const PING_EVERY_MS = 25000;
const MAX_BACKOFF_MS = 15000;
const CLOSE_SIGNED_OUT = 4401;
const CLOSE_NOT_FOUND = 4404;

const config = JSON.parse(document.getElementById("chat-config").textContent);
const root = document.querySelector("[data-chat]");
const log = root.querySelector("[data-log]");
const composer = root.querySelector("[data-composer]");
const input = composer?.querySelector("textarea");
const sendButton = composer?.querySelector("[data-send]");
const stopButton = composer?.querySelector("[data-stop]");
const counter = composer?.querySelector("[data-count]");
const notice = root.querySelector("[data-notice]");
const conn = root.querySelector("[data-conn]");
const timer = root.querySelector("[data-timer]");
const switchToggle = root.querySelector("[data-switch-open]");
const switchForm = root.querySelector("[data-switch-form]");
const endButton = root.querySelector("[data-end]");

const state = {
  session: config.session,
  ws: null,
  connected: false,
  retries: 0,
  reconnectTimer: null,
  countdownTimer: null,
  pingTimer: null,
  dropped: false,
  everConnected: false,
  signedOut: false,
  refetchAfterResume: false,
  turn: null, // {id, own, text, n, element, body, userElement, userText, reset}
  clientNames: config.client_names || {},
  modelsLoaded: false,
  offset: clockOffset(config.server_now),
};

// --- Formatting --------------------------------------------------------------------------

function formatCount(value) {
  return Number(value || 0).toLocaleString();
}

function clientName(slug) {
  return state.clientNames[slug] || slug || "";
}

// --- Brand -------------------------------------------------------------------------------

function luminance(hex) {
  const channels = [1, 3, 5].map((i) => {
    const c = Number.parseInt(hex.slice(i, i + 2), 16) / 255;
    return c <= 0.04045 ? c / 12.92 : ((c + 0.055) / 1.055) ** 2.4;
  });
  return 0.2126 * channels[0] + 0.7152 * channels[1] + 0.0722 * channels[2];
}

function readableOn(hex) {
  const lum = luminance(hex);
  const dark = "#16181d";
  const contrastDark = (lum + 0.05) / (luminance(dark) + 0.05);
  const contrastLight = 1.05 / (lum + 0.05);
  return contrastDark >= contrastLight ? dark : "#ffffff";
}

export function applyBrand(brand) {
  if (!brand || typeof brand !== "object") return;
  const style = document.documentElement.style;
  const colour = (value, property, readableProperty) => {
    if (typeof value !== "string" || !HEX.test(value)) return;
    style.setProperty(property, value);
    style.setProperty(readableProperty, readableOn(value));
  };
  colour(brand.primary_color, "--brand-primary", "--brand-on-primary");
  colour(brand.accent_color, "--brand-accent", "--brand-on-accent");
  colour(brand.background_color, "--brand-bg", "--brand-text");
  if (typeof brand.font_stack === "string" && FONT_STACK.test(brand.font_stack)) {
    style.setProperty("--brand-font", brand.font_stack);
  }
  const name = typeof brand.name === "string" ? brand.name : "";
  for (const element of document.querySelectorAll(".brand__name, [data-brand-name]")) element.textContent = name;
  const link = document.querySelector(".site-header .brand");
  if (link) {
    const logo = typeof brand.logo === "string" && LOGO.test(brand.logo) ? brand.logo : "";
    link.querySelector(".brand__logo, .brand__mark")?.remove();
    let mark;
    if (logo) {
      mark = document.createElement("img");
      mark.className = "brand__logo";
      mark.src = logo;
      mark.alt = "";
      mark.width = 32;
      mark.height = 32;
    } else {
      mark = document.createElement("span");
      mark.className = "brand__mark";
      mark.setAttribute("aria-hidden", "true");
      mark.textContent = name.slice(0, 1).toUpperCase();
    }
    link.prepend(mark);
  }
}

// --- Messages ----------------------------------------------------------------------------

function renderBody(body, role, text) {
  if (role === "user") {
    body.textContent = text; // what the consultant typed, as typed
  } else {
    renderInto(body, text);
  }
}

function metaLine(message) {
  const parts = [];
  if (message.role === "assistant") {
    if (message.client) parts.push(clientName(message.client));
    parts.push(`${formatCount(message.tokens)} tokens${message.token_source === "estimated" ? " (estimated)" : ""}`);
    parts.push(formatCost(message.cost_usd));
  } else if (message.role === "user" && message.client) {
    parts.push(clientName(message.client));
  }
  return parts.join(" · ");
}

function whoLabel(message) {
  if (message.role === "user") return "You";
  if (message.role === "system") return "Summary of earlier messages";
  return message.model || "Assistant";
}

export function messageElement(message) {
  const item = document.createElement("li");
  item.className = `msg msg--${message.role} msg--${message.status || "complete"}`;
  item.dataset.messageId = message.message_id || "";
  const who = document.createElement("div");
  who.className = "msg__who";
  who.textContent = whoLabel(message);
  const body = document.createElement("div");
  body.className = "msg__body";
  renderBody(body, message.role, message.content || "");
  item.append(who, body);
  const meta = document.createElement("div");
  meta.className = "msg__meta";
  meta.textContent = metaLine(message);
  if (message.status === "partial" || message.status === "error") {
    const badge = document.createElement("span");
    badge.className = `badge badge--${message.status}`;
    badge.textContent = message.status === "partial" ? "Stopped early — partial answer kept" : "Failed";
    meta.prepend(badge);
    if (message.error) {
      const error = document.createElement("span");
      error.className = "msg__error";
      error.textContent = message.error;
      meta.append(error);
    }
  }
  if (meta.childNodes.length) item.append(meta);
  return item;
}

function switchElement(stream) {
  const item = document.createElement("li");
  item.className = "chat-switch";
  const text = document.createElement("span");
  const target = `${clientName(stream.target_client)} · ${stream.target_model}`;
  const carried = `${stream.message_count} message${stream.message_count === 1 ? "" : "s"} carried`;
  text.textContent = `Switched to ${target} — ${carried}`;
  item.append(text);
  return item;
}

function nearBottom() {
  return window.innerHeight + window.scrollY >= document.documentElement.scrollHeight - 160;
}

function scrollToEnd(force = false) {
  if (force || nearBottom()) window.scrollTo({ top: document.documentElement.scrollHeight });
}

function appendToLog(element) {
  const stick = nearBottom();
  log.querySelector(".chat-welcome")?.remove();
  log.append(element);
  if (stick) scrollToEnd(true);
}

function renderHistory(messages, streams) {
  const items = [
    ...messages.map((m) => ({ at: Date.parse(m.timestamp), seq: m.seq, element: messageElement(m) })),
    ...(streams || []).map((s) => ({ at: Date.parse(s.streamed_at), seq: -1, element: switchElement(s) })),
  ];
  items.sort((a, b) => a.at - b.at || a.seq - b.seq);
  log.replaceChildren(...items.map((item) => item.element));
  scrollToEnd(true);
}

// --- Session bar -------------------------------------------------------------------------

function updateSession(session) {
  if (!session || typeof session !== "object") return;
  state.session = { ...state.session, ...session };
  root.querySelector("[data-cost]").textContent = formatMoney(state.session.total_cost_usd);
  root.querySelector("[data-tokens]").textContent = formatCount(state.session.total_tokens);
  root.querySelector("[data-model]").textContent = state.session.model;
  root.querySelector("[data-client-name]").textContent = clientName(state.session.client);
  if (state.session.status === "ended") setEnded();
}

function setEnded() {
  if (timer) {
    timer.dataset.timerStopped = "1";
    if (state.session.duration_seconds !== null && state.session.duration_seconds !== undefined) {
      timer.textContent = formatDuration(state.session.duration_seconds);
    }
  }
  if (composer && !composer.hidden) {
    composer.hidden = true;
    showNotice("This session has ended.", "info", { href: config.summary_url, label: "See the summary" });
  }
  if (switchToggle) switchToggle.disabled = true;
  if (endButton) endButton.disabled = true;
}

function showNotice(text, kind = "info", link = null) {
  notice.replaceChildren();
  notice.className = `notice-bar notice-bar--${kind}`;
  const span = document.createElement("span");
  span.textContent = text;
  notice.append(span);
  if (link) {
    const a = document.createElement("a");
    a.href = link.href;
    a.textContent = link.label;
    notice.append(" ", a);
  }
  notice.hidden = false;
}

function clearNotice() {
  notice.hidden = true;
  notice.replaceChildren();
}

function setConnection(status, text) {
  if (!conn) return;
  conn.hidden = false;
  conn.dataset.state = status;
  conn.textContent = text;
}

// --- Composer ----------------------------------------------------------------------------

function setBusy(busy) {
  if (!composer) return;
  sendButton.hidden = busy;
  stopButton.hidden = !busy;
  root.classList.toggle("is-streaming", busy);
}

function autosize() {
  input.style.height = "auto";
  input.style.height = `${Math.min(input.scrollHeight, window.innerHeight * 0.4)}px`;
  const length = input.value.length;
  counter.textContent = length > config.max_chars * 0.8 ? `${formatCount(length)} / ${formatCount(config.max_chars)}` : "";
}

function newTurnId() {
  const bytes = new Uint8Array(12);
  crypto.getRandomValues(bytes);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function send(frame) {
  if (!state.ws || state.ws.readyState !== WebSocket.OPEN) return false;
  state.ws.send(JSON.stringify(frame));
  return true;
}

function startTurn(id, userText, own) {
  const userElement = own
    ? null
    : messageElement({ role: "user", content: userText, status: "complete", client: state.session.client });
  if (userElement) appendToLog(userElement);
  const element = document.createElement("li");
  element.className = "msg msg--assistant msg--streaming";
  element.setAttribute("aria-busy", "true");
  const who = document.createElement("div");
  who.className = "msg__who";
  who.textContent = state.session.model;
  const body = document.createElement("div");
  body.className = "msg__body";
  const typing = document.createElement("span");
  typing.className = "typing";
  typing.setAttribute("aria-label", "Writing");
  typing.append(document.createElement("i"), document.createElement("i"), document.createElement("i"));
  body.append(typing);
  element.append(who, body);
  appendToLog(element);
  state.turn = { id, own, text: "", n: 0, element, body, userElement, userText, reset: false };
  setBusy(true);
  return state.turn;
}

// A page loaded mid-answer shows the answer's last checkpoint (rendered by the server) until
// the socket's catch-up replaces it with everything streamed so far.
function adoptServerRenderedTurn() {
  const element = log.querySelector("[data-live-turn]");
  if (!element) return;
  const body = element.querySelector(".msg__body");
  const text = body.textContent;
  if (text) renderInto(body, text);
  else {
    const typing = document.createElement("span");
    typing.className = "typing";
    typing.setAttribute("aria-label", "Writing");
    typing.append(document.createElement("i"), document.createElement("i"), document.createElement("i"));
    body.append(typing);
  }
  state.turn = { id: null, own: false, text, n: 0, element, body, userElement: null, userText: "", reset: true };
  setBusy(true);
}

function appendToken(frame) {
  const turn = state.turn;
  if (!turn || turn.id !== frame.turn) return; // not in step with this turn: the resume brings it
  if (typeof frame.n === "number") {
    if (frame.n <= turn.n) return; // already shown
    turn.n = frame.n;
  }
  // A catch-up after a server-rendered checkpoint carries everything so far: it replaces.
  turn.text = turn.reset ? frame.text : turn.text + frame.text;
  turn.reset = false;
  const stick = nearBottom();
  renderInto(turn.body, turn.text);
  if (stick) scrollToEnd(true);
}

function finishTurn(id, message) {
  const turn = state.turn && state.turn.id === id ? state.turn : null;
  if (turn) {
    if (message) {
      // A history refetched meanwhile may show the stored answer already.
      const shown = log.querySelector(`[data-message-id="${CSS.escape(message.message_id)}"]`);
      if (shown) turn.element.remove();
      else turn.element.replaceWith(messageElement(message));
    } else {
      turn.element.classList.remove("msg--streaming");
      turn.element.classList.add("msg--interrupted");
      turn.element.removeAttribute("aria-busy");
      turn.element.querySelector(".typing")?.remove();
    }
  } else if (message && !log.querySelector(`[data-message-id="${CSS.escape(message.message_id)}"]`)) {
    appendToLog(messageElement(message));
  }
  state.turn = null;
  setBusy(false);
}

function abandonTurn(id, restoreText) {
  const turn = state.turn && state.turn.id === id ? state.turn : null;
  if (!turn) return;
  turn.element.remove();
  if (turn.own) {
    log.querySelector(`[data-turn="${CSS.escape(id)}"]`)?.remove();
    if (restoreText && input && !input.value) {
      input.value = turn.userText;
      autosize();
    }
  } else {
    turn.userElement?.remove();
  }
  state.turn = null;
  setBusy(false);
}

function submitMessage() {
  const text = input.value;
  if (!text.trim() || state.turn) return;
  if (text.length > config.max_chars) {
    showNotice(`The message is ${formatCount(text.length)} characters; the limit is ${formatCount(config.max_chars)}.`, "error");
    return;
  }
  const id = newTurnId();
  if (!send({ type: "chat", message: text, turn: id })) {
    showNotice("Not connected — reconnecting. Your message is still in the box.", "warning");
    return;
  }
  clearNotice();
  const userElement = messageElement({ role: "user", content: text, status: "complete", client: state.session.client });
  userElement.dataset.turn = id;
  appendToLog(userElement);
  input.value = "";
  autosize();
  startTurn(id, text, true);
  scrollToEnd(true);
}

// --- Frames from the server --------------------------------------------------------------

const handlers = {
  ready(frame) {
    updateSession(frame.session);
    state.streamingElsewhere = Boolean(frame.streaming);
    if (state.turn || frame.streaming || state.dropped) {
      // Say what this page shows; the server sends what it lacks (or that nothing streams).
      send({ type: "resume", turn: state.turn ? state.turn.id : null, after: state.turn ? state.turn.n : 0 });
    }
  },
  "turn.started"(frame) {
    if (state.turn && state.turn.id === frame.turn) return;
    if (frame.resumed && state.turn && state.turn.id === null) {
      state.turn.id = frame.turn; // the answer this page was loaded with
      return;
    }
    if (frame.resumed && state.turn) {
      // The answer this page showed ended while it was away: the history brings it.
      state.turn.element.remove();
      state.turn = null;
      state.refetchAfterResume = true;
    }
    // Joined mid-answer (resumed): the question is in the history already.
    startTurn(frame.turn, frame.message, Boolean(frame.resumed));
  },
  token(frame) {
    if (typeof frame.text === "string") appendToken(frame);
  },
  resumed(frame) {
    const had = state.turn;
    if (frame.turn === null && had) {
      // Nothing streams any more: the answer was stored while this page was away.
      had.element.remove();
      state.turn = null;
      setBusy(false);
      state.refetchAfterResume = true;
    }
    if (state.refetchAfterResume || state.dropped) {
      state.refetchAfterResume = false;
      state.dropped = false;
      refetchHistory();
    } else if (frame.turn === null && state.streamingElsewhere) {
      showNotice("An answer is being written in another tab or on another device.", "info");
    } else {
      clearNotice();
    }
  },
  "message.done"(frame) {
    finishTurn(frame.turn, frame.message);
    updateSession(frame.session);
    clearNotice();
  },
  stopped(frame) {
    finishTurn(frame.turn, frame.stored);
    updateSession(frame.session);
  },
  error(frame) {
    if (frame.turn && "stored" in frame) {
      // What arrived was stored (or, when `stored` is null, could not be: the text stays here).
      // The provider failed mid-answer: what arrived is stored, shown with the error.
      finishTurn(frame.turn, frame.stored);
      updateSession(frame.session);
      showNotice(frame.message, "error");
    } else if (frame.turn) {
      // Refused before anything was stored (busy, too large, ended): give the text back.
      abandonTurn(frame.turn, true);
      showNotice(frame.message, frame.code === "session_busy" ? "warning" : "error");
    } else {
      showNotice(frame.message, "error");
      if (switchForm) switchForm.querySelector("button[type=submit]").disabled = false;
    }
    if (frame.code === "session_ended") {
      state.session.status = "ended";
      setEnded();
    }
  },
  switched(frame) {
    if (frame.client && typeof frame.client.slug === "string") state.clientNames[frame.client.slug] = frame.client.name;
    applyBrand(frame.brand);
    updateSession(frame.session);
    if (frame.stream) appendToLog(switchElement(frame.stream));
    closeSwitch();
    showNotice(`Now billing ${clientName(frame.session.client)} on ${frame.session.model}.`, "success");
  },
  ended(frame) {
    state.session.status = "ended";
    if (frame.summary) updateSession(frame.summary);
    setEnded();
    if (typeof frame.summary_url === "string" && SUMMARY_PATH.test(frame.summary_url)) {
      window.location.assign(frame.summary_url);
    }
  },
  pong() {},
};

function onFrame(event) {
  let frame;
  try {
    frame = JSON.parse(event.data);
  } catch {
    return;
  }
  const handler = frame && Object.hasOwn(handlers, frame.type) ? handlers[frame.type] : null;
  if (handler) handler(frame);
  // Other modules on the page (billing.js: budget and billing panel) follow the frames too.
  if (handler) document.dispatchEvent(new CustomEvent("chat:frame", { detail: frame }));
}

// --- Connection --------------------------------------------------------------------------

function connect() {
  clearTimeout(state.reconnectTimer);
  state.reconnectTimer = null;
  if (state.ws || state.signedOut || state.session.status === "ended") return;
  const scheme = window.location.protocol === "https:" ? "wss" : "ws";
  const ws = new WebSocket(`${scheme}://${window.location.host}${config.ws_path}`);
  state.ws = ws;
  setConnection("connecting", "Connecting…");
  let opened = false;
  ws.addEventListener("open", () => {
    opened = true;
    state.connected = true;
    state.everConnected = true;
    state.retries = 0;
    setConnection("live", "Live");
    if (sendButton) sendButton.disabled = false;
    if (state.unreachable) {
      state.unreachable = false;
      if (!state.turn) clearNotice();
    }
    clearInterval(state.pingTimer);
    state.pingTimer = setInterval(() => send({ type: "ping" }), PING_EVERY_MS);
  });
  ws.addEventListener("message", onFrame);
  ws.addEventListener("close", (event) => {
    state.ws = null;
    state.connected = false;
    clearInterval(state.pingTimer);
    if (event.code === CLOSE_SIGNED_OUT) {
      signedOut();
      return;
    }
    if (event.code === CLOSE_NOT_FOUND) {
      setConnection("closed", "Unavailable");
      showNotice("This session is not available to you.", "error");
      return;
    }
    if (state.session.status === "ended") return;
    state.dropped = true;
    if (state.turn) state.turn.element.classList.add("msg--interrupted");
    scheduleReconnect(opened);
  });
}

function signedOut() {
  // The sign-in expired (or the password changed): say so, and come back to this chat after.
  state.signedOut = true;
  clearTimeout(state.reconnectTimer);
  clearInterval(state.countdownTimer);
  setConnection("closed", "Signed out");
  if (sendButton) sendButton.disabled = true;
  showNotice("Signed out: sign in again.", "warning", {
    href: `/accounts/login/?next=${encodeURIComponent(window.location.pathname)}`,
    label: "Sign in",
  });
}

function scheduleReconnect(justDropped) {
  clearInterval(state.countdownTimer);
  if (justDropped) {
    // Dropped while connected (a restart, a network blip): try again at once, quietly.
    setConnection("reconnecting", "Reconnecting…");
    state.reconnectTimer = setTimeout(connect, 300);
    return;
  }
  const base = Math.min(MAX_BACKOFF_MS, 1000 * 2 ** state.retries);
  const delay = Math.round(base * (0.8 + Math.random() * 0.4));
  state.retries += 1;
  const due = Date.now() + delay;
  const say = () => {
    const seconds = Math.max(1, Math.ceil((due - Date.now()) / 1000));
    setConnection("reconnecting", `Server unreachable, retrying in ${seconds} s`);
  };
  say();
  state.countdownTimer = setInterval(say, 1000);
  if (!state.unreachable) {
    state.unreachable = true;
    probeSignIn();
  }
  if (state.turn) {
    showNotice("Server unreachable mid-answer — the answer shows here, as the server has it, once it is back.", "warning");
  }
  state.reconnectTimer = setTimeout(() => {
    clearInterval(state.countdownTimer);
    connect();
  }, delay);
}

async function probeSignIn() {
  // A socket that never opens cannot carry a close code: ask the server whether we are signed in.
  try {
    const response = await fetch(config.messages_url, { credentials: "same-origin", headers: { Accept: "application/json" } });
    if (response.status === 401) signedOut();
  } catch {
    // Unreachable indeed: the countdown says so.
  }
}

async function refetchHistory(attempt = 0) {
  try {
    const response = await fetch(config.messages_url, {
      credentials: "same-origin",
      headers: { Accept: "application/json" },
    });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const data = await response.json();
    const live = state.turn && state.turn.id !== null ? state.turn : null;
    if (!live) {
      state.turn = null;
      setBusy(false);
    }
    renderHistory(data.messages, data.context_streams);
    if (live) appendToLog(live.element); // the answer still streaming goes on below its question
    updateSession(data.session);
    if (data.streaming && !live && attempt < 20) {
      showNotice("The answer is still being written elsewhere; it appears here when it is stored.", "info");
      setTimeout(() => refetchHistory(attempt + 1), 1500);
    } else if (state.session.status !== "ended") {
      clearNotice();
    }
  } catch (error) {
    showNotice(`Could not reload the conversation (${error.message}); retrying.`, "warning");
    if (attempt < 20) setTimeout(() => refetchHistory(attempt + 1), 2000);
  }
}

// --- Switch, stop, end -------------------------------------------------------------------

async function loadModels() {
  if (state.modelsLoaded) return;
  const select = switchForm.querySelector("select[name=model]");
  try {
    const response = await fetch(config.models_url, { credentials: "same-origin", headers: { Accept: "application/json" } });
    const data = await response.json();
    if (!response.ok || !Array.isArray(data.models) || !data.models.length) throw new Error(data.error || "no models");
    const groups = new Map();
    for (const model of data.models) {
      const label = model.provider.charAt(0).toUpperCase() + model.provider.slice(1);
      if (!groups.has(label)) groups.set(label, []);
      groups.get(label).push(model);
    }
    select.replaceChildren();
    let found = false;
    for (const [label, models] of groups) {
      const group = document.createElement("optgroup");
      group.label = label;
      for (const model of models) {
        const option = new Option(`${model.name} · ${model.paid ? "paid" : "free, local"}`, model.name);
        if (model.name === state.session.model) {
          option.selected = true;
          found = true;
        }
        group.append(option);
      }
      select.append(group);
    }
    if (!found) select.prepend(new Option(state.session.model, state.session.model, true, true));
    state.modelsLoaded = true;
  } catch {
    // No live list: let the consultant type a model name; the server validates it.
    const field = document.createElement("input");
    field.name = "model";
    field.id = select.id;
    field.value = state.session.model;
    field.required = true;
    field.maxLength = 200;
    select.replaceWith(field);
    state.modelsLoaded = true;
  }
}

function openSwitch() {
  switchForm.hidden = false;
  switchToggle.setAttribute("aria-expanded", "true");
  switchForm.querySelector("select[name=client]").value = state.session.client;
  switchForm.querySelector("button[type=submit]").disabled = false;
  loadModels();
  switchForm.querySelector("select[name=client]").focus();
}

function closeSwitch() {
  if (!switchForm) return;
  switchForm.hidden = true;
  switchToggle.setAttribute("aria-expanded", "false");
}

function submitSwitch(event) {
  event.preventDefault();
  const form = new FormData(switchForm);
  const frame = { type: "switch" };
  const client = String(form.get("client") || "");
  const model = String(form.get("model") || "").trim();
  if (client && client !== state.session.client) frame.client = client;
  if (model && model !== state.session.model) frame.model = model;
  const reason = String(form.get("reason") || "").trim();
  if (reason) frame.reason = reason;
  if (!frame.client && !frame.model) {
    closeSwitch();
    return;
  }
  if (state.turn) {
    showNotice("Wait for the answer to finish (or stop it) before switching.", "warning");
    return;
  }
  if (send(frame)) switchForm.querySelector("button[type=submit]").disabled = true;
  else showNotice("Not connected — reconnecting; try again in a moment.", "warning");
}

function csrfToken() {
  const match = document.cookie.match(/(?:^|;\s*)csrftoken=([^;]+)/);
  return match ? decodeURIComponent(match[1]) : "";
}

async function endSession() {
  if (!window.confirm("End this session? The timer stops and the summary is sealed.")) return;
  if (send({ type: "end" })) return;
  // No socket: end it through the REST API instead.
  const response = await fetch(`/api/ollama/session/${state.session.session_id}/end`, {
    method: "POST",
    credentials: "same-origin",
    headers: { "X-CSRFToken": csrfToken(), Accept: "application/json" },
  });
  if (response.ok) window.location.assign(config.summary_url);
  else showNotice("Could not end the session; try again.", "error");
}

// --- Start -------------------------------------------------------------------------------

function upgradeServerRenderedHistory() {
  for (const body of log.querySelectorAll("[data-markdown]")) renderInto(body, body.textContent);
}

function start() {
  upgradeServerRenderedHistory();
  if (config.can_chat) adoptServerRenderedTurn();
  updateSession(state.session);
  if (timer && state.session.status === "active") {
    timer.dataset.timerStart = state.session.started_at;
    startTimers(root, state.offset, "[data-timer]");
  }
  scrollToEnd(true);
  if (!config.can_chat) return;
  composer.addEventListener("submit", (event) => {
    event.preventDefault();
    submitMessage();
  });
  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing && !event.altKey) {
      event.preventDefault();
      submitMessage();
    }
  });
  input.addEventListener("input", autosize);
  stopButton.addEventListener("click", () => send({ type: "stop" }));
  switchToggle.addEventListener("click", () => (switchForm.hidden ? openSwitch() : closeSwitch()));
  switchForm.addEventListener("submit", submitSwitch);
  switchForm.querySelector("[data-switch-cancel]").addEventListener("click", closeSwitch);
  endButton.addEventListener("click", endSession);
  window.addEventListener("online", () => {
    if (!state.ws && !state.signedOut) connect();
  });
  document.addEventListener("visibilitychange", () => {
    if (document.visibilityState === "visible" && !state.ws && !state.signedOut && state.session.status === "active") {
      connect();
    }
  });
  connect();
  input.focus();
}

start();
