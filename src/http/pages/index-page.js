// The index page at `/`: the gateway's listing, fetched as JSON from the same
// URL (so a token in the query or a cookie applies as it does to the listing)
// and rendered by mountIndex(), plus the last failed reload for the operator.
import { mountIndex } from "./live.js";

const main = document.createElement("main");
document.body.replaceChildren(main);

function notice(heading, text) {
  const section = document.createElement("section");
  section.className = "tg tg-notice";
  const h2 = document.createElement("h2");
  h2.textContent = heading;
  const pre = document.createElement("pre");
  pre.textContent = text;
  section.append(h2, pre);
  document.body.append(section);
}

try {
  const response = await fetch(location.pathname + location.search, {
    headers: { accept: "application/json" },
    cache: "no-store",
  });
  if (!response.ok) throw new Error(`the gateway answered ${response.status}`);
  const listing = await response.json();
  mountIndex(main, listing.streams ?? []);
  const error = listing.config?.last_reload_error;
  if (error) notice(`The last reload of ${listing.config.path} failed; the running config is unchanged.`, error);
} catch (e) {
  notice("The list of streams could not be loaded.", String(e.message ?? e));
}
