// The EventSource fallback, against a stand-in EventSource that the test drives.
import { test } from "node:test";
import assert from "node:assert/strict";
import { Log } from "../test-support/mock-gateway.js";
import { subscribe } from "../tailgate.js";

const T = { timeout: 5000 };

// Records every instance; the test plays the server through emit(), open() and fail().
class FakeEventSource {
  static made = new Log();
  listeners = new Map();
  closed = false;

  constructor(url, init) {
    this.url = new URL(url);
    this.init = init;
    FakeEventSource.made.push({ es: this });
  }

  addEventListener(type, fn) {
    this.listeners.set(type, fn);
  }

  close() {
    this.closed = true;
  }

  open() {
    this.onopen?.();
  }

  fail() {
    this.onerror?.();
  }

  emit(type, data, lastEventId) {
    if (this.closed) return;
    this.listeners.get(type)?.({ type, data: JSON.stringify(data), lastEventId });
  }
}

function fallback(paths, options) {
  FakeEventSource.made = new Log();
  globalThis.EventSource = FakeEventSource;
  const log = new Log();
  const s = subscribe(paths, {
    base: "http://127.0.0.1:1",
    transport: "eventsource",
    onChange: (rows, info) => log.push({ change: { rows, info } }),
    onStatus: (st) => log.push({ status: st }),
    timers: {
      setTimeout: (fn, ms) => {
        log.push({ delay: ms });
        return setImmediate(fn);
      },
      clearTimeout: clearImmediate,
    },
    ...options,
  });
  const nth = (n) => FakeEventSource.made.until((e) => e[n]?.es, `EventSource #${n + 1}`);
  return { s, log, nth };
}

test("the fallback puts the last event id and the token into the query", T, async () => {
  let n = 0;
  const { s, log, nth } = fallback("/sensors?region=eu", {
    token: async () => `tok${++n}`,
    tokenQueryParam: "access_token",
    event: "new_message",
    credentials: "include",
  });
  const first = await nth(0);
  assert.equal(first.url.pathname, "/sensors");
  assert.equal(first.url.search, "?region=eu&access_token=tok1");
  assert.deepEqual(first.init, { withCredentials: true });
  assert.ok(first.listeners.has("new_message"), "listens for the stream's own update name");

  first.open();
  first.emit("snapshot", { ts: "5", reason: "initial", changes: [{ diff: 1, row: { a: 1 } }] }, "5");
  first.emit("new_message", { ts: "6", changes: [{ diff: 1, row: { a: 2 } }] }, "6");
  await log.until((e) => e.filter((x) => x.change).length === 2, "two changes");
  assert.deepEqual(s.rows(), [{ a: 1 }, { a: 2 }]);
  assert.equal(s.lastEventId, "6");

  first.fail();
  const second = await nth(1);
  assert.ok(first.closed);
  assert.equal(second.url.searchParams.get("last_event_id"), "6");
  assert.equal(second.url.searchParams.get("access_token"), "tok2", "a fresh token for every EventSource");
  assert.equal(log.of("delay").length, 1);
  s.close();
  assert.ok(second.closed);
});

test("over the fallback, a mux group ends where lastEventId changes", T, async () => {
  const { s, log, nth } = fallback(["/a", "/b"], {});
  const es = await nth(0);
  assert.equal(es.url.search, "?s=%2Fa&s=%2Fb");
  es.open();
  es.emit("snapshot", { stream: "/a", ts: "100", reason: "initial", changes: [] }, "");
  es.emit("snapshot", { stream: "/b", ts: "100", reason: "initial", changes: [] }, "100");
  es.emit("update", { stream: "/a", ts: "101", changes: [{ diff: 1, row: { v: 1 } }] }, "100");
  es.emit("status", { stream: "/b", upstream: "reconnecting", error: "x" }, "100");
  assert.equal(log.of("change").length, 1);
  assert.deepEqual(s.rows("/a"), []);
  es.emit("update", { stream: "/b", ts: "101", changes: [{ diff: 1, row: { v: 2 } }] }, "101");
  const changes = log.of("change");
  assert.equal(changes.length, 2);
  assert.deepEqual(changes[1].info.streams, ["/a", "/b"]);
  assert.deepEqual(s.rows("/a"), [{ v: 1 }]);
  s.close();
});
