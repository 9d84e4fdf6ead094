// live.js: the gateway's own pages, built on tailgate.js. mountLive() shows one
// stream as a live table; mountIndex() lists every stream, with a form for the
// parameters of templates. Every value reaches the page as text (textContent,
// text nodes, attributes), never as HTML. No external assets.
import { subscribe } from "./tailgate.js";

const RATE_WINDOW_MS = 10000; // events per second, averaged over this window

/**
 * Renders a live table of the stream at `path` into `element`. `options` go to
 * subscribe() (token, base, event, ...); its callbacks are called after the
 * page's own. Returns the subscription and destroy(), which stops it.
 */
export function mountLive(element, path, options = {}) {
  const doc = element.ownerDocument;
  const view = doc.defaultView;
  addStyle(doc);
  const el = (tag, attrs, ...children) => make(doc, tag, attrs, ...children);

  const status = el("span", { class: "tg-status" }, "connecting");
  const problem = el("p", { class: "tg-problem", hidden: "" });
  const lastTs = el("time");
  const rowCount = el("span");
  const rate = el("span");
  const snapshotNote = el("span");
  const head = el("tr");
  const body = el("tbody");
  element.replaceChildren(
    el(
      "section",
      { class: "tg" },
      el("header", { class: "tg-head" }, el("h1", {}, options.title ?? path), status),
      el("p", { class: "tg-stats" }, el("span", {}, "updated ", lastTs), rowCount, rate, snapshotNote),
      problem,
      el("div", { class: "tg-scroll" }, el("table", { class: "tg-table" }, el("thead", {}, head), body)),
    ),
  );

  let keyColumns = []; // learned from keyed changes: the key's columns go first
  let sortBy = null; // { column, descending }
  let flashing = new Set(); // row objects changed since the last render
  const eventTimes = [];
  const mountedAt = Date.now();
  let scheduled = false;

  const subscription = subscribe(path, {
    ...options,
    onChange(rows, info) {
      for (const c of info.changes) {
        if (c.key) keyColumns = Object.keys(c.key);
        if (info.kind === "update" && c.row && (c.key || c.diff > 0)) flashing.add(c.row);
      }
      lastTs.textContent = wallClock(info.ts);
      lastTs.setAttribute("title", `ts ${info.ts}`);
      if (info.kind === "snapshot") snapshotNote.textContent = `snapshot: ${info.reason}`;
      eventTimes.push(Date.now());
      showRate();
      if (!scheduled) {
        scheduled = true;
        (view.requestAnimationFrame ?? ((f) => view.setTimeout(f, 16)))(render);
      }
      options.onChange?.(rows, info);
    },
    onStatus(st) {
      showStatus(st);
      options.onStatus?.(st);
    },
    onEnd(reason, detail) {
      showProblem(endText(reason, detail));
      options.onEnd?.(reason, detail);
    },
  });
  const timer = view.setInterval(showRate, 1000); // so the rate decays when the stream is quiet

  function render() {
    scheduled = false;
    const rows = subscription.rows();
    const columns = columnsOf(rows, keyColumns);
    if (sortBy) {
      const { column, descending } = sortBy;
      rows.sort((a, b) => compareValues(a[column], b[column], descending));
    }
    head.replaceChildren(...columns.map((c) => headerCell(c)));
    body.replaceChildren(
      ...rows.map((row) =>
        el(
          "tr",
          flashing.has(row) ? { class: "tg-flash" } : {},
          ...columns.map((c) => cell(doc, row[c])),
        ),
      ),
    );
    flashing = new Set();
    rowCount.textContent = `${rows.length} ${rows.length === 1 ? "row" : "rows"}`;
  }

  function headerCell(column) {
    const sorted = sortBy?.column === column;
    const button = el("button", { type: "button" }, column, sorted ? (sortBy.descending ? " ▼" : " ▲") : "");
    button.addEventListener("click", () => {
      sortBy = { column, descending: sorted && !sortBy.descending };
      render();
    });
    const attrs = { "aria-sort": sorted ? (sortBy.descending ? "descending" : "ascending") : "none" };
    if (keyColumns.includes(column)) attrs.class = "tg-key";
    return el("th", attrs, button);
  }

  function showRate() {
    const now = Date.now();
    while (eventTimes.length && eventTimes[0] < now - RATE_WINDOW_MS) eventTimes.shift();
    const seconds = Math.max(1, Math.min(RATE_WINDOW_MS, now - mountedAt) / 1000);
    rate.textContent = `${(eventTimes.length / seconds).toFixed(1)} events/s`;
  }

  function showStatus(st) {
    const [tone, text] = statusText(st);
    status.setAttribute("data-tone", tone);
    status.textContent = text;
    if (st.state !== "stopped") showProblem(st.state === "connecting" ? null : st.error);
  }

  function showProblem(text) {
    problem.textContent = text ?? "";
    if (text) problem.removeAttribute("hidden");
    else problem.setAttribute("hidden", "");
  }

  return {
    subscription,
    destroy() {
      view.clearInterval(timer);
      subscription.close();
    },
  };
}

