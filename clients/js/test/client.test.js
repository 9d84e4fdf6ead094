// subscribe() against a mock gateway on 127.0.0.1: state, snapshots, and every
// way a connection ends.
import { test } from "node:test";
import assert from "node:assert/strict";
import {
  Log, client, end, nthChange, nthRequest, open, refuse, snapshot, withServer, status, stopped, update,
} from "../test-support/mock-gateway.js";

const T = { timeout: 10000 };

const A = { sensor_id: 1, avg: "24.20" };
const B = { sensor_id: 2, avg: "19.00" };
const C = { sensor_id: 3, avg: "30.50" };

test("a diff stream: snapshot, updates and multiset counts", T, () =>
  withServer(
    [
      (_, res) =>
        open(
          res,
          "retry: 50\n\n",
          snapshot("100", [{ diff: 2, row: A }, { diff: 1, row: B }]),
          update("101", [{ diff: -1, row: A }, { diff: 1, row: C }], { event: "new_message" }),
          // The same row with its columns in another order is the same row.
          update("102", [{ diff: -1, row: { avg: "24.20", sensor_id: 1 } }, { diff: -1, row: B }], { event: "new_message" }),
        ),
    ],
    async (server) => {
      const { s, log } = client("/sensors", server);
      const first = await nthChange(log, 0);
      assert.deepEqual(first.rows, [A, A, B]);
      assert.deepEqual(first.info, {
        stream: "/sensors", kind: "snapshot", event: "snapshot", reason: "initial", ts: "100", id: "100",
        changes: [{ diff: 2, row: A }, { diff: 1, row: B }],
      });
      const second = await nthChange(log, 1);
      assert.deepEqual(second.rows, [A, B, C]);
      assert.equal(second.info.kind, "update");
      assert.equal(second.info.event, "new_message");
      assert.equal(second.info.reason, undefined);
      const third = await nthChange(log, 2);
      assert.deepEqual(third.rows, [C]);
      assert.deepEqual(s.rows(), [C]);
      assert.equal(s.lastEventId, "102");
      assert.deepEqual(log.of("status").map((st) => st.state), ["connecting", "streaming"]);
      assert.equal(server.requests()[0].headers.accept, "text/event-stream");
      assert.equal(server.requests()[0].headers["last-event-id"], undefined);
      s.close();
    },
  ));

test("a keyed stream: a replaced row keeps its place, null deletes", T, () =>
  withServer(
    [
      (_, res) =>
        open(
          res,
          snapshot("7", [1, 2, 3].map((id) => ({ key: { id }, row: { id, v: "a" } }))),
          update("8", [
            { key: { id: 2 }, row: { id: 2, v: "b" } },
            { key: { id: 1 }, row: null },
            { key: { id: 4 }, row: { id: 4, v: "a" } },
          ]),
          update("9", [{ key: { id: 1 }, row: { id: 1, v: "c" } }]),
        ),
    ],
    async (server) => {
      const { s, log } = client("/latest", server);
      assert.deepEqual((await nthChange(log, 0)).rows.map((r) => r.id), [1, 2, 3]);
      const second = await nthChange(log, 1);
      assert.deepEqual(second.rows, [{ id: 2, v: "b" }, { id: 3, v: "a" }, { id: 4, v: "a" }]);
      assert.deepEqual(second.info.changes[1], { key: { id: 1 }, row: null });
      const third = await nthChange(log, 2);
      assert.deepEqual(third.rows.map((r) => r.id), [2, 3, 4, 1]);
      s.close();
    },
  ));

