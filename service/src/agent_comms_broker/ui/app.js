// agent-comms dashboard: plain JavaScript, no build step, no library. Every call goes
// through the broker's public API with the person's own token (kept in this tab's
// session storage only) or, without one, the agent name typed in the composer. What the
// broker sends is shown with textContent, never parsed as HTML. Signed messages are
// checked here, with the browser's own WebCrypto: the page need not trust the broker.
"use strict";

const TOKEN_KEY = "agent-comms-token";
const SENDER_KEY = "agent-comms-sender";
const THREAD_LIMIT = 100;
const state = {
  channel: null,
  tail: null, // the AbortController of the live tail
  lastId: 0, // the last message id the tail showed: where a reconnect resumes
  messages: new Map(), // id -> message, of the channel shown
  replyTo: null,
  unreachable: false, // the last reload could not reach the broker
  keys: new Map(), // agent -> the promise of the keys the broker lists for it (this page load)
  keysAsked: new Set(), // "agent key" pairs a listing was fetched again for (a key changed)
};

const $ = (id) => document.getElementById(id);

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

function headers(extra) {
  const result = Object.assign({}, extra);
  const secret = token();
  if (secret) result.Authorization = "Bearer " + secret;
  else if ($("sender").value.trim()) result["X-Agent-ID"] = $("sender").value.trim();
  return result;
}

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

// A refused call as an ApiError in the broker's own words; a 401 asks for a token.
async function refusal(reply) {
  const body = await reply.json().catch(() => null);
  if (reply.status === 401) askForToken();
  const why = body && body.error ? body.error : reply.statusText;
  return new ApiError(reply.status, reply.status + ": " + why);
}

async function api(path, options) {
  const init = Object.assign({}, options || {});
  init.headers = headers(init.headers);
  const reply = await fetch(path, init);
  if (!reply.ok) throw await refusal(reply);
  const type = reply.headers.get("Content-Type") || "";
  return type.startsWith("application/json") ? reply.json() : null;
}

function showError(error) {
  const box = $("error");
  if (!error) {
    box.hidden = true;
    box.textContent = "";
    return;
  }
  box.hidden = false;
  box.textContent = error.message || String(error);
}

function when(seconds) {
  if (!seconds) return "-";
  return new Date(seconds * 1000).toLocaleString();
}

function ago(seconds) {
  const gone = Math.max(0, Date.now() / 1000 - seconds);
  if (gone < 60) return Math.round(gone) + " s ago";
  if (gone < 3600) return Math.round(gone / 60) + " min ago";
  if (gone < 86400) return Math.round(gone / 3600) + " h ago";
  return Math.round(gone / 86400) + " d ago";
}

// -- the token ----------------------------------------------------------------------------

function askForToken() {
  const dialog = $("login-dialog");
  if (!dialog.open) dialog.showModal();
}

function showIdentity(status) {
  $("login").hidden = Boolean(token());
  $("logout").hidden = !token();
  $("sender-label").hidden = Boolean(token());
  $("who").textContent = status && status.agent ? "as " + status.agent : "";
}

// -- channels, with sparklines ------------------------------------------------------------

function sparkline(counts) {
  const svgNS = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(svgNS, "svg");
  svg.setAttribute("class", "spark");
  svg.setAttribute("viewBox", "0 0 60 16");
  svg.setAttribute("preserveAspectRatio", "none");
  svg.setAttribute("aria-hidden", "true");
  const top = Math.max(1, ...counts);
  const step = counts.length > 1 ? 60 / (counts.length - 1) : 60;
  const points = counts.map((count, i) => (i * step).toFixed(1) + "," + (15 - (count / top) * 14).toFixed(1));
  const line = document.createElementNS(svgNS, "polyline");
  line.setAttribute("points", points.join(" "));
  svg.appendChild(line);
  return svg;
}

async function loadChannels() {
  const [listing, activity] = await Promise.all([api("/channels"), api("/activity?minutes=60")]);
  const list = $("channels");
  list.replaceChildren();
  for (const channel of listing.channels) {
    const item = el("li");
    const link = el("a", state.channel === channel.name ? "current" : "", channel.name);
    link.href = "#/c/" + encodeURIComponent(channel.name);
    link.dataset.channel = channel.name;
    item.appendChild(link);
    item.appendChild(el("span", "count", String(channel.message_count)));
    if (channel.unread) item.appendChild(el("span", "unread", channel.unread + " unread"));
    item.appendChild(sparkline(activity.channels[channel.name] || new Array(60).fill(0)));
    list.appendChild(item);
  }
  if (!listing.channels.length) list.appendChild(el("li", "muted", "no channels yet"));
}

