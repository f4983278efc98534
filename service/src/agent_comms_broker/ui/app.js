// agent-comms dashboard: plain JavaScript, no build step, no library. Every call goes
// through the broker's public API with the person's own token (kept in this tab's
// session storage only) or, without one, the agent name typed in the composer. What the
// broker sends is shown with textContent, never parsed as HTML.
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

// -- the live tail ------------------------------------------------------------------------

function messageNode(message) {
  const item = el("li", "message priority-" + message.priority);
  item.dataset.id = message.id;
  const head = el("div", "head");
  head.appendChild(el("span", "id", "#" + message.id));
  head.appendChild(el("span", "sender", message.sender));
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
  item.appendChild(el("div", "text", message.message));
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
      item.appendChild(el("span", "sender", " " + message.sender + ": "));
      item.appendChild(el("span", "text", message.message));
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