test("every snapshot reason replaces the state, and is reported", T, () => {
  const reasons = ["resume-gap", "lagged", "upstream-reset", "config-changed"];
  return withServer(
    [
      (_, res) =>
        open(
          res,
          snapshot("1", [{ diff: 1, row: A }, { diff: 1, row: B }]),
          ...reasons.map((reason, i) => snapshot(String(i + 2), [{ diff: 1, row: { reason } }], reason)),
          // A config change may turn a diff stream into a keyed one.
          snapshot("9", [{ key: { id: 1 }, row: { id: 1 } }], "config-changed"),
        ),
    ],
    async (server) => {
      const { s, log } = client("/s", server);
      for (const [i, reason] of reasons.entries()) {
        const { rows, info } = await nthChange(log, i + 1);
        assert.equal(info.reason, reason);
        assert.equal(info.kind, "snapshot");
        assert.deepEqual(rows, [{ reason }]);
      }
      assert.deepEqual((await nthChange(log, 5)).rows, [{ id: 1 }]);
      s.close();
    },
  );
});

test("hostile values arrive intact, through a BOM and UTF-8 split across writes", T, () => {
  const row = {
    script: "</script><script>alert(1)</script>",
    img: "<img src=x onerror=alert(1)>",
    quotes: `"'\`\\`,
    nul: "a\u0000b",
    text: "é 日本 😀",
    separators: "a\u2028b\u2029c",
    lines: "a\r\nb\rc\nd",
    frame: "\n\ndata: injected\n\n",
    numeric: "123456789012345678901234567890.000000001",
    big: "18446744073709551615",
    json: { nested: ["<b>", null, true] },
    ["__proto__"]: { polluted: true },
  };
  const bytes = Buffer.from(`\uFEFF${snapshot("1", [{ diff: 1, row }])}`);
  return withServer(
    [
      (_, res) => {
        open(res);
        // Write byte by byte: splits the BOM and every multi-byte character.
        for (const b of bytes) res.write(Buffer.from([b]));
      },
    ],
    async (server) => {
      const { s, log } = client("/s", server);
      const { rows } = await nthChange(log, 0);
      assert.deepEqual(rows, [JSON.parse(JSON.stringify(row))]);
      assert.equal(rows[0].separators, "a\u2028b\u2029c");
      assert.equal(Object.getPrototypeOf(rows[0]), Object.prototype);
      assert.equal({}.polluted, undefined);
      s.close();
    },
  );
});

test("timestamps beyond 2^53 stay exact decimal strings", T, () =>
  withServer(
    [
      (_, res) => {
        open(res, "retry: 10\n\n", snapshot("9007199254740993", [{ diff: 1, row: A }]));
        res.end(update("18446744073709551615", [{ diff: 1, row: B }]));
      },
      (_, res) => open(res),
    ],
    async (server) => {
      const { s, log } = client("/s", server);
      assert.equal((await nthChange(log, 0)).info.ts, "9007199254740993");
      const { info } = await nthChange(log, 1);
      assert.equal(info.ts, "18446744073709551615");
      assert.equal(info.id, "18446744073709551615");
      const resumed = await nthRequest(server, 1);
      assert.equal(resumed.headers["last-event-id"], "18446744073709551615");
      s.close();
    },
  ));

test("a dropped connection resumes with Last-Event-ID and no snapshot", T, () =>
  withServer(
    [
      (_, res) => {
        open(res, "retry: 20\n\n", snapshot("100", [{ diff: 1, row: A }]));
        res.write(update("101", [{ diff: 1, row: B }]), () => res.socket.destroy());
      },
      (req, res) => open(res, update("102", [{ diff: 1, row: C }])),
    ],
    async (server) => {
      const { s, log } = client("/s", server);
      const third = await nthChange(log, 2);
      assert.deepEqual(third.rows, [A, B, C]);
      assert.deepEqual(log.of("change").map((c) => c.info.kind), ["snapshot", "update", "update"]);
      assert.equal(server.requests()[1].headers["last-event-id"], "101");
      // The gateway's retry (20 ms) is the base; equal jitter waits 10 to 20 ms.
      const [delay] = log.of("delay");
      assert.ok(delay >= 10 && delay <= 20, `delay ${delay}`);
      const reconnecting = log.of("status").find((st) => st.state === "reconnecting");
      assert.equal(reconnecting.retryInMs, delay);
      s.close();
    },
  ));

