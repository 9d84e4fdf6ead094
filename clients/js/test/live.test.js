// live.js on a fake DOM (no HTML parser: innerHTML throws), fed by a mock gateway.
// Layout and styling are left to the gateway's browser tests.
import { test } from "node:test";
import assert from "node:assert/strict";
import { Log, end, open, snapshot, status, update, withServer } from "../test-support/mock-gateway.js";
import { fakeDocument } from "../test-support/fake-dom.js";
import { mountIndex, mountLive } from "../live.js";

const T = { timeout: 10000 };
const HOSTILE = "</script><img src=x onerror=alert(1)>\"'&amp;";

// Mounts a live page for `path` on a fake document; `log` sees every frame drawn.
function live(server, path, options = {}) {
  const log = new Log();
  const doc = fakeDocument({ onFrame: () => log.push({ frame: true }) });
  const root = doc.body;
  const page = mountLive(root, path, {
    base: server.url,
    idleTimeoutMs: 0,
    onStatus: (st) => log.push({ status: st }),
    onEnd: (reason) => log.push({ end: reason }),
    ...options,
  });
  server.subscriptions.add(page.subscription);
  const table = () => ({
    head: root.all("th").map((th) => th.textContent),
    rows: root.all("tbody")[0].all("tr").map((tr) => tr.all("td").map((td) => td.textContent)),
  });
  const frames = (n) => log.until((e) => e.filter((x) => x.frame).length >= n, `frame ${n}`);
  return { doc, root, page, log, table, frames };
}

const byClass = (root, cls) => [
  ...["span", "p", "tr", "td", "th", "time"].flatMap((t) => root.all(t)),
].filter((n) => (n.getAttribute("class") ?? "").split(" ").includes(cls));

test("a keyed stream as a table: key columns first, values as text, flashes, sorting", T, () =>
  withServer(
    [
      (_, res) =>
        open(
          res,
          snapshot("1764470000000", [
            { key: { id: 2 }, row: { name: "b", total: "10.5", id: 2 } },
            { key: { id: 1 }, row: { name: HOSTILE, total: "9.25", id: 1 } },
            { key: { id: 3 }, row: { name: null, total: "18446744073709551615", id: 3 } },
          ]),
        ),
    ],
    async (server) => {
      const { root, table, frames, page } = live(server, "/orders/42?status=open");
      await frames(1);
      assert.deepEqual(table(), {
        head: ["id", "name", "total"],
        rows: [
          ["2", "b", "10.5"],
          ["1", HOSTILE, "9.25"],
          ["3", "NULL", "18446744073709551615"],
        ],
      });
      assert.ok(root.texts().includes(HOSTILE), "the hostile value is one text node");
      assert.equal(root.all("h1")[0].textContent, "/orders/42?status=open");
      assert.equal(root.all("time")[0].textContent, "2025-11-30T02:33:20.000Z");
      assert.equal(root.all("time")[0].getAttribute("title"), "ts 1764470000000");
      assert.ok(root.texts().includes("3 rows"));
      assert.equal(byClass(root, "tg-key").length, 1);
      assert.equal(byClass(root, "tg-null")[0].textContent, "NULL");

      // Sorting: numeric strings by value (the big integer last), then descending.
      const total = () => root.all("th")[2].all("button")[0];
      total().dispatch("click");
      assert.deepEqual(table().rows.map((r) => r[0]), ["1", "2", "3"]);
      assert.equal(root.all("th")[2].getAttribute("aria-sort"), "ascending");
      total().dispatch("click");
      assert.deepEqual(table().rows.map((r) => r[0]), ["3", "2", "1"]);
      // Text by collation; NULL last either way round.
      const name = () => root.all("th")[1].all("button")[0];
      name().dispatch("click");
      assert.deepEqual(table().rows.map((r) => r[1]), [HOSTILE, "b", "NULL"]);
      name().dispatch("click");
      assert.deepEqual(table().rows.map((r) => r[1]), ["b", HOSTILE, "NULL"]);
      assert.equal(name().textContent, "name ▼");
      page.destroy();
    },
  ));