// -- signatures ---------------------------------------------------------------------------

// A message's signature is over the RFC 8785 (JSON Canonicalization Scheme) text of
// these fields (the broker's signing.py and agent-chat's keys.py make the same bytes).
const SIGNED_TYPE = "agent-comms/message";
const SEALED = "x25519-sealedbox";
const MARKS = {
  checking: "checking…",
  verified: "✓ verified",
  bad: "✗ BAD",
  unchecked: "not checked",
  unsigned: "",
};

// RFC 8785 text of a value parsed from JSON: JavaScript's own number and string forms,
// no spaces, each object's keys sorted by UTF-16 code units. Written out here rather than
// by JSON.stringify of a sorted copy: an object puts keys such as "10" before "9" itself.
function canonical(value) {
  if (Array.isArray(value)) return "[" + value.map(canonical).join(",") + "]";
  if (value !== null && typeof value === "object") {
    const keys = Object.keys(value).sort();
    return "{" + keys.map((key) => JSON.stringify(key) + ":" + canonical(value[key])).join(",") + "}";
  }
  return JSON.stringify(value);
}

function signedText(message, ts) {
  return canonical({
    type: SIGNED_TYPE,
    v: 1,
    channel: message.channel,
    sender: message.sender,
    message: message.message,
    reply_to: message.reply_to === undefined ? null : message.reply_to,
    priority: message.priority,
    tags: message.tags || [],
    meta: message.meta || {},
    ts: ts,
  });
}

// The bytes of a base64 string of `size` bytes, or null.
function unbase64(text, size) {
  if (typeof text !== "string" || text.length % 4 !== 0 || !/^[A-Za-z0-9+/]*={0,2}$/.test(text)) return null;
  let raw;
  try {
    raw = atob(text);
  } catch (error) {
    return null;
  }
  return raw.length === size ? Uint8Array.from(raw, (c) => c.charCodeAt(0)) : null;
}

// The keys the broker lists for an agent (current and replaced), fetched once a page load
// ([] if it published none); again only when a message comes signed with a key not listed.
function senderKeys(agent, key) {
  const pair = agent + " " + key;
  if (!state.keys.has(agent) || (key !== undefined && !state.keysAsked.has(pair))) {
    const fetching = api("/agents/" + encodeURIComponent(agent) + "/keys").then(
      (listing) => listing.keys || [],
      (error) => {
        if (error.status === 404) return [];
        if (state.keys.get(agent) === fetching) state.keys.delete(agent); // asked again next time
        throw error;
      }
    );
    state.keys.set(agent, fetching);
  }
  if (key !== undefined) state.keysAsked.add(pair);
  return state.keys.get(agent);
}

async function listedKey(agent, key) {
  const listed = (keys) => keys.find((entry) => entry.sign === key);
  const found = listed(await senderKeys(agent));
  return found || listed(await senderKeys(agent, key));
}

// The mark of a message's signature: [verified | bad | unchecked | unsigned, why].
async function checkSignature(message) {
  const envelope = message.signature;
  if (envelope === undefined || envelope === null) return ["unsigned", "this message carries no signature"];
  const form = typeof envelope === "object" && envelope.v === 1 && envelope.alg === "ed25519";
  const key = form ? unbase64(envelope.key, 32) : null;
  const signature = form ? unbase64(envelope.sig, 64) : null;
  if (!key || !signature || !Number.isSafeInteger(envelope.ts) || envelope.ts < 0) {
    return ["bad", "a malformed signature: not {v: 1, alg: ed25519, key, ts, sig} with a 32-byte key, 64-byte sig"];
  }
  if (!window.isSecureContext || !window.crypto || !crypto.subtle) {
    return [
      "unchecked",
      "Not checked: browsers check signatures (WebCrypto) only on a secure page, https or localhost, " +
        "and this one is " + location.origin,
    ];
  }
  let good;
  try {
    const publicKey = await crypto.subtle.importKey("raw", key, { name: "Ed25519" }, false, ["verify"]);
    const data = new TextEncoder().encode(signedText(message, envelope.ts));
    good = await crypto.subtle.verify({ name: "Ed25519" }, publicKey, signature, data);
  } catch (error) {
    if (error.name === "NotSupportedError") {
      return ["unchecked", "Not checked: this browser's WebCrypto has no Ed25519 (" + error.message + ")"];
    }
    return ["bad", "the signature's key is no Ed25519 key (" + error.name + ")"];
  }
  if (!good) return ["bad", "the signature does not check: this is not the message its signer signed"];
  let listed;
  try {
    listed = await listedKey(message.sender, envelope.key);
  } catch (error) {
    return ["unchecked", "Not checked: no answer for the keys of " + message.sender + " (" + error.message + ")"];
  }
  if (!listed) return ["bad", "signed with a key that " + message.sender + " never published: " + envelope.key];
  const which = listed.replaced
    ? "an earlier key of " + message.sender + ", replaced " + when(listed.replaced)
    : "the current key of " + message.sender;
  return ["verified", "signed with " + which + " (" + envelope.key + "), checked in this browser"];
}

