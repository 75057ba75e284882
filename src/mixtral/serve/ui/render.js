// Model output -> DOM, safely. Everything the model writes becomes text nodes (document.createTextNode /
// textContent); no string is ever parsed as HTML (no innerHTML, no insertAdjacentHTML), so nothing the model
// writes can create an element, an attribute or a script. The markdown mode builds a small set of elements
// itself (p, h3-h6, ul/ol/li, pre/code, strong, em, blockquote, a) and fills them with text nodes; links are
// kept only for http(s) and mailto URLs, images are shown as their text (nothing is fetched).

const SAFE_URL = /^(https?:\/\/|mailto:)/i;

/** Plain text: the content element shows the text verbatim (CSS keeps newlines). */
export function renderText(el, text) {
  el.classList.remove("markdown");
  el.textContent = text;
}

/** Sanitised markdown: elements built here, every piece of model text inserted as a text node. */
export function renderMarkdown(el, text) {
  el.classList.add("markdown");
  el.replaceChildren(...markdownBlocks(text));
}

export function renderContent(el, text, markdown) {
  if (markdown) renderMarkdown(el, text);
  else renderText(el, text);
}

function make(tag, children) {
  const node = document.createElement(tag);
  for (const child of children) node.append(child);
  return node;
}

/** Block structure: fenced code, headings, lists, quotes, paragraphs. */
export function markdownBlocks(text) {
  const lines = text.replace(/\r\n?/g, "\n").split("\n");
  const blocks = [];
  let para = [];
  const flush = () => {
    if (para.length) blocks.push(make("p", inlineJoin(para)));
    para = [];
  };
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i];
    const fence = line.match(/^\s*(```|~~~)/);
    if (fence) {
      flush();
      const body = [];
      i++;
      while (i < lines.length && !lines[i].trim().startsWith(fence[1])) body.push(lines[i++]);
      const code = document.createElement("code");
      code.textContent = body.join("\n");
      blocks.push(make("pre", [code]));
      continue;
    }
    const heading = line.match(/^(#{1,6})\s+(.*)$/);
    if (heading) {
      flush();
      blocks.push(make(`h${Math.min(6, heading[1].length + 2)}`, inline(heading[2])));
      continue;
    }
    const item = line.match(/^\s*([-*+]|\d+[.)])\s+(.*)$/);
    if (item) {
      flush();
      const ordered = /\d/.test(item[1]);
      const list = document.createElement(ordered ? "ol" : "ul");
      let j = i;
      while (j < lines.length) {
        const m = lines[j].match(/^\s*([-*+]|\d+[.)])\s+(.*)$/);
        if (!m || /\d/.test(m[1]) !== ordered) break;
        list.append(make("li", inline(m[2])));
        j++;
      }
      blocks.push(list);
      i = j - 1;
      continue;
    }
    const quote = line.match(/^\s*>\s?(.*)$/);
    if (quote) {
      flush();
      blocks.push(make("blockquote", inline(quote[1])));
      continue;
    }
    if (!line.trim()) flush();
    else para.push(line);
  }
  flush();
  return blocks;
}

function inlineJoin(lines) {
  const out = [];
  lines.forEach((line, k) => {
    if (k) out.push(document.createElement("br"));
    out.push(...inline(line));
  });
  return out;
}

// `code`, **strong**, *em* / _em_, [text](url), ![alt](src) (kept as text). Underscores mark emphasis only at
// word boundaries (snake_case and __dunder__ names stay text, as in CommonMark).
const INLINE = /(`+)([\s\S]*?)\1|\*\*([^*]+)\*\*|(?<![\w])__([^_]+)__(?![\w])|\*([^*\s][^*]*)\*|(?<![\w])_([^_\s][^_]*)_(?![\w])|(!?)\[([^\]]*)\]\(([^)\s]*)\)/g;

/** Inline markup of one line -> nodes (text nodes and the few elements above). */
export function inline(text) {
  const out = [];
  let last = 0;
  for (const m of text.matchAll(INLINE)) {
    if (m.index > last) out.push(document.createTextNode(text.slice(last, m.index)));
    last = m.index + m[0].length;
    if (m[1]) {
      const code = document.createElement("code");
      code.textContent = m[2];
      out.push(code);
    } else if (m[3] !== undefined || m[4] !== undefined) {
      out.push(make("strong", [document.createTextNode(m[3] ?? m[4])]));
    } else if (m[5] !== undefined || m[6] !== undefined) {
      out.push(make("em", [document.createTextNode(m[5] ?? m[6])]));
    } else if (m[7] === "" && SAFE_URL.test(m[9])) {
      const a = document.createElement("a");
      a.href = m[9];
      a.target = "_blank";
      a.rel = "noopener noreferrer nofollow";
      a.textContent = m[8] || m[9];
      out.push(a);
    } else {
      out.push(document.createTextNode(m[0])); // an image or an unsafe link: shown as the text it is
    }
  }
  if (last < text.length) out.push(document.createTextNode(text.slice(last)));
  return out;
}
