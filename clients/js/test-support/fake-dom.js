// The smallest DOM that live.js needs, so its tests run in plain Node. It has
// no HTML parser at all: setting innerHTML or outerHTML throws, so a test
// passing here shows live.js builds every node from text.

class Text {
  constructor(data) {
    this.data = data;
  }

  get textContent() {
    return this.data;
  }
}

export class Element {
  childNodes = [];
  attributes = new Map();
  #listeners = new Map();

  constructor(doc, tag) {
    this.ownerDocument = doc;
    this.tagName = tag.toUpperCase();
  }

  setAttribute(name, value) {
    this.attributes.set(name, String(value));
  }

  getAttribute(name) {
    return this.attributes.get(name) ?? null;
  }

  removeAttribute(name) {
    this.attributes.delete(name);
  }

  append(...nodes) {
    for (const n of nodes) this.childNodes.push(typeof n === "string" ? new Text(n) : n);
  }

  replaceChildren(...nodes) {
    this.childNodes = [];
    this.append(...nodes);
  }

  get textContent() {
    return this.childNodes.map((n) => n.textContent).join("");
  }

  set textContent(value) {
    this.childNodes = value === "" ? [] : [new Text(String(value))];
  }

  set innerHTML(_) {
    throw new Error("innerHTML used");
  }

  set outerHTML(_) {
    throw new Error("outerHTML used");
  }

  insertAdjacentHTML() {
    throw new Error("insertAdjacentHTML used");
  }

  addEventListener(type, fn) {
    if (!this.#listeners.has(type)) this.#listeners.set(type, []);
    this.#listeners.get(type).push(fn);
  }

  /** Calls the listeners for `type`; returns whether one called preventDefault(). */
  dispatch(type) {
    let prevented = false;
    for (const fn of this.#listeners.get(type) ?? []) fn({ type, preventDefault: () => (prevented = true) });
    return prevented;
  }

  /** Every descendant element with the tag name, in document order. */
  all(tag) {
    const found = [];
    for (const n of this.childNodes) {
      if (!(n instanceof Element)) continue;
      if (n.tagName === tag.toUpperCase()) found.push(n);
      found.push(...n.all(tag));
    }
    return found;
  }

  /** Every text node's data below this element. */
  texts() {
    return this.childNodes.flatMap((n) => (n instanceof Element ? n.texts() : [n.data]));
  }
}

/**
 * A document whose requestAnimationFrame runs the frame on the next turn and
 * then calls `onFrame`, and whose location records assign() calls.
 */
export function fakeDocument({ onFrame = () => {} } = {}) {
  const doc = {
    createElement: (tag) => new Element(doc, tag),
    defaultView: {
      requestAnimationFrame: (fn) =>
        setImmediate(() => {
          fn();
          onFrame();
        }),
      setInterval: (fn, ms) => setInterval(fn, ms),
      clearInterval: (t) => clearInterval(t),
      location: { assigned: [], assign: (url) => doc.defaultView.location.assigned.push(url) },
    },
  };
  doc.head = new Element(doc, "head");
  doc.body = new Element(doc, "body");
  return doc;
}