test("503 backs off exponentially up to the cap, honouring Retry-After", T, () => {
  const busy = (headers = {}) => (_, res) => refuse(res, 503, { error: "overloaded" }, headers);
  return withServer(
    [busy(), busy(), busy({ "retry-after": "3" }), busy(), busy(), busy(), (_, res) => open(res, snapshot("5", []))],
    async (server) => {
      const { s, log } = client("/s", server, { backoff: { initialMs: 100, maxMs: 1000 } });
      await nthChange(log, 0);
      const delays = log.of("delay");
      const steps = [100, 200, 400, 800, 1000, 1000];
      assert.equal(delays.length, steps.length);
      for (const [i, step] of steps.entries()) {
        if (i === 2) assert.equal(delays[i], 3000, "Retry-After: 3");
        else assert.ok(delays[i] >= step / 2 && delays[i] <= step, `delay ${i}: ${delays[i]} for step ${step}`);
      }
      const statuses = log.of("status").filter((st) => st.state === "reconnecting");
      assert.deepEqual(statuses.map((st) => st.httpStatus), Array(6).fill(503));
      assert.deepEqual(statuses.map((st) => st.retryInMs), delays);
      assert.equal(statuses[0].error, "overloaded");
      assert.equal(s.status.state, "streaming");
      s.close();
    },
  );
});

// A token() that hands out t1, t2, ... and counts its calls in `calls`.
function tokens(calls) {
  return async () => {
    calls.push(calls.length + 1);
    return `t${calls.length}`;
  };
}

test("401: a fresh token at once, resuming from the last event id", T, () =>
  withServer(
    [
      (_, res) => {
        open(res, "retry: 10\n\n", snapshot("100", [{ diff: 1, row: A }]));
        res.end();
      },
      (_, res) => refuse(res, 401, { error: "invalid_token" }, { "www-authenticate": 'Bearer error="invalid_token"' }),
      (_, res) => open(res, update("101", [{ diff: 1, row: B }])),
    ],
    async (server) => {
      const calls = [];
      const { s, log } = client("/s", server, { token: tokens(calls) });
      await nthChange(log, 1);
      const [first, second, third] = server.requests();
      assert.equal(first.headers.authorization, "Bearer t1");
      assert.equal(second.headers.authorization, "Bearer t1", "a plain reconnect keeps the token");
      assert.equal(third.headers.authorization, "Bearer t2");
      assert.equal(third.headers["last-event-id"], "100");
      assert.deepEqual(calls, [1, 2]);
      // Only the closed connection waited; the 401 reconnected at once.
      assert.equal(log.of("delay").length, 1);
      const after401 = log.of("status").find((st) => st.httpStatus === 401);
      assert.equal(after401.retryInMs, 0);
      assert.deepEqual(s.rows(), [A, B]);
      s.close();
    },
  ));

test("401 right after a fresh token backs off instead of looping", T, () => {
  const denied = (_, res) => refuse(res, 401, { error: "invalid_token" }, { "www-authenticate": "Bearer" });
  return withServer([denied, denied, denied, (_, res) => open(res, snapshot("1", []))], async (server) => {
    const calls = [];
    const { s, log } = client("/s", server, { token: tokens(calls) });
    await nthChange(log, 0);
    assert.deepEqual(calls, [1, 2, 3, 4]);
    const retries = log.of("status").filter((st) => st.state === "reconnecting").map((st) => st.retryInMs);
    assert.equal(retries[0], 0);
    assert.ok(retries[1] > 0 && retries[2] > 0, `${retries}`);
    assert.equal(server.requests()[3].headers.authorization, "Bearer t4");
    s.close();
  });
});

