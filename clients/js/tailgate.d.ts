// Types for tailgate.js, the browser client for tailgate streams.

/** A row as the gateway sends it: numeric, big-integer and timestamp values may be strings. */
export type Row = Record<string, unknown>;

/** One change of a diff stream: `diff` copies of `row` added (> 0) or removed (< 0). */
export interface DiffChange<R = Row> {
  diff: number;
  row: R;
}

/** One change of a keyed stream: `row` replaces the key's row; `null` deletes the key. */
export interface KeyedChange<R = Row> {
  key: Record<string, unknown>;
  row: R | null;
}

export type Change<R = Row> = DiffChange<R> | KeyedChange<R>;

export type SnapshotReason = "initial" | "resume-gap" | "lagged" | "upstream-reset" | "config-changed";

/** One snapshot or update event, as applied. */
export interface ChangeInfo<R = Row> {
  /** The stream's path as subscribed. */
  stream: string;
  /** "snapshot" replaced the stream's rows; "update" changed them. */
  kind: "snapshot" | "update";
  /** The event's name: "snapshot", or the stream's update name ("update" unless configured). */
  event: string;
  /** Why the gateway sent a snapshot (snapshots only). */
  reason?: SnapshotReason;
  /** The Materialize timestamp, a decimal string (never a number: it exceeds 2^53). */
  ts: string;
  /** The event id: where a reconnect resumes (for a mux, the group's id). */
  id: string;
  changes: Change<R>[];
}

/** A mux group: every event at one timestamp, applied together. */
export interface GroupInfo<R = Row> {
  /** The id of the group's last event: all streams are consistent as of it. */
  id: string;
  ts: string;
  /** The streams this group changed, in the order their first event came. */
  streams: string[];
  /** Every event of the group, in order (their `id` is the group's). */
  events: Omit<ChangeInfo<R>, "id">[];
}

export interface Status {
  /**
   * The connection: "connecting" (a request is on its way), "streaming" (the
   * gateway answered), "reconnecting" (waiting `retryInMs` to try again),
   * "stopped" (for good: see `reason`, or close() was called).
   */
  state: "connecting" | "streaming" | "reconnecting" | "stopped";
  /** What the gateway says of its upstream while streaming ("streaming" until told otherwise). */
  upstream: "streaming" | "reconnecting" | null;
  /** The upstream's error, why the client is reconnecting, or the gateway's error text. */
  error: string | null;
  /** For a mux: the stream a `status` event is about. */
  stream?: string;
  /** The HTTP status that caused a reconnect or a stop. */
  httpStatus?: number;
  /** How long until the next attempt, in ms (state "reconnecting"). */
  retryInMs?: number;
  /** Why it stopped (state "stopped", except after close()); as passed to onEnd. */
  reason?: EndReason;
}

/**
 * Why a subscription (or, for a mux, one stream) stopped for good: the gateway's
 * `end` reasons "removed" and "forbidden", or the HTTP answer: 401 with no way to
 * get a token ("unauthorized"), 403 ("forbidden"), 404 ("not-found"), 400
 * ("bad-request"), or anything else no retry can fix ("bad-response").
 */
export type EndReason = "removed" | "forbidden" | "unauthorized" | "not-found" | "bad-request" | "bad-response";

export interface EndDetail {
  /** For a mux: the one stream that ended (the others carry on). */
  stream?: string;
  httpStatus?: number;
  /** The gateway's `error` from a JSON error body. */
  error?: string;
  /** The template or filter parameter a 400 names. */
  parameter?: string;
}

interface CommonOptions {
  onStatus?(status: Status): void;
  onEnd?(reason: EndReason, detail: EndDetail): void;
  /**
   * Returns a bearer token (or null to send none, e.g. when a cookie carries it).
   * Called before the first request, and again after a 401 or an
   * `end(token-expired)`. Over EventSource, before every request.
   */
  token?: () => string | null | undefined | Promise<string | null | undefined>;
  /** Over EventSource only (it cannot send headers): the query parameter that carries the token. */
  tokenQueryParam?: string;
  /** fetch's credentials mode; "include" sends cookies cross-origin. Default "same-origin". */
  credentials?: RequestCredentials;
  /** The URL paths are resolved against. Default: the page's location. */
  base?: string | URL;
  /**
   * The streams' update event names other than "update". Needed only over
   * EventSource, which cannot listen for names it is not told.
   */
  event?: string | string[];
  /** Backoff between attempts; the gateway's `retry:` replaces initialMs once received. */
  backoff?: { initialMs?: number; maxMs?: number };
  /** A connection with no byte (not even a keepalive) for this long is replaced. Default 45000; 0 = never. */
  idleTimeoutMs?: number;
  /** Default: "fetch" where fetch can stream, else "eventsource". */
  transport?: "fetch" | "eventsource";
  /** For tests: the fetch to use. */
  fetch?: typeof fetch;
  /** For tests: the timers for backoff and the idle timeout. */
  timers?: {
    setTimeout(fn: () => void, ms: number): unknown;
    clearTimeout(handle: unknown): void;
  };
}

export interface SubscribeOptions<R = Row> extends CommonOptions {
  /** After every snapshot and update, with the stream's rows (a new array each call). */
  onChange?(rows: R[], info: ChangeInfo<R>): void;
}

export interface MuxOptions<R = Row> extends CommonOptions {
  /** After every group, with the rows of every stream, keyed by path as subscribed. */
  onChange?(rows: Map<string, R[]>, info: GroupInfo<R>): void;
}

interface SubscriptionBase {
  /** The id of the last event applied; a reconnect resumes after it. */
  readonly lastEventId: string | null;
  /** The last status passed to onStatus. */
  readonly status: Status;
  /** Stops for good: no onEnd is called. */
  close(): void;
}

export interface Subscription<R = Row> extends SubscriptionBase {
  /**
   * The current rows, a new array each call. Diff streams: a row with count n
   * appears n times. Keyed streams: one row per key, in the order keys arrived.
   */
  rows(): R[];
}

export interface MuxSubscription<R = Row> extends SubscriptionBase {
  /** The current rows of one of the subscribed paths (as given to subscribe). */
  rows(path: string): R[];
}

/** One stream. */
export function subscribe<R = Row>(path: string, options?: SubscribeOptions<R>): Subscription<R>;
/** Several streams over one connection (`/_tailgate/mux`), consistent at every group. */
export function subscribe<R = Row>(paths: string[], options?: MuxOptions<R>): MuxSubscription<R>;

export interface ParsedEvent {
  /** The event name ("message" when none was given). */
  type: string;
  data: string;
  /** The event's own id line, if it had one (EventSource cannot tell this). */
  id: string | undefined;
  /** The last event id, carried over from earlier events as EventSource carries it. */
  lastEventId: string;
}

/** A WHATWG-conformant incremental `text/event-stream` parser over decoded text. */
export class EventStreamParser {
  constructor(handlers: {
    onEvent(event: ParsedEvent): void;
    onRetry?(ms: number): void;
    onComment?(text: string): void;
  });
  lastEventId: string;
  push(chunk: string): void;
}
