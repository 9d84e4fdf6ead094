// The event-stream parser against the WHATWG HTML standard's rules and examples.
import { test } from "node:test";
import assert from "node:assert/strict";
import { EventStreamParser } from "../tailgate.js";

// Parses `chunks` and returns what the parser reported, in order.
function parse(chunks) {
  const out = [];
  const parser = new EventStreamParser({
    onEvent: (e) => out.push({ ...e }),
    onRetry: (ms) => out.push({ retry: ms }),
    onComment: (text) => out.push({ comment: text }),
  });
  for (const chunk of chunks) parser.push(chunk);
  return { out, parser };
}

const events = (chunks) => parse(chunks).out.filter((e) => "type" in e);
const ev = (type, data, id, lastEventId = id ?? "") => ({ type, data, id, lastEventId });

test("the standard's examples", () => {
  assert.deepEqual(events(["data: YHOO\ndata: +2\ndata: 10\n\n"]), [ev("message", "YHOO\n+2\n10")]);

  assert.deepEqual(
    events([
      ": test stream\n\ndata: first event\nid: 1\n\ndata:second event\nid\n\ndata:  third event\n",
    ]),
    [ev("message", "first event", "1"), ev("message", "second event", "")],
    "an empty id resets the last event id; an unterminated event is never dispatched",
  );

  assert.deepEqual(events(["data\n\ndata\ndata\n\ndata:"]), [ev("message", ""), ev("message", "\n")]);
  assert.deepEqual(events(["data:test\n\ndata: test\n\n"]), [ev("message", "test"), ev("message", "test")]);
});

test("event names, ids carried over, and an id line of the event's own", () => {
  const got = events(["event: snapshot\nid: 7\ndata: {}\n\nevent: status\ndata: x\n\n"]);
  assert.deepEqual(got, [ev("snapshot", "{}", "7"), { type: "status", data: "x", id: undefined, lastEventId: "7" }]);
  // The event name does not outlive its event.
  assert.deepEqual(events(["event: a\n\ndata: b\n\n"]), [ev("message", "b")]);
});

test("an id containing NUL is ignored", () => {
  const { out, parser } = parse(["id: 5\ndata: a\n\nid: 6\0x\ndata: b\n\n"]);
  assert.deepEqual(out, [ev("message", "a", "5"), { type: "message", data: "b", id: undefined, lastEventId: "5" }]);
  assert.equal(parser.lastEventId, "5");
});

test("retry takes only ASCII digits", () => {
  const { out } = parse(["retry: 1500\nretry: 15x\nretry:  20\nretry: -1\nretry\nretry: 0\n\n"]);
  assert.deepEqual(out, [{ retry: 1500 }, { retry: 0 }]);
});

test("comments, unknown fields, and one space stripped after the colon", () => {
  const { out } = parse([": keepalive\nfoo: bar\ndata:  two spaces\ndata:none\n:\n\n"]);
  assert.deepEqual(out, [{ comment: " keepalive" }, { comment: "" }, ev("message", " two spaces\nnone")]);
});

test("one leading BOM is dropped, a second one is not", () => {
  assert.deepEqual(events(["\uFEFFdata: a\n\n"]), [ev("message", "a")]);
  assert.deepEqual(events(["", "\uFEFF", "data: a\n\n"]), [ev("message", "a")]);
  // The second BOM makes the first field "\uFEFFdata", which is unknown.
  assert.deepEqual(events(["\uFEFF\uFEFFdata: a\n\ndata: b\n\n"]), [ev("message", "b")]);
  assert.deepEqual(events(["data: a\n\n\uFEFFdata: b\n\n"]), [ev("message", "a")]);
});

const STREAM =
  "retry: 10000\n: keepalive\nevent: snapshot\nid: 18446744073709551615\n" +
  'data: {"ts":"18446744073709551615","changes":[]}\n\nevent: new_message\nid: 2\ndata: a\ndata:\ndata: c\n\n' +
  "data: no name\n\nid\n\nevent: x\ndata: after an empty id\n\n";

const EXPECTED = [
  { retry: 10000 },
  { comment: " keepalive" },
  ev("snapshot", '{"ts":"18446744073709551615","changes":[]}', "18446744073709551615"),
  ev("new_message", "a\n\nc", "2"),
  { type: "message", data: "no name", id: undefined, lastEventId: "2" },
  ev("x", "after an empty id", undefined, ""),
];

for (const [name, eol] of [["LF", "\n"], ["CR", "\r"], ["CRLF", "\r\n"]]) {
  const text = STREAM.replaceAll("\n", eol);

  test(`${name} line endings, split at every position`, () => {
    assert.deepEqual(parse([text]).out, EXPECTED);
    for (let i = 0; i <= text.length; i++) {
      assert.deepEqual(parse([text.slice(0, i), text.slice(i)]).out, EXPECTED, `split at ${i}`);
    }
    for (let i = 0; i < text.length; i++) {
      for (const j of [i + 1, i + 2, i + 3]) {
        const chunks = [text.slice(0, i), text.slice(i, j), text.slice(j)];
        assert.deepEqual(parse(chunks).out, EXPECTED, `split at ${i} and ${j}`);
      }
    }
  });

  test(`${name} line endings, one character at a time`, () => {
    assert.deepEqual(parse([...text]).out, EXPECTED);
  });
}

test("line endings mixed in one stream", () => {
  assert.deepEqual(events(["data: a\r\ndata: b\rdata: c\n\r\ndata: d\r\r"]), [
    ev("message", "a\nb\nc"),
    ev("message", "d"),
  ]);
  // A CR at the end of a chunk ends its line even if no LF follows.
  assert.deepEqual(events(["data: a\r", "\r", "data: b\n", "\n"]), [ev("message", "a"), ev("message", "b")]);
});

test("values are passed through untouched", () => {
  const data = '{"row":{"s":"</script><img src=x onerror=alert(1)>\\u0000\\u2028é😀\\"q\\""}}';
  assert.deepEqual(events([`data: ${data}\n\n`]), [ev("message", data)]);
  // U+2028 and U+2029 are not line endings in an event stream.
  assert.deepEqual(events(["data: a\u2028b\u2029c\n\n"]), [ev("message", "a\u2028b\u2029c")]);
});
