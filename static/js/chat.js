// The chat page: history, live answers over the session's WebSocket, timer, cost, switch,
// stop and end. Untrusted text (answers, messages, brand names) only ever reaches the page
// through textContent or the DOM-building Markdown renderer; brand colours are validated
// before they become CSS custom properties.
//
// Every message carries its tools: copy, its time, branch from here, and on the last ones edit
// (your own message) and regenerate (the answer). Edit and regenerate go over the socket: the
// server makes a new version (a new session; billed history is never rewritten), starts its
// answer as a turn of the process, and sends this page there, where it resumes the stream.
//
// In a shared session the owner's and the invited consultants' pages watch the same stream;
// a guest whose invitation is revoked is told so and disconnected (close code 4403).
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
const CHAT_PATH = /^\/sessions\/[0-9a-f-]{36}\/$/;
const SESSION_ID = /^[0-9a-f-]{36}$/;
const COPIED_FOR_MS = 2000;
const PING_EVERY_MS = 25000;
const MAX_BACKOFF_MS = 15000;
const CLOSE_SIGNED_OUT = 4401;
const CLOSE_REVOKED = 4403;
const CLOSE_NOT_FOUND = 4404;
const REVOKED_TEXT = "The owner stopped sharing this session with you.";

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
  people: config.people || {}, // username -> the name pages show
  revoked: false,
  versionPending: false,
};

// The text each message was written as (answers are shown rendered from Markdown): what Copy copies.
const sourceText = new WeakMap();

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

function authorOf(message) {
  // Messages stored before authors were recorded were typed by the session's owner.
  return message.author || config.owner_username || "";
}

function whoLabel(message) {
  if (message.role === "user") {
    const author = authorOf(message);
    if (!author || author === config.me) return "You";
    return state.people[author] || author;
  }
  if (message.role === "system") return "Summary of earlier messages";
  return message.model || "Assistant";
}

export function messageElement(message) {
  const item = document.createElement("li");
  item.className = `msg msg--${message.role} msg--${message.status || "complete"}`;
  item.dataset.messageId = message.message_id || "";
  item.dataset.role = message.role;
  if (Number.isInteger(message.seq)) {
    item.dataset.seq = String(message.seq);
    item.id = `message-${message.seq}`;
  }
  if (message.role === "user") item.dataset.author = authorOf(message);
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
  const foot = document.createElement("div");
  foot.className = "msg__foot";
  const time = document.createElement("time");
  time.className = "msg__time";
  time.dateTime = message.timestamp || new Date().toISOString();
  foot.append(time);
  item.append(foot);
  sourceText.set(item, message.content || "");
  addTools(item);
  return item;
}

// --- Per-message tools -------------------------------------------------------------------

function toolButton(label, text, action) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "msg-tool";
  button.dataset.tool = action;
  button.setAttribute("aria-label", label);
  button.textContent = text;
  return button;
}

function showLocalTime(time) {
  const at = new Date(time.dateTime);
  if (Number.isNaN(at.getTime())) return;
  time.textContent = at.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  time.title = at.toLocaleString([], { dateStyle: "full", timeStyle: "medium" });
}

function lastShownSeq() {
  return Math.max(0, ...Array.from(log.querySelectorAll(".msg[data-seq]"), (item) => seqOf(item) ?? 0));
}

function seqOf(item) {
  const seq = Number.parseInt(item.dataset.seq || "", 10);
  return Number.isInteger(seq) ? seq : null;
}

// Copy, time and branch on every stored message; edit and regenerate are added by refreshLastTools.
function addTools(item) {
  const foot = item.querySelector(".msg__foot");
  if (!foot || foot.querySelector(".msg__tools")) return;
  const time = foot.querySelector("time");
  if (time) showLocalTime(time);
  const tools = document.createElement("span");
  tools.className = "msg__tools";
  tools.setAttribute("role", "group");
  const role = item.dataset.role || "message";
  const noun = role === "user" ? "message" : role === "assistant" ? "answer" : "summary";
  tools.setAttribute("aria-label", `Tools for this ${noun}`);
  tools.append(toolButton(`Copy this ${noun}`, "Copy", "copy"));
  if (item.dataset.seq) tools.append(toolButton(`Branch from here: a new session with the messages up to this ${noun}`, "Branch", "branch"));
  foot.append(tools);
}

