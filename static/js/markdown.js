// Markdown for untrusted text (model answers, user messages), rendered by building DOM nodes.
//
// Nothing here ever assigns HTML: every piece of source text reaches the page through
// textContent or createTextNode, links are limited to http(s) and mailto, and class names
// come from a fixed pattern. Supported: paragraphs, line breaks, headings, fenced and
// indented code, inline code, bold, italic, strikethrough, links, autolinks, lists (nested),
// block quotes, tables and rules. An unclosed fence (an answer still streaming) runs to the end.

const SAFE_HREF = /^(https?:\/\/|mailto:)[^\s<>"']+$/i;
const LANGUAGE = /^[\w+#.-]{1,24}$/;
const FENCE = /^\s{0,3}(`{3,}|~{3,})\s*([^`\s]*)[^`]*$/;
const HEADING = /^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
const RULE = /^\s{0,3}([-*_])(\s*\1){2,}\s*$/;
const QUOTE = /^\s{0,3}>\s?(.*)$/;
const LIST_ITEM = /^(\s*)([-*+]|\d{1,9}[.)])\s+(.*)$/;
const TABLE_DIVIDER = /^\s*\|?\s*:?-{1,}:?\s*(\|\s*:?-{1,}:?\s*)*\|?\s*$/;
const INDENTED_CODE = /^( {4}|\t)/;
const MAX_DEPTH = 8;

const INLINE = new RegExp(
  [
    "(`+)([\\s\\S]*?[^`])\\1(?!`)", // 1,2: code span
    "\\*\\*(?=\\S)([\\s\\S]*?\\S)\\*\\*", // 3: bold
    "__(?=\\S)([\\s\\S]*?\\S)__(?!\\w)", // 4: bold
    "~~(?=\\S)([\\s\\S]*?\\S)~~", // 5: strikethrough
    "\\*(?=[^\\s*])([\\s\\S]*?[^\\s*])\\*(?!\\*)", // 6: italic
    "(?<![\\w])_(?=[^\\s_])([\\s\\S]*?[^\\s_])_(?![\\w])", // 7: italic
    "\\[([^\\[\\]]+)\\]\\(\\s*<?([^\\s()<>]+(?:\\([^\\s()<>]*\\))?)>?(?:\\s+\"[^\"]*\")?\\s*\\)", // 8,9: link
    "(https?:\\/\\/[^\\s<>\"'`]*[^\\s<>\"'`.,;:!?)\\]])", // 10: autolink
  ].join("|"),
  "g",
);

function el(tag, className) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  return node;
}

function safeLink(href, children) {
  if (!SAFE_HREF.test(href)) return null;
  const a = el("a");
  a.href = href;
  a.rel = "noopener noreferrer nofollow";
  a.target = "_blank";
  a.append(...children);
  return a;
}

// Inline Markdown inside one block, as an array of nodes.
export function renderInline(text, depth = 0) {
  const nodes = [];
  if (depth > MAX_DEPTH) {
    nodes.push(document.createTextNode(text));
    return nodes;
  }
  let last = 0;
  const pattern = new RegExp(INLINE.source, "g");
  let match;
  while ((match = pattern.exec(text)) !== null) {
    if (match.index > last) pushText(nodes, text.slice(last, match.index));
    last = pattern.lastIndex;
    if (match[2] !== undefined) {
      const code = el("code");
      code.textContent = match[2].length > 2 && /^ .* $/.test(match[2]) ? match[2].slice(1, -1) : match[2];
      nodes.push(code);
    } else if (match[3] !== undefined || match[4] !== undefined) {
      const strong = el("strong");
      strong.append(...renderInline(match[3] ?? match[4], depth + 1));
      nodes.push(strong);
    } else if (match[5] !== undefined) {
      const del = el("del");
      del.append(...renderInline(match[5], depth + 1));
      nodes.push(del);
    } else if (match[6] !== undefined || match[7] !== undefined) {
      const em = el("em");
      em.append(...renderInline(match[6] ?? match[7], depth + 1));
      nodes.push(em);
    } else if (match[8] !== undefined) {
      const link = safeLink(match[9], renderInline(match[8], depth + 1));
      if (link) nodes.push(link);
      else pushText(nodes, match[0]);
    } else if (match[10] !== undefined) {
      const link = safeLink(match[10], [document.createTextNode(match[10])]);
      if (link) nodes.push(link);
      else pushText(nodes, match[0]);
    }
  }
  if (last < text.length) pushText(nodes, text.slice(last));
  return nodes;
}

