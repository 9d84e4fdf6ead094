// Test helpers: a mock tailgate on 127.0.0.1, event frames, and a log that
// tests wait on (under a timeout) instead of sleeping.
import http from "node:http";
import { subscribe } from "../tailgate.js";

/** Entries pushed by callbacks; `until()` waits for a condition on them. */
export class Log {
  entries = [];
  #waiters = new Set();

  push(entry) {
    this.entries.push(entry);
    for (const w of this.#waiters) w.check();
  }

  /** Resolves with the first truthy `pred(entries)`; rejects after `ms`. */
  until(pred, what, ms = 3000) {
    return new Promise((resolve, reject) => {
      const w = {
        check: () => {
          const found = pred(this.entries);
          if (!found) return;
          this.#waiters.delete(w);
          clearTimeout(w.timer);
          resolve(found);
        },
      };
      w.timer = setTimeout(() => {
        this.#waiters.delete(w);
        const tail = JSON.stringify(this.entries.slice(-12), null, 1);
        reject(new Error(`timed out waiting for ${what}; last entries: ${tail}`));
      }, ms);
      this.#waiters.add(w);
      w.check();
    });
  }

  of(kind) {
    return this.entries.filter((e) => kind in e).map((e) => e[kind]);
  }
}

/**
 * A mock gateway. `script[i]` answers the i-th request (0-based) as
 * `(req, res) => ...`; a request past the script gets a 200 stream that stays
 * open. Every request is logged as `{ request: { url, headers } }`, and its end
 * as `{ closed: i }`.
 */
export async function startServer(script) {
  const log = new Log();
  let n = 0;
  const server = http.createServer((req, res) => {
    const i = n++;
    log.push({ request: { url: req.url, headers: req.headers } });
    res.on("close", () => log.push({ closed: i }));
    const answer = script[i] ?? ((_, r) => open(r));
    answer(req, res);
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  return {
    url: `http://127.0.0.1:${server.address().port}`,
    log,
    requests: () => log.of("request"),
    subscriptions: new Set(), // closed with the server, even when a test fails
    close() {
      for (const s of this.subscriptions) s.close();
      server.closeAllConnections();
      return new Promise((resolve) => server.close(resolve));
    },
  };
}

/** Runs `body(server)` against a mock gateway, closing both afterwards. */
export async function withServer(script, body) {
  const server = await startServer(script);
  try {
    await body(server);
  } finally {
    await server.close();
  }
}

/** Starts a 200 event stream and writes `frames` to it. */
export function open(res, ...frames) {
  res.writeHead(200, { "content-type": "text/event-stream", "cache-control": "no-cache" });
  for (const f of frames) res.write(f);
  if (frames.length === 0) res.flushHeaders();
}

/** An error answer with a JSON body. */
export function refuse(res, status, body = { error: `status ${status}` }, headers = {}) {
  res.writeHead(status, { "content-type": "application/json", ...headers });
  res.end(JSON.stringify(body));
}

export function frame({ event, id, data }) {
  let text = event ? `event: ${event}\n` : "";
  if (id !== undefined) text += `id: ${id}\n`;
  return `${text}data: ${JSON.stringify(data)}\n\n`;
}

export const snapshot = (ts, changes, reason = "initial", extra = {}) =>
  frame({ event: "snapshot", id: extra.noId ? undefined : ts, data: { ...pick(extra), ts, reason, changes } });

export const update = (ts, changes, extra = {}) =>
  frame({ event: extra.event ?? "update", id: extra.noId ? undefined : ts, data: { ...pick(extra), ts, changes } });

export const status = (upstream, error, extra = {}) =>
  frame({ event: "status", data: { ...pick(extra), upstream, error } });

export const end = (reason, extra = {}) => frame({ event: "end", data: { ...pick(extra), reason } });

const pick = ({ stream }) => (stream === undefined ? {} : { stream });

/**
 * Subscribes with callbacks that log into `log`. Backoff timers run at once,
 * their delays logged as `{ delay: ms }`, so tests check backoff without waiting.
 * The idle timeout is off unless a test sets it. The server's close() closes it.
 */
export function client(paths, server, options = {}) {
  const log = new Log();
  const s = subscribe(paths, {
    base: server.url,
    onChange: (rows, info) => log.push({ change: { rows, info } }),
    onStatus: (st) => log.push({ status: st }),
    onEnd: (reason, detail) => log.push({ end: { reason, detail } }),
    timers: {
      setTimeout: (fn, ms) => {
        log.push({ delay: ms });
        return setImmediate(fn);
      },
      clearTimeout: (t) => clearImmediate(t),
    },
    idleTimeoutMs: 0,
    ...options,
  });
  server.subscriptions.add(s);
  return { s, log };
}

/** The nth (0-based) onChange, once it has happened. */
export const nthChange = (log, n) => log.until((e) => e.filter((x) => x.change)[n]?.change, `onChange #${n + 1}`);

/** The nth (0-based) request the server got, once it has come. */
export const nthRequest = (server, n) => server.log.until(() => server.requests()[n], `request #${n + 1}`);

/** Waits until the subscription has stopped, and returns its onEnd (if any). */
export const stopped = (log) =>
  log.until((e) => e.some((x) => x.status?.state === "stopped"), "the stopped status").then(() => log.of("end")[0]);