test("end(token-expired): a fresh token, resuming with no snapshot", T, () =>
  withServer(
    [
      (_, res) => {
        open(res, snapshot("100", [{ diff: 1, row: A }]), update("101", [{ diff: 1, row: B }]));
        res.end(end("token-expired"));
      },
      (_, res) => open(res, update("102", [{ diff: 1, row: C }])),
    ],
    async (server) => {
      const calls = [];
      const { s, log } = client("/s", server, { token: tokens(calls) });
      const third = await nthChange(log, 2);
      assert.equal(third.info.kind, "update");
      assert.deepEqual(third.rows, [A, B, C]);
      const resumed = server.requests()[1];
      assert.equal(resumed.headers.authorization, "Bearer t2");
      assert.equal(resumed.headers["last-event-id"], "101");
      assert.deepEqual(log.of("delay"), [], "reconnects at once");
      assert.deepEqual(log.of("end"), [], "token expiry is not the end");
      s.close();
    },
  ));

test("401 with no token callback stops", T, () =>
  withServer([(_, res) => refuse(res, 401, { error: "missing token" }, { "www-authenticate": "Bearer" })], async (server) => {
    const { log } = client("/s", server);
    assert.deepEqual(await stopped(log), { reason: "unauthorized", detail: { httpStatus: 401, error: "missing token" } });
    assert.equal(server.requests().length, 1);
  }));

for (const [name, answer, reason, detail] of [
  ["404", (_, res) => refuse(res, 404, { error: "no such stream" }), "not-found", { httpStatus: 404, error: "no such stream" }],
  ["403", (_, res) => refuse(res, 403, { error: "not allowed" }), "forbidden", { httpStatus: 403, error: "not allowed" }],
  [
    "400",
    (_, res) => refuse(res, 400, { error: "not an integer", parameter: "customer_id" }),
    "bad-request",
    { httpStatus: 400, error: "not an integer", parameter: "customer_id" },
  ],
  ["end(removed)", (_, res) => open(res, snapshot("1", []), end("removed")), "removed", {}],
  ["end(forbidden)", (_, res) => open(res, snapshot("1", []), end("forbidden")), "forbidden", {}],
  ["a 200 that is no event stream", (_, res) => res.end("<html>login</html>"), "bad-response", { httpStatus: 200 }],
]) {
  test(`${name} stops for good`, T, () =>
    withServer([answer], async (server) => {
      const { log } = client("/s", server, { token: async () => "t" });
      assert.deepEqual(await stopped(log), { reason, detail });
      const last = log.of("status").at(-1);
      assert.equal(last.state, "stopped");
      assert.equal(last.reason, reason);
      assert.equal(server.requests().length, 1);
      assert.deepEqual(log.of("delay"), []);
    }));
}

test("end(overloaded) and end(shutdown) back off from the gateway's retry", T, () => {
  const ended = (reason) => (_, res) => res.end(open(res, "retry: 1000\n\n", end(reason)));
  return withServer(
    [ended("overloaded"), ended("overloaded"), ended("shutdown"), (_, res) => open(res, snapshot("1", []))],
    async (server) => {
      const { s, log } = client("/s", server);
      await nthChange(log, 0);
      const delays = log.of("delay");
      for (const [i, step] of [1000, 2000, 4000].entries()) {
        assert.ok(delays[i] >= step / 2 && delays[i] <= step, `delay ${i}: ${delays[i]}`);
      }
      assert.equal(delays.length, 3);
      assert.match(log.of("status").find((st) => st.state === "reconnecting").error, /overloaded/);
      s.close();
    },
  );
});

test("status events report the upstream", T, () =>
  withServer(
    [(_, res) => open(res, status("reconnecting", "the upstream connection closed"), snapshot("1", []), status("streaming", null))],
    async (server) => {
      const { s, log } = client("/s", server);
      await log.until((e) => e.filter((x) => x.status?.upstream).length === 3, "three statuses with upstream");
      assert.deepEqual(
        log.of("status").map((st) => [st.state, st.upstream, st.error]),
        [
          ["connecting", null, null],
          ["streaming", "streaming", null],
          ["streaming", "reconnecting", "the upstream connection closed"],
          ["streaming", "streaming", null],
        ],
      );
      s.close();
    },
  ));