function refreshLastTools() {
  for (const button of log.querySelectorAll("[data-tool=edit], [data-tool=regenerate]")) button.remove();
  if (!config.can_chat || state.turn || state.revoked || state.session.status !== "active") return;
  const stored = [...log.querySelectorAll(".msg[data-seq]")];
  const lastQuestion = stored.filter((item) => item.dataset.role === "user").at(-1);
  if (lastQuestion && lastQuestion.dataset.author === config.me) {
    lastQuestion.querySelector(".msg__tools")?.append(toolButton("Edit this message and send it again", "Edit", "edit"));
  }
  const lastAnswer = stored.filter((item) => item.dataset.role === "assistant").at(-1);
  if (lastAnswer) {
    lastAnswer.querySelector(".msg__tools")?.append(toolButton("Regenerate this answer", "Regenerate", "regenerate"));
  }
}

async function copyMessage(item, button) {
  const text = sourceText.has(item) ? sourceText.get(item) : item.querySelector(".msg__body").textContent;
  let copied = false;
  try {
    await navigator.clipboard.writeText(text);
    copied = true;
  } catch {
    // No clipboard API (an insecure origin, or permission refused): the selection route.
    const area = document.createElement("textarea");
    area.value = text;
    area.setAttribute("readonly", "");
    area.className = "visually-hidden";
    document.body.append(area);
    area.select();
    copied = document.execCommand("copy");
    area.remove();
  }
  const label = button.getAttribute("aria-label");
  button.textContent = copied ? "Copied" : "Copy failed";
  button.setAttribute("aria-label", copied ? "Copied" : "Could not copy; select the text instead");
  button.classList.toggle("is-done", copied);
  setTimeout(() => {
    button.textContent = "Copy";
    button.setAttribute("aria-label", label);
    button.classList.remove("is-done");
  }, COPIED_FOR_MS);
}

async function branchFrom(item, button) {
  const seq = seqOf(item);
  if (seq === null) return;
  button.disabled = true;
  try {
    const response = await fetch(config.branch_url, {
      method: "POST",
      credentials: "same-origin",
      headers: { "X-CSRFToken": csrfToken(), Accept: "application/json", "Content-Type": "application/json" },
      body: JSON.stringify({ at: seq }),
    });
    const data = await response.json().catch(() => ({}));
    if (response.ok && typeof data.session_id === "string" && SESSION_ID.test(data.session_id)) {
      window.location.assign(`/sessions/${data.session_id}/`);
      return;
    }
    showNotice(data.error?.message || `Could not branch (HTTP ${response.status}).`, "error");
  } catch {
    showNotice("Could not branch: the server did not answer. Try again.", "error");
  }
  button.disabled = false;
}

function openEdit(item) {
  if (item.querySelector(".msg__edit")) return;
  const body = item.querySelector(".msg__body");
  const form = document.createElement("form");
  form.className = "msg__edit";
  const label = document.createElement("label");
  label.className = "visually-hidden";
  label.htmlFor = "edit-message";
  label.textContent = "Edited message";
  const area = document.createElement("textarea");
  area.id = "edit-message";
  area.maxLength = config.max_chars;
  area.rows = 3;
  area.value = sourceText.get(item) ?? body.textContent;
  const buttons = document.createElement("div");
  buttons.className = "msg__edit-buttons";
  const sendEdit = document.createElement("button");
  sendEdit.type = "submit";
  sendEdit.className = "button button--primary";
  sendEdit.textContent = "Send as a new version";
  const cancel = document.createElement("button");
  cancel.type = "button";
  cancel.className = "button";
  cancel.textContent = "Cancel";
  const hint = document.createElement("p");
  hint.className = "msg__edit-hint";
  hint.textContent = "A new session (a version) starts here with your edited message; this conversation stays as it was.";
  buttons.append(sendEdit, cancel);
  form.append(label, area, hint, buttons);
  body.hidden = true;
  body.after(form);
  area.focus();
  cancel.addEventListener("click", () => {
    form.remove();
    body.hidden = false;
    item.querySelector("[data-tool=edit]")?.focus();
  });
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const text = area.value;
    if (!text.trim()) {
      showNotice("Write the message to send, or cancel.", "warning");
      return;
    }
    if (askVersion({ type: "edit", seq: seqOf(item) ?? undefined, message: text })) sendEdit.disabled = true;
  });
}