test("an updated row flashes; rate, count and status are shown", T, () => {
  let send;
  return withServer(
    [
      (_, res) => {
        open(res, snapshot("1000", [{ diff: 1, row: { s: 1, t: 20 } }, { diff: 1, row: { s: 2, t: 21 } }]));
        send = (f) => res.write(f);
      },
    ],
    async (server) => {
      const { root, table, frames, log, page } = live(server, "/sensors", { event: "new_message" });
      await frames(1);
      assert.deepEqual(byClass(root, "tg-flash"), [], "a snapshot does not flash");
      const statusText = () => byClass(root, "tg-status")[0].textContent;
      assert.equal(statusText(), "streaming");

      send(update("2000", [{ diff: -1, row: { s: 2, t: 21 } }, { diff: 1, row: { s: 2, t: 25 } }], { event: "new_message" }));
      await frames(2);
      assert.deepEqual(table().rows, [["1", "20"], ["2", "25"]]);
      assert.deepEqual(byClass(root, "tg-flash").map((tr) => tr.textContent), ["225"]);
      assert.match(root.texts().join("|"), /\|[0-9.]+ events\/s\|/);

      send(status("reconnecting", `upstream <b>down</b>`));
      await log.until((e) => e.some((x) => x.status?.upstream === "reconnecting"), "the upstream status");
      assert.equal(statusText(), "upstream reconnecting");
      const problem = byClass(root, "tg-problem")[0];
      assert.equal(problem.textContent, "upstream <b>down</b>");
      assert.equal(problem.getAttribute("hidden"), null);

      send(end("removed"));
      await log.until((e) => e.some((x) => x.end), "onEnd");
      assert.equal(statusText(), "stopped");
      assert.match(problem.textContent, /removed/);
      page.destroy();
    },
  );
});

test("the index: links, a form per template, values encoded into the path", T, () => {
  const doc = fakeDocument();
  mountIndex(doc.body, [
    { path: "/sensors", view: "sensors_view_1s", event: "new_message", key: null, upstream: "streaming", error: null, clients: 1 },
    {
      path: "/orders/{customer_id}",
      view: "orders",
      event: "update",
      key: ["order_id"],
      upstream: "reconnecting",
      error: HOSTILE,
      clients: 0,
      params: ["customer_id"],
      filters: ["status", "region"],
      columns: ["order_id", "customer_id", "status", "total"],
    },
  ]);
  const root = doc.body;
  const links = root.all("a");
  assert.deepEqual(links.map((a) => a.getAttribute("href")), ["/sensors"], "a template is no link");
  assert.ok(root.texts().includes(HOSTILE));
  assert.ok(root.texts().includes("view orders · event update · key order_id · 0 clients"));

  const [form] = root.all("form");
  const inputs = Object.fromEntries(form.all("input").map((i) => [i.getAttribute("name"), i]));
  assert.deepEqual(Object.keys(inputs), ["customer_id", "status", "region"]);
  assert.equal(inputs.customer_id.getAttribute("required"), "");
  assert.ok(!new RegExp(`^(?:${inputs.customer_id.getAttribute("pattern")})$`, "v").test(".."));
  assert.ok(new RegExp(`^(?:${inputs.customer_id.getAttribute("pattern")})$`, "v").test("a..b"));

  inputs.customer_id.value = "42/../x?y=1";
  inputs.status.value = "open & held";
  inputs.region.value = "";
  assert.ok(form.dispatch("submit"), "the form does not submit itself");
  assert.deepEqual(doc.defaultView.location.assigned, ["/orders/42%2F..%2Fx%3Fy%3D1?status=open+%26+held"]);
});

test("an empty index says so", () => {
  const doc = fakeDocument();
  mountIndex(doc.body, []);
  assert.equal(doc.body.all("p")[0].textContent, "No streams are configured.");
});

test("an entry of the public listing shows what it has: path, event and key", () => {
  const doc = fakeDocument();
  mountIndex(doc.body, [{ path: "/sensors", event: "new_message", key: null }]);
  assert.ok(doc.body.texts().includes("event new_message"));
  assert.ok(!doc.body.texts().some((t) => /undefined|client|streaming/.test(t)), doc.body.texts().join("|"));
});