/**
 * Renders the list of streams (the `streams` array of the gateway's `GET /`)
 * into `element`. A template such as `/orders/{customer_id}`, or a stream with
 * `filters`, gets a form that opens the concrete path.
 */
export function mountIndex(element, streams) {
  const doc = element.ownerDocument;
  addStyle(doc);
  const el = (tag, attrs, ...children) => make(doc, tag, attrs, ...children);
  const items = streams.map((s) => {
    const params = s.params ?? [...s.path.matchAll(/\{([^}]+)\}/g)].map((m) => m[1]);
    const filters = s.filters ?? [];
    // The public listing beside an admin listener has only path, event and key.
    const meta = [
      s.view ? `view ${s.view}` : s.query && `query ${s.query}`,
      s.event && `event ${s.event}`,
      s.key?.length && `key ${s.key.join(", ")}`,
      s.clients != null && `${s.clients} ${s.clients === 1 ? "client" : "clients"}`,
    ].filter(Boolean);
    const [tone, text] = s.upstream === "reconnecting" ? ["warn", "upstream reconnecting"] : ["ok", "streaming"];
    const title = params.length ? el("code", {}, s.path) : el("a", { href: s.path }, el("code", {}, s.path));
    return el(
      "li",
      {},
      el("div", { class: "tg-head" }, title, s.upstream ? el("span", { class: "tg-status", "data-tone": tone }, text) : ""),
      el("div", { class: "tg-meta" }, meta.join(" · ")),
      s.error ? el("div", { class: "tg-problem" }, s.error) : "",
      params.length || filters.length ? openForm(doc, s.path, params, filters) : "",
    );
  });
  element.replaceChildren(
    el(
      "section",
      { class: "tg" },
      el("h1", {}, "tailgate streams"),
      items.length ? el("ul", { class: "tg-index" }, ...items) : el("p", {}, "No streams are configured."),
    ),
  );
}

// A form with an input per template parameter (required) and per filter
// (optional) that navigates to the concrete path.
function openForm(doc, path, params, filters) {
  const el = (tag, attrs, ...children) => make(doc, tag, attrs, ...children);
  const inputs = new Map();
  const field = (name, attrs) => {
    const input = el("input", { name, ...attrs });
    inputs.set(name, input);
    return el("label", {}, `${name} `, input);
  };
  const form = el(
    "form",
    { class: "tg-form" },
    // "." and ".." would be resolved away as path segments: refuse them.
    ...params.map((p) => field(p, { required: "", pattern: "(?!\\.\\.?$).+" })),
    ...filters.map((f) => field(f, { placeholder: "any" })),
    el("button", { type: "submit" }, "open"),
  );
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const values = new Map([...inputs].map(([name, input]) => [name, input.value]));
    doc.defaultView.location.assign(concretePath(path, values, filters));
  });
  return form;
}

/** The path of a template with its parameters filled in and its filters as a query. */
function concretePath(template, values, filters = []) {
  const path = template.replace(/\{([^}]+)\}/g, (_, name) => encodeURIComponent(values.get(name) ?? ""));
  const query = new URLSearchParams();
  for (const f of filters) if (values.get(f)) query.append(f, values.get(f));
  const search = query.toString();
  return search ? `${path}?${search}` : path;
}

/** The columns of `rows`: key columns first, then the others in order of appearance. */
function columnsOf(rows, keyColumns = []) {
  const columns = new Set(keyColumns);
  for (const row of rows) for (const c of Object.keys(row)) columns.add(c);
  return [...columns];
}

const collator = new Intl.Collator(undefined, { numeric: true });

/**
 * Orders two cell values: numbers (and numeric strings, which is how the
 * gateway sends numeric and big integer values) by value, the rest as text with
 * digit runs compared as numbers (exact for integers of any length). NULL goes
 * last whichever the direction.
 */
function compareValues(a, b, descending) {
  if (a == null || b == null) return (a == null) - (b == null);
  const x = Number(a);
  const y = Number(b);
  const numeric = typeof a !== "object" && typeof b !== "object" && a !== "" && b !== "";
  const order = numeric && !Number.isNaN(x) && !Number.isNaN(y) && x !== y ? x - y : collator.compare(cellText(a), cellText(b));
  return descending ? -order : order;
}

