// Types for live.js, the gateway's live table and index page.
import type { Row, SubscribeOptions, Subscription } from "./tailgate.js";

export interface LiveOptions extends SubscribeOptions {
  /** The page's heading; default: the path. */
  title?: string;
}

/** Renders a live table of one stream into `element`; destroy() stops it. */
export function mountLive(
  element: Element,
  path: string,
  options?: LiveOptions,
): { subscription: Subscription<Row>; destroy(): void };

/** One entry of the `streams` array of the gateway's `GET /`. */
export interface StreamListing {
  path: string;
  view?: string | null;
  query?: string | null;
  event?: string;
  key?: string[] | null;
  upstream?: "streaming" | "reconnecting";
  error?: string | null;
  clients?: number;
  /** A template's parameters; default: the `{name}`s of `path`. */
  params?: string[];
  /** The query filters the stream allows. */
  filters?: string[];
  columns?: string[];
}

/** Renders the list of streams, with a form for each template or filtered stream. */
export function mountIndex(element: Element, streams: StreamListing[]): void;
