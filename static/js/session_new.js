// The new-session form: offer only the chosen client's brands, and fill in a picked template.
const form = document.querySelector(".card-form");
const client = document.getElementById("id_client");
const brand = document.getElementById("id_brand");
const template = document.getElementById("id_template");
const templates = JSON.parse(document.getElementById("session-templates")?.textContent || "{}");

function filterBrands() {
  if (!client || !brand) return;
  const name = client.selectedOptions[0]?.text;
  for (const group of brand.querySelectorAll("optgroup")) {
    const match = group.label === name;
    group.hidden = !match;
    group.disabled = !match;
  }
  if (brand.selectedOptions[0]?.parentElement?.disabled) brand.value = "";
}

// What the consultant typed is theirs: a template fills a field only while it is empty or
// still holds what the previous template put there.
const filled = new Map();
function fill(field, value) {
  if (!field || value === undefined) return;
  const current = field.value;
  if (current === "" || current === filled.get(field)) {
    if (field.tagName === "SELECT" && value && !Array.from(field.options).some((o) => o.value === value)) return;
    if (field.tagName === "SELECT" && !value) return;
    field.value = value;
    filled.set(field, value);
  }
}

function applyTemplate() {
  const preset = templates[template?.value];
  const note = form?.querySelector("[data-template-note]");
  if (!preset) {
    if (note) note.hidden = true;
    return;
  }
  if (preset.client && client) {
    client.value = preset.client;
    filterBrands();
  }
  const model = document.getElementById("id_model");
  if (model && preset.model) {
    if (model.tagName !== "SELECT" || Array.from(model.options).some((o) => o.value === preset.model)) {
      model.value = preset.model;
    }
  }
  fill(document.getElementById("id_name"), preset.name);
  fill(document.getElementById("id_system_prompt"), preset.system_prompt);
  if (note) {
    note.hidden = !preset.first_message;
    note.querySelector("[data-first-message]").textContent = preset.first_message;
  }
}

client?.addEventListener("change", filterBrands);
template?.addEventListener("change", applyTemplate);
filterBrands();
if (template?.value) applyTemplate();