// Text with hard line breaks kept (chat answers rely on them).
function pushText(nodes, text) {
  const lines = text.split("\n");
  lines.forEach((line, index) => {
    if (index > 0) nodes.push(el("br"));
    if (line) nodes.push(document.createTextNode(line));
  });
}

function codeBlock(code, language) {
  const wrapper = el("div", "code-block");
  const head = el("div", "code-head");
  const label = el("span", "code-lang");
  label.textContent = LANGUAGE.test(language) ? language : "text";
  const copy = el("button", "code-copy");
  copy.type = "button";
  copy.textContent = "Copy";
  copy.setAttribute("aria-label", "Copy code");
  copy.addEventListener("click", () => copyText(code, copy));
  head.append(label, copy);
  const pre = el("pre");
  const codeEl = el("code");
  if (LANGUAGE.test(language)) codeEl.className = `language-${language}`;
  codeEl.textContent = code;
  pre.append(codeEl);
  wrapper.append(head, pre);
  return wrapper;
}

async function copyText(text, button) {
  try {
    await navigator.clipboard.writeText(text);
    button.textContent = "Copied";
  } catch {
    button.textContent = "Select and copy";
  }
  setTimeout(() => {
    button.textContent = "Copy";
  }, 1500);
}

function splitRow(line) {
  let row = line.trim();
  if (row.startsWith("|")) row = row.slice(1);
  if (row.endsWith("|") && !row.endsWith("\\|")) row = row.slice(0, -1);
  return row.split(/(?<!\\)\|/).map((cell) => cell.trim().replace(/\\\|/g, "|"));
}

function table(lines, depth) {
  const header = splitRow(lines[0]);
  const aligns = splitRow(lines[1]).map((cell) => {
    if (cell.startsWith(":") && cell.endsWith(":")) return "center";
    if (cell.endsWith(":")) return "right";
    return "";
  });
  const wrapper = el("div", "table-scroll");
  const tableEl = el("table");
  const thead = el("thead");
  const headRow = el("tr");
  header.forEach((cell, index) => {
    const th = el("th");
    if (aligns[index]) th.style.textAlign = aligns[index];
    th.append(...renderInline(cell, depth + 1));
    headRow.append(th);
  });
  thead.append(headRow);
  const tbody = el("tbody");
  for (const line of lines.slice(2)) {
    const tr = el("tr");
    splitRow(line).forEach((cell, index) => {
      if (index >= header.length) return;
      const td = el("td");
      if (aligns[index]) td.style.textAlign = aligns[index];
      td.append(...renderInline(cell, depth + 1));
      tr.append(td);
    });
    tbody.append(tr);
  }
  tableEl.append(thead, tbody);
  wrapper.append(tableEl);
  return wrapper;
}

function startsBlock(line, next) {
  return (
    FENCE.test(line) ||
    HEADING.test(line) ||
    RULE.test(line) ||
    QUOTE.test(line) ||
    LIST_ITEM.test(line) ||
    (line.includes("|") && next !== undefined && TABLE_DIVIDER.test(next) && next.includes("-"))
  );
}