function askVersion(frame) {
  if (state.turn) {
    showNotice("Wait for the answer to finish (or stop it) before making a new version.", "warning");
    return false;
  }
  if (!send(frame)) {
    showNotice("Not connected — reconnecting; try again in a moment.", "warning");
    return false;
  }
  state.versionPending = true;
  showNotice("Starting the new version…", "info");
  return true;
}

function onToolClick(event) {
  const button = event.target.closest("button[data-tool]");
  if (!button || !log.contains(button)) return;
  const item = button.closest(".msg");
  const tool = button.dataset.tool;
  if (tool === "copy") copyMessage(item, button);
  else if (tool === "branch") branchFrom(item, button);
  else if (tool === "edit") openEdit(item);
  else if (tool === "regenerate") {
    if (askVersion({ type: "regenerate", seq: seqOf(item) ?? undefined })) button.disabled = true;
  }
}

// "‹ 2/3 ›" on each message that has other versions (edits, regenerations, branches).
async function loadVersions() {
  if (!log.querySelector(".msg[data-seq]")) return;
  let data;
  try {
    const response = await fetch(config.versions_url, { credentials: "same-origin", headers: { Accept: "application/json" } });
    if (!response.ok) return;
    data = await response.json();
  } catch {
    return; // the conversation works without them
  }
  for (const entry of Array.isArray(data.versions) ? data.versions : []) {
    const item = log.querySelector(`.msg[data-seq="${Number(entry.seq)}"]`);
    const versions = Array.isArray(entry.versions) ? entry.versions : [];
    const index = versions.findIndex((v) => v.current);
    if (!item || index < 0 || versions.length < 2) continue;
    item.querySelector(".msg__versions")?.remove();
    const nav = document.createElement("nav");
    nav.className = "msg__versions";
    nav.setAttribute("aria-label", `Versions of this message: ${index + 1} of ${versions.length}`);
    const step = (offset, text, label) => {
      const target = versions[index + offset];
      if (!target || !SESSION_ID.test(String(target.session_id))) {
        const dead = document.createElement("span");
        dead.className = "msg__versions-step";
        dead.setAttribute("aria-hidden", "true");
        dead.textContent = text;
        return dead;
      }
      const link = document.createElement("a");
      link.className = "msg__versions-step";
      link.href = `/sessions/${target.session_id}/#message-${Number(entry.seq)}`;
      link.setAttribute("aria-label", `${label}: version ${index + 1 + offset} of ${versions.length}`);
      link.dataset.version = String(index + 1 + offset);
      link.textContent = text;
      return link;
    };
    const count = document.createElement("span");
    count.className = "msg__versions-count";
    count.textContent = `${index + 1}/${versions.length}`;
    nav.append(step(-1, "‹", "Previous version"), count, step(1, "›", "Next version"));
    item.querySelector(".msg__foot").prepend(nav);
  }
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
  refreshLastTools();
  if (stick) scrollToEnd(true);
}

