// The live page of a stream: the gateway serves the same static page at every
// stream's path to a browser that navigates there, and this script opens the
// stream the page's own URL names (query filters included). The request carries
// the browser's cookies, so with access control the stream, not the page, is what
// a token must open.
import { mountLive } from "./live.js";

const path = location.pathname + location.search;
document.title = `${decodeURIComponent(location.pathname)} · tailgate`;
const back = document.createElement("a");
back.href = "/";
back.textContent = "all streams";
const nav = document.createElement("nav");
nav.className = "tg tg-nav";
nav.append(back);
const main = document.createElement("main");
document.body.replaceChildren(nav, main);
mountLive(main, path);
