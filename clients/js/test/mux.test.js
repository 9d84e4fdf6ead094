// subscribe([...paths]): one multiplexed connection, changes reported per group.
import { test } from "node:test";
import assert from "node:assert/strict";
import { client, end, nthChange, nthRequest, open, snapshot, withServer, status, update } from "../test-support/mock-gateway.js";

const T = { timeout: 10000 };
const A = "/a";
const B = "/b?x=1"; // a path with its own query string
const row = (v) => ({ diff: 1, row: { v } });

// The initial group: both snapshots at ts 100, the id on the last.
const initial = () => [
  "retry: 10\n\n",
  snapshot("100", [row("a1")], "initial", { stream: A, noId: true }),
  snapshot("100", [row("b1")], "initial", { stream: B }),
];

test("the mux URL carries every path, encoded", T, () =>
  withServer([], async (server) => {
    client([A, B], server);
    const req = await nthRequest(server, 0);
    assert.equal(req.url, "/_tailgate/mux?s=%2Fa&s=%2Fb%3Fx%3D1");
    assert.equal(req.headers.accept, "text/event-stream");
  }));

test("onChange once per group, when the event with the id arrives", T, () =>
  withServer(
    [
      (_, res) =>
        open(
          res,
          ...initial(),
          update("101", [row("a2")], { stream: A, noId: true }),
          status("reconnecting", "lost", { stream: A }),
          update("101", [row("b2")], { stream: B, event: "orders" }),
          update("102", [row("a3")], { stream: A }),
        ),
    ],
    async (server) => {
      let rowsOfA; // the rows of /a when the status, inside group 101, arrived
      const { s, log } = client([A, B], server, {
        onStatus: (st) => {
          log.push({ status: st });
          if (st.stream) rowsOfA = s.rows(A);
        },
      });

      const first = await nthChange(log, 0);
      assert.deepEqual(first.info.streams, [A, B]);
      assert.equal(first.info.id, "100");
      assert.equal(first.info.ts, "100");
      assert.deepEqual(first.info.events.map((e) => [e.stream, e.kind, e.reason]), [
        [A, "snapshot", "initial"],
        [B, "snapshot", "initial"],
      ]);
      assert.deepEqual([...first.rows.keys()], [A, B]);
      assert.deepEqual(first.rows.get(A), [{ v: "a1" }]);
      assert.deepEqual(first.rows.get(B), [{ v: "b1" }]);

      const second = await nthChange(log, 1);
      assert.deepEqual(second.info.streams, [A, B]);
      assert.deepEqual(second.info.events.map((e) => e.event), ["update", "orders"]);
      assert.deepEqual(second.rows.get(A), [{ v: "a1" }, { v: "a2" }]);
      assert.deepEqual(second.rows.get(B), [{ v: "b1" }, { v: "b2" }]);
      assert.deepEqual(rowsOfA, [{ v: "a1" }], "a group is applied only once it is complete");
      const st = log.of("status").find((x) => x.stream);
      assert.deepEqual(st, { state: "streaming", upstream: "reconnecting", error: "lost", stream: A });

      const third = await nthChange(log, 2);
      assert.deepEqual(third.info.streams, [A]);
      assert.equal(third.info.id, "102");
      assert.equal(log.of("change").length, 3);
      assert.equal(s.lastEventId, "102");
      assert.deepEqual(s.rows(A), [{ v: "a1" }, { v: "a2" }, { v: "a3" }]);
      assert.throws(() => s.rows(), TypeError);
    },
  ));

test("a group cut short by a dropped connection is replayed, and applied once", T, () =>
  withServer(
    [
      (_, res) => {
        open(res, ...initial());
        res.write(update("101", [row("a2")], { stream: A, noId: true }), () => res.socket.destroy());
      },
      (_, res) =>
        open(res, update("101", [row("a2")], { stream: A, noId: true }), update("101", [row("b2")], { stream: B })),
    ],
    async (server) => {
      const { s, log } = client([A, B], server);
      const second = await nthChange(log, 1);
      assert.equal(server.requests()[1].headers["last-event-id"], "100");
      assert.deepEqual(second.rows.get(A), [{ v: "a1" }, { v: "a2" }]);
      assert.deepEqual(second.info.events.length, 2);
      assert.equal(s.lastEventId, "101");
    },
  ));

test("a constituent that ends alone is dropped; the rest carry on", T, () =>
  withServer(
    [
      (_, res) => {
        open(res, ...initial(), end("removed", { stream: B }));
        res.end(update("101", [row("a2")], { stream: A }));
      },
      (_, res) => open(res, update("102", [row("a3")], { stream: A })),
    ],
    async (server) => {
      const { log } = client([A, B], server);
      await nthChange(log, 2);
      assert.deepEqual(log.of("end"), [{ reason: "removed", detail: { stream: B } }]);
      const resumed = server.requests()[1];
      assert.equal(resumed.url, "/_tailgate/mux?s=%2Fa");
      assert.equal(resumed.headers["last-event-id"], "101");
    },
  ));

test("an end for the whole connection stops every stream", T, () =>
  withServer([(_, res) => open(res, ...initial(), end("forbidden"))], async (server) => {
    const { log } = client([A, B], server);
    await log.until((e) => e.some((x) => x.end), "onEnd");
    assert.deepEqual(log.of("end"), [{ reason: "forbidden", detail: {} }]);
    assert.equal(log.of("status").at(-1).state, "stopped");
  }));

test("an event for a stream not asked for is a protocol error", T, () =>
  withServer(
    [
      (_, res) => open(res, ...initial(), update("101", [row("x")], { stream: "/elsewhere" })),
      (_, res) => open(res, update("101", [row("a2")], { stream: A })),
    ],
    async (server) => {
      const { log } = client([A, B], server);
      const second = await nthChange(log, 1);
      assert.deepEqual(second.rows.get(A), [{ v: "a1" }, { v: "a2" }]);
      assert.equal(server.requests()[1].headers["last-event-id"], "100");
      const reconnecting = log.of("status").find((st) => st.state === "reconnecting");
      assert.equal(reconnecting.error, 'an event for a stream not subscribed: "/elsewhere"');
    },
  ));