function paintMark(mark, sig, why) {
  mark.dataset.sig = sig;
  mark.textContent = MARKS[sig];
  mark.title = why;
  mark.hidden = sig === "unsigned";
}

// A message's mark: painted at once if it is unsigned, else when the check ends (the
// page does not wait for it).
function signatureMark(message) {
  const mark = el("span", "sig");
  if (message.signature === undefined || message.signature === null) {
    paintMark(mark, "unsigned", "this message carries no signature");
    return mark;
  }
  paintMark(mark, "checking", "checking the signature");
  checkSignature(message).then(
    ([sig, why]) => paintMark(mark, sig, why),
    (error) => paintMark(mark, "unchecked", "Not checked: " + (error.message || String(error)))
  );
  return mark;
}

function sealedTo(message) {
  const sealed = message.meta && message.meta.sealed;
  return sealed && typeof sealed === "object" && sealed.alg === SEALED ? sealed : null;
}

// A message's text; a sealed one (its text is ciphertext only its recipient opens) says
// for whom instead.
function messageText(message, tag) {
  const sealed = sealedTo(message);
  if (!sealed) return el(tag, "text", message.message);
  const node = el(tag, "text sealed", "sealed for " + sealed.to);
  node.title = "a direct message sealed to the key of " + sealed.to + ": only it opens it (agent-chat read)";
  return node;
}

// -- the live tail ------------------------------------------------------------------------

function messageNode(message) {
  const item = el("li", "message priority-" + message.priority);
  item.dataset.id = message.id;
  const head = el("div", "head");
  head.appendChild(el("span", "id", "#" + message.id));
  head.appendChild(el("span", "sender", message.sender));
  head.appendChild(signatureMark(message));
  head.appendChild(el("time", "time", when(message.timestamp)));
  if (message.priority !== 3) head.appendChild(el("span", "badge", "priority " + message.priority));
  for (const tag of message.tags || []) head.appendChild(el("span", "tag", tag));
  if (message.task && message.task.state) {
    const holder = message.task.agent ? " by " + message.task.agent : "";
    head.appendChild(el("span", "badge task", "task " + message.task.state + holder));
  }
  const reply = el("button", "reply", "reply");
  reply.type = "button";
  reply.addEventListener("click", () => startReply(message));
  head.appendChild(reply);
  item.appendChild(head);
  item.appendChild(messageText(message, "div"));
  item.appendChild(el("ol", "replies"));
  return item;
}

function showMessage(message) {
  if (state.messages.has(message.id)) return;
  state.messages.set(message.id, message);
  state.lastId = Math.max(state.lastId, message.id);
  const node = messageNode(message);
  // A reply folds under the first message of its thread when that one is shown.
  const root = message.thread && message.thread !== message.id ? rootNode(message.thread) : null;
  if (root) {
    root.querySelector(".replies").appendChild(node);
    root.classList.add("has-replies");
  } else {
    $("messages").appendChild(node);
  }
  const list = $("messages");
  while (list.children.length > THREAD_LIMIT * 2) list.firstElementChild.remove();
  node.scrollIntoView({ block: "nearest" });
}

function rootNode(id) {
  return $("messages").querySelector('li.message[data-id="' + Number(id) + '"]');
}

