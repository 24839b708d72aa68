// The chat page's billing panel: the client's budget (refreshed after every answer, a switch
// or a refusal) and, in the switch panel, what the picked client bills: its increment and how
// this session's time for it rounds. Data arrive by json_script and a same-origin JSON GET;
// text only ever reaches the page through textContent.

const configElement = document.getElementById("billing-config");
const bar = document.querySelector("[data-budget]");
const switchHint = document.querySelector("[data-switch-billing]");
const clientSelect = document.getElementById("switch-client");
const URL_PATTERN = /^\/sessions\/[0-9a-f-]{36}\/billing\.json$/;
const REFRESH_ON = new Set(["message.done", "stopped", "switched"]);

let billing = configElement ? JSON.parse(configElement.textContent) : null;
let loadedAt = Date.now();

function clock(seconds) {
  const s = Math.max(0, Math.floor(seconds));
  return `${Math.floor(s / 3600)}:${String(Math.floor((s % 3600) / 60)).padStart(2, "0")}:${String(s % 60).padStart(2, "0")}`;
}

function roundedMinutes(seconds, increment) {
  if (seconds <= 0) return 0;
  return Math.ceil(seconds / (increment * 60)) * increment;
}

function renderBudget() {
  if (!bar || !billing) return;
  const budget = billing.budget;
  bar.hidden = !budget;
  if (!budget) return;
  bar.className = `budget-bar budget-bar--${budget.level}`;
  bar.replaceChildren();
  const label = document.createElement("span");
  label.className = "budget-bar__label";
  label.textContent = `${budget.client}'s paid-model budget for this month:`;
  const meter = document.createElement("meter");
  meter.className = "budget-bar__meter";
  Object.assign(meter, { min: 0, max: 100, low: 80, high: 99, optimum: 0, value: budget.percent });
  meter.setAttribute("aria-hidden", "true");
  const figures = document.createElement("span");
  figures.className = "budget-bar__figures";
  figures.dataset.budgetText = "";
  let text = `${budget.used} of ${budget.limit} (${budget.percent}%)`;
  if (budget.hours_limit) text += ` · ${budget.hours_used} of ${budget.hours_limit} h`;
  figures.textContent = text;
  bar.append(label, " ", meter, " ", figures);
  if (budget.level !== "ok") {
    const message = document.createElement("span");
    message.className = "budget-bar__message";
    message.dataset.budgetMessage = "";
    message.textContent = budget.message;
    bar.append(" ", message);
  }
}

function renderSwitchHint() {
  if (!switchHint || !clientSelect || !billing) return;
  const current = billing.clients[billing.client];
  const target = billing.clients[clientSelect.value];
  if (!current || !target) {
    switchHint.textContent = "";
    return;
  }
  const elapsed = (Date.now() - loadedAt) / 1000;
  const soFar = current.seconds + elapsed;
  const parts = [
    `${current.name} bills in ${current.increment}-minute increments: this session's ${clock(soFar)} for it so far rounds up to ${roundedMinutes(soFar, current.increment)} min.`,
  ];
  if (clientSelect.value !== billing.client) {
    const already = target.seconds ? ` (this session already has ${clock(target.seconds)} for it)` : "";
    parts.push(`${target.name} bills in ${target.increment}-minute increments, in ${target.currency}${already}; time from the switch on is billed to it.`);
  }
  switchHint.textContent = parts.join(" ");
}

async function refresh() {
  if (!billing || typeof billing.url !== "string" || !URL_PATTERN.test(billing.url)) return;
  try {
    const response = await fetch(billing.url, { headers: { Accept: "application/json" }, credentials: "same-origin" });
    if (!response.ok) return;
    billing = await response.json();
    loadedAt = Date.now();
    renderBudget();
    renderSwitchHint();
  } catch {
    // The panel keeps its last figures; the next answer refreshes it again.
  }
}

document.addEventListener("chat:frame", (event) => {
  const frame = event.detail || {};
  if (REFRESH_ON.has(frame.type) || (frame.type === "error" && frame.code === "budget_exceeded")) refresh();
});
clientSelect?.addEventListener("change", renderSwitchHint);
document.querySelector("[data-switch-open]")?.addEventListener("click", renderSwitchHint);
renderSwitchHint();
