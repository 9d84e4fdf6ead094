// tailgate.js: the browser client for tailgate's Server-Sent Events streams.
//
// One dependency-free ES module. `subscribe()` opens a stream (or, given several
// paths, one multiplexed connection), keeps the stream's rows as the gateway's
// snapshots and updates describe them, and reconnects where EventSource gives up:
// with backoff after 503 and network errors, and with a fresh token after 401 or
// `end(token-expired)`, resuming from the last event id. It renders nothing.
// The API is documented in README.md beside this file and typed in tailgate.d.ts.

const MUX_PATH = "/_tailgate/mux";

/**
 * Subscribe to one stream (a path such as "/sensors") or, given an array of
 * paths, to all of them over one multiplexed connection.
 */
export function subscribe(paths, options = {}) {
  return new Subscription(paths, options);
}

/**
 * An incremental parser for `text/event-stream`, as the WHATWG HTML standard
 * specifies it (§9.2.6): lines end in CR, LF or CRLF, split anywhere across
 * chunks; one leading BOM is dropped; comments are ignored; `retry` takes only
 * digits; an `id` containing NUL is ignored. Feed it decoded text with `push()`.
 * Unlike EventSource it tells whether an event had an `id` line of its own
 * (`event.id`) apart from the last event id carried over from earlier events.
 */
export class EventStreamParser {
  /** The last event id seen, kept across events as EventSource keeps it. */
  lastEventId = "";
  #onEvent;
  #onRetry;
  #onComment;
  #line = ""; // the unfinished line at the end of the previous chunk
  #data = []; // the data lines of the event being read
  #type = "";
  #hasId = false; // the event being read has an id line of its own
  #atStart = true; // nothing read yet: a BOM may still come
  #afterCR = false; // the previous chunk ended in CR, so a leading LF ends no line

  constructor({ onEvent, onRetry = () => {}, onComment = () => {} }) {
    this.#onEvent = onEvent;
    this.#onRetry = onRetry;
    this.#onComment = onComment;
  }

  push(chunk) {
    if (chunk === "") return;
    let i = 0;
    if (this.#atStart) {
      this.#atStart = false;
      if (chunk[0] === "\uFEFF") i = 1;
    }
    if (this.#afterCR) {
      this.#afterCR = false;
      if (chunk[i] === "\n") i++;
    }
    const eol = /[\r\n]/g;
    eol.lastIndex = i;
    for (let m; (m = eol.exec(chunk)); eol.lastIndex = i) {
      const line = this.#line + chunk.slice(i, m.index);
      this.#line = "";
      i = m.index + 1;
      if (m[0] === "\r") {
        if (i === chunk.length) this.#afterCR = true;
        else if (chunk[i] === "\n") i++;
      }
      this.#field(line);
    }
    this.#line += chunk.slice(i);
  }

  #field(line) {
    if (line === "") return this.#dispatch();
    const colon = line.indexOf(":");
    if (colon === 0) return this.#onComment(line.slice(1));
    const name = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value[0] === " ") value = value.slice(1);
    switch (name) {
      case "event":
        this.#type = value;
        break;
      case "data":
        this.#data.push(value);
        break;
      case "id":
        if (!value.includes("\0")) {
          this.lastEventId = value;
          this.#hasId = true;
        }
        break;
      case "retry":
        if (/^[0-9]+$/.test(value)) this.#onRetry(Number(value));
        break;
    }
  }

  #dispatch() {
    const event = {
      type: this.#type || "message",
      data: this.#data.join("\n"),
      id: this.#hasId ? this.lastEventId : undefined,
      lastEventId: this.lastEventId,
    };
    const hasData = this.#data.length > 0;
    this.#data = [];
    this.#type = "";
    this.#hasId = false;
    if (hasData) this.#onEvent(event);
  }
}