function parseFrame(frame) {
  const event = { event: "message", data: "", id: null };
  for (const line of frame.split("\n")) {
    if (!line || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (field === "data") event.data += (event.data ? "\n" : "") + value;
    else if (field === "event") event.event = value;
    else if (field === "id") event.id = value;
  }
  return event;
}

// EventSource cannot send an Authorization header: the stream is read with fetch, and a
// dropped stream (a broker restart) resumes from the last id shown (Last-Event-ID).
async function tail(channel) {
  const control = new AbortController();
  state.tail = control;
  while (!control.signal.aborted) {
    try {
      const extra = { Accept: "text/event-stream" };
      if (state.lastId) extra["Last-Event-ID"] = String(state.lastId);
      const reply = await fetch("/stream/" + encodeURIComponent(channel), {
        headers: headers(extra),
        signal: control.signal,
      });
      if (!reply.ok) {
        showError(await refusal(reply));
        if (reply.status === 401 || reply.status === 403 || reply.status === 400) return;
      } else {
        $("tail-panel").classList.add("live");
        const reader = reply.body.getReader();
        const decoder = new TextDecoder();
        let buffer = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer += decoder.decode(value, { stream: true });
          let end;
          while ((end = buffer.indexOf("\n\n")) >= 0) {
            const event = parseFrame(buffer.slice(0, end));
            buffer = buffer.slice(end + 2);
            if (event.event === "message" && event.data) showMessage(JSON.parse(event.data));
          }
        }
      }
    } catch (error) {
      if (control.signal.aborted) return;
    }
    $("tail-panel").classList.remove("live");
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }
}

async function openChannel(channel) {
  if (state.tail) state.tail.abort();
  state.channel = channel;
  state.messages.clear();
  state.lastId = 0;
  cancelReply();
  $("messages").replaceChildren();
  $("tail-title").textContent = channel;
  $("composer").hidden = false;
  for (const link of document.querySelectorAll("#channels a")) {
    link.classList.toggle("current", link.dataset.channel === channel);
  }
  try {
    const page = await api("/messages/" + encodeURIComponent(channel) + "?limit=" + THREAD_LIMIT);
    showError(null);
    for (const message of page.messages) showMessage(message);
    state.lastId = Math.max(state.lastId, page.cursor);
  } catch (error) {
    showError(error);
    $("composer").hidden = true;
    return;
  }
  tail(channel);
}

// -- the composer -------------------------------------------------------------------------

function startReply(message) {
  state.replyTo = message.id;
  $("reply-to").textContent = "#" + message.id + " (" + message.sender + ")";
  $("replying").hidden = false;
  $("text").focus();
}

function cancelReply() {
  state.replyTo = null;
  $("replying").hidden = true;
}