/** An epoch-milliseconds timestamp (a decimal string) as an ISO time; itself if it is none. */
function wallClock(ts) {
  const date = new Date(/^\d+$/.test(ts) ? Number(ts) : NaN);
  return Number.isNaN(date.getTime()) ? String(ts) : date.toISOString();
}

function cellText(value) {
  return value !== null && typeof value === "object" ? JSON.stringify(value) : String(value);
}

function cell(doc, value) {
  if (value == null) return make(doc, "td", { class: "tg-null" }, "NULL");
  const numeric = typeof value === "number" || (typeof value === "string" && /^-?\d+(\.\d+)?$/.test(value));
  return make(doc, "td", numeric ? { class: "tg-num" } : {}, cellText(value));
}

function statusText(st) {
  switch (st.state) {
    case "connecting":
      return ["", "connecting"];
    case "streaming":
      return st.upstream === "reconnecting" ? ["warn", "upstream reconnecting"] : ["ok", "streaming"];
    case "reconnecting":
      return ["warn", st.retryInMs ? `reconnecting in ${Math.ceil(st.retryInMs / 1000)} s` : "reconnecting"];
    default:
      return ["bad", "stopped"];
  }
}

function endText(reason, { error, parameter, stream } = {}) {
  const why = {
    removed: "The stream was removed from the gateway's config.",
    forbidden: "Access to this stream was denied.",
    unauthorized: "Not signed in: the gateway wants a token.",
    "not-found": "There is no such stream.",
    "bad-request": `The gateway refused ${parameter ? `the value of ${parameter}` : "the request"}.`,
    "bad-response": "The gateway's answer was not an event stream.",
  }[reason] ?? `The stream ended (${reason}).`;
  return [stream, why, error].filter(Boolean).join(" ");
}

// Builds an element. Children are nodes or strings; strings become text nodes.
function make(doc, tag, attrs = {}, ...children) {
  const node = doc.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  node.append(...children);
  return node;
}

const styled = new WeakSet();

function addStyle(doc) {
  if (styled.has(doc)) return;
  styled.add(doc);
  const style = doc.createElement("style");
  style.textContent = CSS;
  doc.head.append(style);
}

const CSS = `
.tg{font:14px/1.45 system-ui,sans-serif;color:#1d2330;margin:1.5rem}
.tg h1{font:600 1.2rem ui-monospace,SFMono-Regular,Menlo,monospace;margin:0}
.tg code{font-family:ui-monospace,SFMono-Regular,Menlo,monospace}
.tg-head{display:flex;align-items:center;flex-wrap:wrap;gap:.6rem}
.tg-status{padding:.1rem .65rem;border-radius:1rem;background:#e7e9ee;font-size:.85rem}
.tg-status[data-tone=ok]{background:#dcf5e3;color:#13622f}
.tg-status[data-tone=warn]{background:#fff1c2;color:#7a5300}
.tg-status[data-tone=bad]{background:#fde0e0;color:#8f1d1d}
.tg-stats,.tg-meta{color:#5b6475;display:flex;flex-wrap:wrap;gap:1.25rem;margin:.6rem 0}
.tg-problem{color:#8f1d1d;margin:.4rem 0}
.tg-problem[hidden]{display:none}
.tg-scroll{overflow-x:auto}
.tg-table{border-collapse:collapse;min-width:40%}
.tg-table th,.tg-table td{padding:.3rem .75rem;border-bottom:1px solid #e3e6ec;text-align:left;white-space:pre-wrap;vertical-align:top}
.tg-table th{background:#f4f5f8;position:sticky;top:0}
.tg-table th button{all:unset;cursor:pointer;font-weight:600}
.tg-table th button:focus-visible{outline:2px solid #4a7cf0}
.tg-table th.tg-key{background:#e8eefc}
.tg-table td.tg-num{text-align:right;font-variant-numeric:tabular-nums}
.tg-table td.tg-null{color:#9aa1ad;font-style:italic}
.tg-flash{animation:tg-flash 1.2s ease-out}
@keyframes tg-flash{from{background:#ffe58a}to{background:transparent}}
@media (prefers-reduced-motion:reduce){.tg-flash{animation:none;background:#fff6d6}}
.tg-index{list-style:none;padding:0}
.tg-index li{padding:.75rem 0;border-bottom:1px solid #e3e6ec}
.tg-index .tg-meta{margin:.25rem 0}
.tg-form{display:flex;flex-wrap:wrap;gap:.75rem;align-items:center}
.tg-form input{font:inherit;padding:.15rem .4rem;width:10rem}
.tg-form input:user-invalid{border-color:#d33}
.tg-nav{margin-bottom:0}
.tg-notice pre{white-space:pre-wrap;background:#fde0e0;color:#8f1d1d;padding:.6rem .8rem;border-radius:4px}
`;