// JSON with object keys sorted at every level: the identity of a row (diff
// streams) or of a key (keyed streams), whatever order the columns came in.
function canonicalJSON(value) {
  if (Array.isArray(value)) return `[${value.map(canonicalJSON).join(",")}]`;
  if (value !== null && typeof value === "object") {
    const fields = Object.keys(value)
      .sort()
      .map((k) => `${JSON.stringify(k)}:${canonicalJSON(value[k])}`);
    return `{${fields.join(",")}}`;
  }
  return JSON.stringify(value);
}

// The rows of one stream. Diff streams are a multiset: each distinct row with
// its count. Keyed streams are a map from key to row (count 1), in the order the
// keys first arrived; replacing a key's row keeps its place.
class Rows {
  #entries = new Map(); // canonical JSON of the row (diff) or key (keyed) -> { row, count }

  replace(changes) {
    this.#entries.clear();
    this.apply(changes);
  }

  apply(changes) {
    for (const c of changes) {
      if ("key" in c) {
        const id = canonicalJSON(c.key);
        if (c.row === null) this.#entries.delete(id);
        else this.#entries.set(id, { row: c.row, count: 1 });
        continue;
      }
      const id = canonicalJSON(c.row);
      const entry = this.#entries.get(id);
      const count = (entry?.count ?? 0) + c.diff;
      // A count can only go below zero if the gateway's changes were out of
      // order; keeping it (rather than clamping) lets a later insert cancel it.
      if (count === 0) this.#entries.delete(id);
      else if (entry) entry.count = count;
      else this.#entries.set(id, { row: c.row, count });
    }
  }

  list() {
    const rows = [];
    for (const { row, count } of this.#entries.values()) {
      for (let i = 0; i < count; i++) rows.push(row);
    }
    return rows;
  }
}

const isObject = (v) => v !== null && typeof v === "object" && !Array.isArray(v);

// Checks an event's changes before any is applied, so applying cannot fail halfway.
function checkChanges(changes) {
  if (!Array.isArray(changes)) throw new Error("an event without a changes array");
  for (const c of changes) {
    const ok =
      isObject(c) &&
      ("key" in c
        ? isObject(c.key) && (c.row === null || isObject(c.row))
        : Number.isSafeInteger(c.diff) && isObject(c.row));
    if (!ok) throw new Error(`a malformed change: ${JSON.stringify(c).slice(0, 200)}`);
  }
}

function errorText(e) {
  return e instanceof Error ? e.message : String(e);
}

// Retry-After is either seconds or an HTTP date.
function retryAfterMs(header) {
  if (!header) return 0;
  if (/^\d+$/.test(header.trim())) return Number(header) * 1000;
  const at = Date.parse(header);
  return Number.isFinite(at) ? Math.max(0, at - Date.now()) : 0;
}

// A thrown callback must not break the stream: report it the way an event
// handler's exception is reported, and carry on.
function call(fn, ...args) {
  if (!fn) return;
  try {
    fn(...args);
  } catch (e) {
    if (typeof globalThis.reportError === "function") globalThis.reportError(e);
    else setTimeout(() => { throw e; });
  }
}

class Subscription {
  #mux;
  #paths; // the constituents still subscribed (mux: the s= parameters)
  #state = new Map(); // path -> Rows, for every path ever subscribed
  #base;
  #o; // options
  #fetch;
  #timers;
  #transport;
  #closed = false;
  #abort = null; // cancels whatever the connection loop is waiting on
  #lastEventId = null;
  #status = { state: "connecting", upstream: null, error: null };
  #pending = []; // data events of a mux group whose id has not arrived yet
  #retryMs = null; // the gateway's `retry:` value
  #failures = 0; // connection attempts since the last healthy one, for backoff
  #tokenRefused = false; // a 401 or token expiry since the last healthy connection