async function send(event) {
  event.preventDefault();
  const text = $("text").value;
  if (!text.trim() || !state.channel) return;
  const body = { message: text };
  if (!token()) body.sender = $("sender").value.trim() || "dashboard";
  if (state.replyTo) body.reply_to = state.replyTo;
  try {
    await api("/messages/" + encodeURIComponent(state.channel), {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    $("text").value = "";
    cancelReply();
    showError(null);
  } catch (error) {
    showError(error);
  }
}

// -- agents and queues --------------------------------------------------------------------

async function loadAgents() {
  const listing = await api("/agents");
  const list = $("agents");
  list.replaceChildren();
  const agents = listing.agents.slice().sort((a, b) => b.last_seen - a.last_seen);
  for (const agent of agents) {
    const item = el("li", agent.status === "online" ? "online" : "offline");
    item.appendChild(el("span", "dot"));
    item.appendChild(el("span", "name", agent.id));
    item.appendChild(el("span", "muted", agent.status + ", " + ago(agent.last_seen)));
    list.appendChild(item);
  }
  if (!agents.length) list.appendChild(el("li", "muted", "no agents yet"));
}

// The counts come with /queues; who holds which task only from the queues that have
// claimed tasks.
async function loadQueues() {
  const listing = await api("/queues");
  const box = $("queues");
  const views = await Promise.all(
    listing.queues.map(async (q) => {
      const claimed = q.counts.claimed ? (await api("/queue/" + encodeURIComponent(q.channel))).claimed : [];
      return [q.channel, { counts: q.counts, claimed }];
    })
  );
  box.replaceChildren();
  for (const [channel, view] of views) {
    const section = el("div", "queue");
    section.dataset.channel = channel;
    section.appendChild(el("h3", "", channel));
    const counts = el("p", "counts");
    for (const name of ["pending", "claimed", "done", "dead"]) {
      const count = el("span", "state " + name, name + " " + (view.counts[name] || 0));
      count.dataset.state = name;
      count.dataset.count = view.counts[name] || 0;
      counts.appendChild(count);
    }
    section.appendChild(counts);
    const claimed = el("ul", "claimed");
    for (const task of view.claimed) {
      const item = el("li", "", "#" + task.id + " held by " + task.agent + ", ");
      const left = el("span", "lease");
      left.dataset.expires = task.expires;
      item.appendChild(left);
      claimed.appendChild(item);
    }
    section.appendChild(claimed);
    box.appendChild(section);
  }
  if (!views.length) box.appendChild(el("p", "muted", "no queues yet"));
  countdown();
}

function countdown() {
  for (const left of document.querySelectorAll(".lease")) {
    const seconds = Math.max(0, Number(left.dataset.expires) - Date.now() / 1000);
    left.textContent = "lease " + Math.floor(seconds) + " s left";
  }
}

// -- search -------------------------------------------------------------------------------

async function search(event) {
  event.preventDefault();
  const query = $("search").value.trim();
  if (!query) return;
  try {
    const found = await api("/search?q=" + encodeURIComponent(query) + "&limit=50");
    $("search-query").textContent = query;
    const list = $("found");
    list.replaceChildren();
    for (const message of found.messages) {
      const item = el("li", "found");
      const link = el("a", "", message.channel + " #" + message.id);
      link.href = "#/c/" + encodeURIComponent(message.channel);
      item.appendChild(link);
      item.appendChild(el("span", "sender", " " + message.sender));
      item.appendChild(signatureMark(message));
      item.appendChild(document.createTextNode(": "));
      item.appendChild(messageText(message, "span"));
      list.appendChild(item);
    }
    if (!found.messages.length) list.appendChild(el("li", "muted", "nothing found"));
    $("search-results").hidden = false;
    showError(null);
  } catch (error) {
    showError(error);
  }
}

// -- start --------------------------------------------------------------------------------

function route() {
  const match = location.hash.match(/^#\/c\/(.+)$/);
  if (match) openChannel(decodeURIComponent(match[1]));
}

// Reload a panel `ms` after its last reload ended: a slow broker gets no pile of reloads
// (setInterval would start one every `ms` while the others still wait).
async function every(ms, what) {
  for (;;) {
    await new Promise((resolve) => setTimeout(resolve, ms));
    await refresh(what);
  }
}

// A panel's periodic reload: a refusal or an unreachable broker is shown, and cleared by
// the next reload that works.
async function refresh(what) {
  try {
    await what();
    if (state.unreachable) {
      state.unreachable = false;
      showError(null);
    }
  } catch (error) {
    if (error instanceof ApiError) {
      showError(error);
    } else {
      state.unreachable = true;
      showError(new Error("broker unreachable: " + error.message + " (trying again)"));
    }
  }
}

async function start() {
  $("sender").value = sessionStorage.getItem(SENDER_KEY) || "dashboard";
  $("sender").addEventListener("change", () => sessionStorage.setItem(SENDER_KEY, $("sender").value.trim()));
  $("login").addEventListener("click", askForToken);
  $("logout").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    location.reload();
  });
  $("login-cancel").addEventListener("click", () => $("login-dialog").close());
  $("login-form").addEventListener("submit", () => {
    sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
    $("token").value = "";
    location.reload();
  });
  $("composer").addEventListener("submit", send);
  $("reply-cancel").addEventListener("click", cancelReply);
  $("search-form").addEventListener("submit", search);
  $("search-close").addEventListener("click", () => {
    $("search-results").hidden = true;
  });
  window.addEventListener("hashchange", route);

  let status = null;
  try {
    status = await api("/status");
  } catch (error) {
    showError(error);
  }
  if (status) {
    $("broker").textContent = "v" + status.version + ", " + status.auth;
    if (status.search === false) $("search-form").hidden = true; // AGENT_COMMS_SEARCH=off
  }
  showIdentity(status);
  if (status && status.auth === "required" && !token()) {
    askForToken(); // nothing to show before it: every read wants a token
    return;
  }
  await Promise.all([refresh(loadChannels), refresh(loadAgents), refresh(loadQueues)]);
  route();
  every(5000, loadChannels);
  every(5000, loadAgents);
  every(1000, loadQueues);
  setInterval(countdown, 1000);
}

document.addEventListener("DOMContentLoaded", start);