function list(lines, start, depth) {
  const first = lines[start].match(LIST_ITEM);
  const indent = first[1].length;
  const ordered = /\d/.test(first[2]);
  const listEl = el(ordered ? "ol" : "ul");
  if (ordered) {
    const number = Number.parseInt(first[2], 10);
    if (number !== 1) listEl.start = number;
  }
  let i = start;
  while (i < lines.length) {
    const match = lines[i].match(LIST_ITEM);
    if (!match || match[1].length !== indent || /\d/.test(match[2]) !== ordered) break;
    const itemLines = [match[3]];
    i += 1;
    while (i < lines.length) {
      const line = lines[i];
      const nested = line.match(LIST_ITEM);
      if (nested && nested[1].length <= indent) break;
      if (!line.trim()) {
        const next = lines[i + 1];
        if (next === undefined || !/^\s+/.test(next) || (next.match(LIST_ITEM)?.[1].length ?? 99) <= indent) break;
        itemLines.push("");
      } else if (!nested && !/^\s/.test(line) && startsBlock(line, lines[i + 1])) {
        break;
      } else {
        itemLines.push(line.slice(Math.min(indent + 2, line.length - line.trimStart().length)));
      }
      i += 1;
    }
    const li = el("li");
    if (itemLines.length === 1) li.append(...renderInline(itemLines[0], depth + 1));
    else li.append(renderBlocks(itemLines, depth + 1, true));
    listEl.append(li);
  }
  return [listEl, i];
}

function renderBlocks(lines, depth, tight = false) {
  const fragment = document.createDocumentFragment();
  if (depth > MAX_DEPTH) {
    const p = el("p");
    p.append(...renderInline(lines.join("\n"), depth));
    fragment.append(p);
    return fragment;
  }
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    if (!line.trim()) {
      i += 1;
      continue;
    }
    const fence = line.match(FENCE);
    if (fence) {
      const marker = fence[1];
      const body = [];
      i += 1;
      while (i < lines.length && !(lines[i].trim().startsWith(marker) && lines[i].trim().replace(/[`~]/g, "") === "")) {
        body.push(lines[i]);
        i += 1;
      }
      i += 1; // the closing fence, if any
      fragment.append(codeBlock(body.join("\n"), fence[2]));
      continue;
    }
    const heading = line.match(HEADING);
    if (heading) {
      // Headings inside a chat answer stay below the page's own headings.
      const level = Math.min(heading[1].length + 2, 6);
      const h = el(`h${level}`, "md-heading");
      h.append(...renderInline(heading[2], depth + 1));
      fragment.append(h);
      i += 1;
      continue;
    }
    if (RULE.test(line)) {
      fragment.append(el("hr"));
      i += 1;
      continue;
    }
    if (QUOTE.test(line)) {
      const body = [];
      while (i < lines.length && QUOTE.test(lines[i])) {
        body.push(lines[i].match(QUOTE)[1]);
        i += 1;
      }
      const quote = el("blockquote");
      quote.append(renderBlocks(body, depth + 1));
      fragment.append(quote);
      continue;
    }
    if (LIST_ITEM.test(line)) {
      const [listEl, next] = list(lines, i, depth);
      fragment.append(listEl);
      i = next;
      continue;
    }
    if (line.includes("|") && TABLE_DIVIDER.test(lines[i + 1] ?? "") && (lines[i + 1] ?? "").includes("-")) {
      const rows = [line, lines[i + 1]];
      i += 2;
      while (i < lines.length && lines[i].includes("|") && lines[i].trim()) {
        rows.push(lines[i]);
        i += 1;
      }
      fragment.append(table(rows, depth));
      continue;
    }
    if (!tight && INDENTED_CODE.test(line)) {
      const body = [];
      while (i < lines.length && (INDENTED_CODE.test(lines[i]) || !lines[i].trim())) {
        body.push(lines[i].replace(INDENTED_CODE, ""));
        i += 1;
      }
      while (body.length && !body[body.length - 1].trim()) body.pop();
      fragment.append(codeBlock(body.join("\n"), ""));
      continue;
    }
    const paragraph = [line];
    i += 1;
    while (i < lines.length && lines[i].trim() && !startsBlock(lines[i], lines[i + 1])) {
      paragraph.push(lines[i]);
      i += 1;
    }
    const p = el("p");
    p.append(...renderInline(paragraph.join("\n").trim(), depth));
    fragment.append(p);
  }
  return fragment;
}

// Render Markdown source into a DocumentFragment. Safe for any input string.
export function renderMarkdown(source) {
  const text = String(source ?? "").replace(/\r\n?/g, "\n");
  return renderBlocks(text.split("\n"), 0);
}

// Replace an element's content with the rendered Markdown of `source`.
export function renderInto(element, source) {
  element.replaceChildren(renderMarkdown(source));
}