  constructor(paths, options) {
    this.#mux = Array.isArray(paths);
    this.#paths = this.#mux ? [...paths] : [paths];
    if (this.#paths.length === 0 || !this.#paths.every((p) => typeof p === "string")) {
      throw new TypeError("subscribe() takes a path or a non-empty array of paths");
    }
    for (const p of this.#paths) this.#state.set(p, new Rows());
    this.#o = options;
    this.#base = String(options.base ?? globalThis.location?.href ?? "");
    this.#url(); // throws now, not later, on a path that is no URL
    this.#fetch = options.fetch ?? ((...args) => globalThis.fetch(...args));
    this.#timers = options.timers ?? globalThis;
    this.#transport =
      options.transport ??
      (typeof (options.fetch ?? globalThis.fetch) === "function" &&
      typeof globalThis.ReadableStream === "function"
        ? "fetch"
        : "eventsource");
    // Start after subscribe() returns, so callbacks can use its result.
    Promise.resolve().then(() => this.#run());
  }

  /** The current rows of a stream (for a mux, of the given path). A new array each call. */
  rows(path) {
    const rows = this.#state.get(this.#mux ? path : this.#paths[0]);
    if (!rows) throw new TypeError(`not a subscribed stream: ${path}`);
    return rows.list();
  }

  /** The id of the last event applied: where a reconnect resumes. */
  get lastEventId() {
    return this.#lastEventId;
  }

  /** The last status reported to onStatus. */
  get status() {
    return this.#status;
  }

  /** Stops for good: closes the connection and cancels any pending reconnect. */
  close() {
    if (this.#closed) return;
    this.#closed = true;
    this.#abort?.();
    this.#report({ state: "stopped" });
  }

  #url() {
    if (!this.#mux) return new URL(this.#paths[0], this.#base);
    const url = new URL(MUX_PATH, this.#base);
    for (const p of this.#paths) url.searchParams.append("s", p);
    return url;
  }

  #report(status) {
    this.#status = { upstream: null, error: null, ...status };
    call(this.#o.onStatus, this.#status);
  }

  async #run() {
    let refreshToken = true; // ask for a token before the first request
    let token;
    while (!this.#closed) {
      let next;
      try {
        this.#report({ state: "connecting" });
        // EventSource hides the answer's status, so a 401 cannot be told apart:
        // that transport asks for a token before every request.
        if (this.#o.token && (refreshToken || this.#transport === "eventsource")) {
          token = await this.#o.token();
          refreshToken = false;
        }
        if (this.#closed) return;
        next =
          this.#transport === "fetch"
            ? await this.#connectFetch(token)
            : await this.#connectEventSource(token);
      } catch (e) {
        next = { wait: "backoff", error: errorText(e) };
      }
      if (this.#closed) return;
      if (next.stop) return this.#stop(next.stop, next.detail);
      if (next.refreshToken) refreshToken = true;
      const ms = next.wait === "backoff" ? this.#backoff(next.retryAfterMs) : 0;
      this.#report({ state: "reconnecting", error: next.error, httpStatus: next.httpStatus, retryInMs: ms });
      if (ms > 0) await this.#sleep(ms);
    }
  }

  // Capped exponential backoff with "equal jitter" (a random wait between half
  // and all of the step), based on the gateway's `retry:` when it sent one.
  #backoff(retryAfter = 0) {
    const { initialMs = 500, maxMs = 30000 } = this.#o.backoff ?? {};
    const base = this.#retryMs ?? initialMs;
    const step = Math.min(Math.max(maxMs, base), base * 2 ** this.#failures++);
    return Math.max(retryAfter, Math.round(step / 2 + (Math.random() * step) / 2));
  }

  #sleep(ms) {
    return new Promise((resolve) => {
      const timer = this.#timers.setTimeout(resolve, ms);
      this.#abort = () => {
        this.#timers.clearTimeout(timer);
        resolve();
      };
    });
  }

  #stop(reason, detail = {}) {
    this.#closed = true;
    this.#report({ state: "stopped", reason, error: detail.error ?? null, httpStatus: detail.httpStatus });
    call(this.#o.onEnd, reason, detail);
  }

  #opened() {
    this.#report({ state: "streaming", upstream: "streaming" });
  }

  // The connection loop's unit: one request and its response, resolving to
  // what to do next: { stop, detail } or { wait: "none" | "backoff", error, ... }.
  async #connectFetch(token) {
    this.#pending = []; // a group cut short by the last connection is replayed whole
    const controller = new AbortController();
    this.#abort = () => controller.abort();
    // A connection that goes silent (no event, no keepalive) is presumed dead.
    const idleMs = this.#o.idleTimeoutMs ?? 45000;
    let idle, silent = false;
    const arm = () => {
      if (!idleMs) return;
      this.#timers.clearTimeout(idle);
      idle = this.#timers.setTimeout(() => { silent = true; controller.abort(); }, idleMs);
    };
    const headers = { accept: "text/event-stream" };
    if (this.#lastEventId) headers["last-event-id"] = this.#lastEventId;
    if (token) headers.authorization = `Bearer ${token}`;
    try {
      arm();
      const res = await this.#fetch(this.#url().href, {
        headers,
        signal: controller.signal,
        cache: "no-store",
        credentials: this.#o.credentials ?? "same-origin",
      });
      const type = res.headers.get("content-type") ?? "";
      if (res.status !== 200 || !/^text\/event-stream\b/i.test(type)) return await this.#refused(res);
      this.#opened();
      let next;
      const parser = new EventStreamParser({
        onEvent: (e) => { next ??= this.#onEvent(e.type, e.data, e.id); },
        onRetry: (ms) => { this.#retryMs = ms; },
        onComment: () => this.#healthy(), // a keepalive
      });
      const reader = res.body.getReader();
      const decoder = new TextDecoder("utf-8", { ignoreBOM: true }); // the parser drops the BOM
      while (!next) {
        arm();
        const { value, done } = await reader.read();
        if (done) return { wait: "backoff", error: "the connection closed" };
        parser.push(decoder.decode(value, { stream: true }));
      }
      return next;
    } catch (e) {
      if (silent) return { wait: "backoff", error: `no data for ${idleMs} ms` };
      throw e;
    } finally {
      this.#timers.clearTimeout(idle);
      controller.abort(); // let go of the response if it is still open
    }
  }

  async #refused(res) {
    const httpStatus = res.status;
    const detail = { httpStatus };
    if (httpStatus === 200) return { stop: "bad-response", detail }; // not an event stream
    // Error bodies are short JSON such as {"error":..,"parameter":..}.
    try {
      const body = JSON.parse(await res.text());
      for (const k of ["error", "parameter"]) if (typeof body?.[k] === "string") detail[k] = body[k];
    } catch {
      // not JSON: the status says enough
    }
    const error = detail.error ?? `HTTP ${httpStatus}`;
    if (httpStatus === 401) {
      if (!this.#o.token) return { stop: "unauthorized", detail };
      return { ...this.#newToken(), error, httpStatus };
    }
    if (httpStatus === 404) return { stop: "not-found", detail };
    if (httpStatus === 403) return { stop: "forbidden", detail };
    if (httpStatus === 400) return { stop: "bad-request", detail };
    if (httpStatus === 408 || httpStatus === 429 || httpStatus >= 500) {
      const after = retryAfterMs(res.headers.get("retry-after"));
      return { wait: "backoff", error, httpStatus, retryAfterMs: after };
    }
    return { stop: "bad-response", detail };
  }

  // The fallback where fetch cannot stream. EventSource cannot send headers, so
  // the last event id and the token go into the query string.
  #connectEventSource(token) {
    this.#pending = [];
    const url = this.#url();
    if (this.#lastEventId) url.searchParams.set("last_event_id", this.#lastEventId);
    if (token && this.#o.tokenQueryParam) url.searchParams.set(this.#o.tokenQueryParam, token);
    return new Promise((resolve) => {
      const es = new globalThis.EventSource(url.href, {
        withCredentials: this.#o.credentials === "include",
      });
      const finish = (next) => {
        es.close();
        resolve(next);
      };
      this.#abort = () => finish(undefined);
      let last = this.#lastEventId ?? "";
      const listener = (e) => {
        // EventSource hides whether an event had an id line of its own. In a
        // mux only a group's last event has one, and group ids only grow, so a
        // changed lastEventId marks it.
        const id = e.lastEventId !== last ? e.lastEventId : undefined;
        last = e.lastEventId;
        try {
          const next = this.#onEvent(e.type, e.data, id);
          if (next) finish(next);
        } catch (err) {
          finish({ wait: "backoff", error: errorText(err) });
        }
      };
      // EventSource only delivers event names it is asked for.
      const names = ["snapshot", "status", "end", "update", "message", this.#o.event ?? []].flat();
      for (const name of new Set(names)) es.addEventListener(name, listener);
      es.onopen = () => this.#opened();
      es.onerror = () => finish({ wait: "backoff", error: "the EventSource connection failed" });
    });
  }

  // Handles one event; returns what to do next when the connection must end.
  #onEvent(type, text, id) {
    if (this.#closed) return; // close() was called from a callback
    const msg = JSON.parse(text);
    if (type === "status") {
      const status = { state: "streaming", upstream: msg.upstream ?? null, error: msg.error ?? null };
      if (this.#mux) status.stream = msg.stream;
      this.#report(status);
      return;
    }
    if (type === "end") return this.#onEnd(msg);
    const stream = this.#mux ? msg.stream : this.#paths[0];
    if (!this.#state.has(stream)) throw new Error(`an event for a stream not subscribed: ${JSON.stringify(stream)}`);
    checkChanges(msg.changes);
    const kind = type === "snapshot" ? "snapshot" : "update";
    const info = { stream, kind, event: type, ts: msg.ts, changes: msg.changes };
    if (kind === "snapshot") info.reason = msg.reason;
    this.#pending.push(info);
    // Every event of a single stream has an id. In a mux, only the last event of
    // a group has one, and only then is the state across streams consistent.
    if (id !== undefined || !this.#mux) this.#commit(id ?? this.#lastEventId);
  }

  #commit(id) {
    const events = this.#pending;
    this.#pending = [];
    for (const e of events) {
      const rows = this.#state.get(e.stream);
      if (e.kind === "snapshot") rows.replace(e.changes);
      else rows.apply(e.changes);
    }
    this.#lastEventId = id;
    this.#healthy();
    if (!this.#o.onChange) return;
    if (!this.#mux) return call(this.#o.onChange, this.rows(), { ...events[0], id });
    const rows = new Map([...this.#state.keys()].map((p) => [p, this.rows(p)]));
    const streams = [...new Set(events.map((e) => e.stream))];
    call(this.#o.onChange, rows, { id, ts: events.at(-1).ts, streams, events });
  }

  // After a 401 or a token expiry: reconnect at once with a fresh token, unless
  // the last fresh token fared no better (a clock skew, a stale token cache):
  // then back off, so a refused token never turns into a hot loop.
  #newToken() {
    const wait = this.#tokenRefused ? "backoff" : "none";
    this.#tokenRefused = true;
    return { wait, refreshToken: true };
  }

  // A connection that delivered an event or a keepalive worked: start counting afresh.
  #healthy() {
    this.#failures = 0;
    this.#tokenRefused = false;
  }

  #onEnd({ reason, stream }) {
    // In a mux, a constituent removed from the config or no longer allowed ends
    // alone; the others carry on (and a reconnect asks for them only).
    if (this.#mux && stream !== undefined && (reason === "removed" || reason === "forbidden")) {
      this.#paths = this.#paths.filter((p) => p !== stream);
      if (this.#paths.length === 0) return { stop: reason, detail: { stream } };
      call(this.#o.onEnd, reason, { stream });
      return;
    }
    if (reason === "removed" || reason === "forbidden") return { stop: reason, detail: {} };
    if (reason === "token-expired") return { ...this.#newToken(), error: "the token expired" };
    // shutdown, overloaded, or a reason this client does not know
    return { wait: "backoff", error: `the gateway ended the stream (${reason})` };
  }
}