test("close() ends the connection and calls no onEnd", T, () =>
  withServer([(_, res) => open(res, snapshot("1", [{ diff: 1, row: A }]))], async (server) => {
    const { s, log } = client("/s", server);
    await nthChange(log, 0);
    s.close();
    await server.log.until((e) => e.some((x) => x.closed === 0), "the server to see the request end");
    assert.equal(s.status.state, "stopped");
    assert.deepEqual(log.of("end"), []);
    assert.deepEqual(s.rows(), [A], "the rows stay readable");
  }));

test("a malformed event reconnects from the last good id", T, () =>
  withServer(
    [
      (_, res) => open(res, "retry: 10\n\n", snapshot("100", [{ diff: 1, row: A }]), "event: update\nid: 101\ndata: {oops\n\n"),
      (_, res) => open(res, update("101", [{ diff: 1, row: B }])),
    ],
    async (server) => {
      const { s, log } = client("/s", server);
      assert.deepEqual((await nthChange(log, 1)).rows, [A, B]);
      assert.equal(server.requests()[1].headers["last-event-id"], "100");
      assert.match(log.of("status").find((st) => st.state === "reconnecting").error, /JSON/);
      s.close();
    },
  ));

test("a connection silent past idleTimeoutMs is replaced", T, () => {
  // Every request that is no resume gets the snapshot, so a slow machine that
  // times out before the first one arrives still ends up here.
  const answer = (req, res) =>
    req.headers["last-event-id"] ? open(res) : open(res, "retry: 10\n\n", snapshot("100", [{ diff: 1, row: A }]));
  return withServer(Array(20).fill(answer), async (server) => {
    // Real timers: the idle timeout must actually fire.
    const { s, log } = client("/s", server, { idleTimeoutMs: 300, timers: globalThis });
    await server.log.until(() => server.requests().some((r) => r.headers["last-event-id"] === "100"), "a resume");
    assert.match(log.of("status").find((st) => st.state === "reconnecting").error, /no data for 300 ms/);
    s.close();
  });
});

test("keepalive comments keep a quiet connection alive", T, async () => {
  const sent = new Log();
  await withServer(
    [
      (_, res) => {
        open(res, snapshot("100", []));
        const timer = setInterval(() => {
          res.write(": keepalive\n\n");
          sent.push({ keepalive: true });
        }, 50);
        res.on("close", () => clearInterval(timer));
      },
    ],
    async (server) => {
      const { s } = client("/s", server, { idleTimeoutMs: 1000, timers: globalThis });
      await sent.until((e) => e.length >= 40, "40 keepalives, twice the idle timeout", 8000);
      assert.equal(server.requests().length, 1);
      s.close();
    },
  );
});

test("a token that expires again at once backs off", T, () => {
  const expired = (_, res) => res.end(open(res, "retry: 100\n\n", end("token-expired")));
  return withServer([expired, expired, expired, (_, res) => open(res, snapshot("1", []))], async (server) => {
    const calls = [];
    const { s, log } = client("/s", server, { token: tokens(calls) });
    await nthChange(log, 0);
    const retries = log.of("status").filter((st) => st.state === "reconnecting").map((st) => st.retryInMs);
    assert.equal(retries[0], 0, "the first expiry reconnects at once");
    assert.ok(retries[1] >= 50 && retries[2] >= 100, `${retries}`);
    assert.deepEqual(calls, [1, 2, 3, 4]);
    s.close();
  });
});

test("close() from inside onChange stops at once, mid-chunk", T, () =>
  withServer(
    [(_, res) => open(res, snapshot("1", []) + update("2", [{ diff: 1, row: A }]) + update("3", [{ diff: 1, row: B }]))],
    async (server) => {
      const { s, log } = client("/s", server, {
        onChange: (rows, info) => {
          log.push({ change: { rows, info } });
          if (info.id === "2") s.close();
        },
      });
      await stopped(log);
      await server.log.until((e) => e.some((x) => x.closed === 0), "the server to see the request end");
      assert.deepEqual(log.of("change").map((c) => c.info.id), ["1", "2"]);
      assert.deepEqual(s.rows(), [A]);
    },
  ));