function renderHistory(messages, streams) {
  const items = [
    ...messages.map((m) => ({ at: Date.parse(m.timestamp), seq: m.seq, element: messageElement(m) })),
    ...(streams || []).map((s) => ({ at: Date.parse(s.streamed_at), seq: -1, element: switchElement(s) })),
  ];
  items.sort((a, b) => a.at - b.at || a.seq - b.seq);
  log.replaceChildren(...items.map((item) => item.element));
  refreshLastTools();
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
  refreshLastTools();
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
  refreshLastTools();
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

function startTurn(id, userText, own, question = null) {
  const asked = question || { role: "user", content: userText, status: "complete", client: state.session.client };
  const userElement = own ? null : messageElement(asked);
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
  state.turn = { id, own, text: "", n: 0, element, body, userElement, userText, reset: false };
  appendToLog(element);
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

// The question of a turn this page asked, shown as typed until its stored copy (number, time) arrives.
function settleQuestion(id, question) {
  if (!question || question.role !== "user") return;
  const shown = log.querySelector(`[data-turn="${CSS.escape(id)}"]`);
  if (shown && !log.querySelector(`[data-message-id="${CSS.escape(question.message_id)}"]`)) {
    shown.replaceWith(messageElement(question));
  }
}

function finishTurn(id, message, question = null) {
  settleQuestion(id, question);
  // `id === null`: the answer this page was loaded with, finished before the catch-up named it
  // (one answer streams per session at a time, so it is this one).
  const turn = state.turn && (state.turn.id === id || state.turn.id === null) ? state.turn : null;
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

function rememberAuthor(question) {
  if (question && typeof question.author === "string" && typeof question.author_name === "string") {
    state.people[question.author] = question.author_name;
  }
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
    } else if (Number(frame.session?.total_messages) > lastShownSeq()) {
      // Messages were stored between this page's rendering and its socket (the first answer
      // of a new version, often): fetch them.
      refetchHistory();
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
    rememberAuthor(frame.question);
    startTurn(frame.turn, frame.message, Boolean(frame.resumed), frame.question || null);
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
    finishTurn(frame.turn, frame.message, frame.question);
    updateSession(frame.session);
    clearNotice();
  },
  stopped(frame) {
    finishTurn(frame.turn, frame.stored, frame.question);
    updateSession(frame.session);
  },
  error(frame) {
    if (frame.turn && "stored" in frame) {
      // What arrived was stored (or, when `stored` is null, could not be: the text stays here).
      // The provider failed mid-answer: what arrived is stored, shown with the error.
      finishTurn(frame.turn, frame.stored, frame.question);
      updateSession(frame.session);
      showNotice(frame.message, "error");
    } else if (frame.turn) {
      // Refused before anything was stored (busy, too large, ended): give the text back.
      abandonTurn(frame.turn, true);
      showNotice(frame.message, frame.code === "session_busy" ? "warning" : "error");
    } else {
      showNotice(frame.message, "error");
      if (switchForm) switchForm.querySelector("button[type=submit]").disabled = false;
      if (state.versionPending) {
        state.versionPending = false;
        for (const button of log.querySelectorAll(".msg__edit button, [data-tool=regenerate]")) button.disabled = false;
      }
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
  version(frame) {
    // The new version this page asked for: its answer is streaming there; follow it.
    if (typeof frame.url !== "string" || !CHAT_PATH.test(frame.url)) return;
    if (frame.error && typeof frame.error.message === "string") {
      // Made, but its question was refused (a budget, a restart): say so, and link to it.
      state.versionPending = false;
      showNotice(frame.error.message, "error", { href: frame.url, label: "Open the new version" });
      return;
    }
    window.location.assign(frame.url);
  },
  revoked(frame) {
    leaveRevoked(typeof frame.message === "string" ? frame.message : REVOKED_TEXT);
  },
  pong() {},
};

function leaveRevoked(text) {
  if (state.revoked) return;
  state.revoked = true;
  clearTimeout(state.reconnectTimer);
  setConnection("closed", "No longer shared");
  if (timer) timer.dataset.timerStopped = "1"; // the owner's timer: no longer this page's to show
  if (state.turn) finishTurn(state.turn.id, null);
  if (composer) composer.hidden = true;
  root.querySelector("[data-shared-notice]")?.remove();
  showNotice(`${text} You can no longer follow it or write in it.`, "warning", { href: "/", label: "Go to your sessions" });
  refreshLastTools();
}

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
  if (state.ws || state.signedOut || state.revoked || state.session.status === "ended") return;
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
    if (event.code === CLOSE_REVOKED) {
      leaveRevoked(REVOKED_TEXT);
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
    loadVersions();
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
  for (const item of log.querySelectorAll(".msg[data-message-id]")) {
    const body = item.querySelector(".msg__body");
    sourceText.set(item, body.textContent);
    if (body.hasAttribute("data-markdown")) renderInto(body, body.textContent);
    addTools(item);
  }
  refreshLastTools();
}

function start() {
  upgradeServerRenderedHistory();
  if (config.can_chat) adoptServerRenderedTurn();
  updateSession(state.session);
  if (timer && state.session.status === "active") {
    timer.dataset.timerStart = state.session.started_at;
    startTimers(root, state.offset, "[data-timer]");
  }
  log.addEventListener("click", onToolClick);
  loadVersions();
  if (window.location.hash.startsWith("#message-")) {
    document.getElementById(window.location.hash.slice(1))?.scrollIntoView({ block: "center" });
  } else {
    scrollToEnd(true);
  }
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
  if (switchForm) {
    // The owner's: a guest neither moves the session to another client nor ends it.
    switchToggle.addEventListener("click", () => (switchForm.hidden ? openSwitch() : closeSwitch()));
    switchForm.addEventListener("submit", submitSwitch);
    switchForm.querySelector("[data-switch-cancel]").addEventListener("click", closeSwitch);
  }
  endButton?.addEventListener("click", endSession);
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
