// The chatd page, built on the reference WebSocketClient (websocket-client.js,
// the protocol document's class, loaded unchanged before this file). No build
// step, no third-party code.
//
// Everything shown comes from the network and is shown as text: the DOM is
// built with createElement/textContent only, never innerHTML.
//
// Read state: unread badges per room and conversation (counts from the server:
// join_room_ack, unread_counts, mark_read_ack, read_marker; raised by messages
// arriving meanwhile), the open conversation marked read while the page is
// visible and shows its newest message, "Seen" from read receipts. Also typing
// indicators, @name mentions, and the other party's last seen (presence_query).
//
// Edits and deletions: the user's own messages have Edit (an inline input:
// Enter saves, Escape cancels) and Delete (confirmed inline: no dialogs);
// message_edited / message_deleted re-render the row in place, "(edited)"
// or a "message deleted" tombstone, as history shows them. Each conversation
// keeps its messages by id for this, and its "last id" for since_id counts
// these events too, so a reconnection replays the ones missed.
//
// Search: a box above the notifications sends `search` (everything the user
// may read, or only the conversation shown) and lists the matches newest
// first, "More" asking for older ones (before_id); a click on a match opens
// its room or conversation and, once the message is shown there, scrolls to
// it and highlights it. The answer, results or error, is told apart from
// other frames by its request_id (ChatClient.request).
'use strict';

const PAGE_SIZE = 50;
const TOKEN_KEY = 'chatd.token';
// Typing: a start is renewed this often while the user types; someone else's
// start is forgotten after TYPING_FORGET ms without a renewal (the server
// sends a stop itself after 6 s: this only covers a stop that never came).
const TYPING_RENEW = 3000;
const TYPING_FORGET = 10000;
// The header's "last seen" of the open conversation is asked again this often.
const PRESENCE_REFRESH = 30000;
// Matches asked for at a time (the server's default; at most 50).
const SEARCH_PAGE = 20;
const $ = (id) => document.getElementById(id);

// The reference class hard-codes ws://localhost:8080. ChatClient overrides
// connect(), with the reference body unchanged except for two things: the
// URL comes from `location` (ws: or wss: as the page, the token URL-encoded), and
// onopen / onclose also call this.onOpen / this.onClose, so that the page can
// re-join its rooms after a reconnection and show the connection state.
// Reconnecting (5 attempts, growing delays) is still the reference handleReconnect.
// It adds request(): a frame sent with a request_id, whose answer (the frame
// echoing that id: a result or an error) goes to the callback given rather
// than to the handler of its type; the reference send() has no request_id.
class ChatClient extends WebSocketClient {
    constructor(token) {
        super(token);
        this.requests = 0;       // request_ids given so far
        this.pending = new Map(); // request_id -> callback(frame)
    }

    // Sends `type` with a fresh request_id; returns the id (null when not
    // connected: nothing was sent, and the callback will not be called).
    request(type, data, callback) {
        if (!this.ws || this.ws.readyState !== WebSocket.OPEN) return null;
        const requestId = `page-${++this.requests}`;
        this.pending.set(requestId, callback);
        this.ws.send(JSON.stringify({ type, data, request_id: requestId, timestamp: new Date().toISOString() }));
        return requestId;
    }

    handleMessage(message) {
        const callback = message.request_id !== undefined && this.pending.get(message.request_id);
        if (callback) {
            this.pending.delete(message.request_id);
            callback(message);
            return;
        }
        super.handleMessage(message);
    }

    connect() {
        const scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
        this.ws = new WebSocket(`${scheme}//${location.host}/ws/chat?token=${encodeURIComponent(this.token)}`);

        this.ws.onopen = () => {
            console.log('WebSocket connecté');
            this.reconnectAttempts = 0;
            if (this.onOpen) this.onOpen();
        };

        this.ws.onmessage = (event) => {
            const message = JSON.parse(event.data);
            this.handleMessage(message);
        };

        this.ws.onclose = (event) => {
            console.log('WebSocket fermé:', event.code, event.reason);
            if (this.onClose) this.onClose(event);
            this.handleReconnect();
        };

        this.ws.onerror = (error) => {
            console.error('Erreur WebSocket:', error);
        };
    }
}

// --- state ---------------------------------------------------------------------

let client = null;      // the ChatClient of the signed-in user
let me = null;          // {id, name}
let opened = false;     // has this login been connected once (then: a reconnection)
let current = null;     // key of the conversation shown
const convs = new Map(); // 'room:NAME' | 'dm:ID' -> conversation
// The user's notifications (the conversation with user 0), shown in their own
// list; shaped as a conversation so that a deletion re-renders a row alike.
const notices = { key: 'notices', kind: 'notices', list: $('notifications'), messages: new Map() };
let typingIn = null;    // {key, at}: where this user was last said to be typing
let presenceTimer = null;
let markTimer = null;   // a scheduled markRead
let editing = null;     // {key, id}: the message whose inline editor is open
let search = null;      // the search shown: its query and scope, the request awaited, where "More" goes on
let jumpTo = null;      // {key, id}: a match clicked, to show once its conversation has it

function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    for (const c of children) node.append(c); // strings become text nodes
    return node;
}

function setStatus(text, kind = 'info') {
    const status = $('status');
    status.textContent = text;
    status.dataset.kind = kind;
}

// --- sign in ---------------------------------------------------------------

// The token's claims, read (not verified) for the user's id and name.
function claims(token) {
    try {
        const part = token.split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
        const json = new TextDecoder().decode(Uint8Array.from(atob(part), (c) => c.charCodeAt(0)));
        return JSON.parse(json);
    } catch (e) {
        return {};
    }
}

function login(token) {
    const c = claims(token);
    const id = Number(c.user_id ?? (/^\d+$/.test(c.sub ?? '') ? c.sub : NaN));
    me = { id: Number.isSafeInteger(id) ? id : null, name: String(c.username ?? (id ? `user${id}` : '?')) };
    sessionStorage.setItem(TOKEN_KEY, token);
    $('whoami').textContent = me.id === null ? me.name : `${me.name} (#${me.id})`;
    $('whoami').dataset.userId = me.id ?? '';
    $('login').hidden = true;
    $('chat').hidden = false;
    $('logout').hidden = false;
    opened = false;
    addRoom('general');
    show('room:general');
    client = new ChatClient(token);
    for (const [type, handler] of Object.entries(handlers)) client.onMessage(type, handler);
    client.onOpen = onOpen;
    client.onClose = onClose;
    setStatus('Connecting…');
    client.connect();
    clearInterval(presenceTimer);
    presenceTimer = setInterval(queryPresence, PRESENCE_REFRESH);
}

function logout(message) {
    if (client) {
        client.maxReconnectAttempts = 0; // the reference client reconnects on every close
        client.onOpen = client.onClose = null;
        client.messageHandlers.clear();
        client.disconnect();
        client = null;
    }
    sessionStorage.removeItem(TOKEN_KEY);
    for (const id of ['room-list', 'dm-list', 'online-list', 'views', 'notifications']) {
        $(id).replaceChildren();
    }
    for (const conv of convs.values()) forgetTypists(conv);
    convs.clear();
    notices.messages.clear();
    current = null;
    editing = null;
    typingIn = null;
    jumpTo = null;
    clearSearch();
    $('search-input').value = '';
    $('search-here').checked = false;
    clearInterval(presenceTimer);
    clearTimeout(markTimer);
    presenceTimer = markTimer = null;
    renderTyping();
    renderPresence();
    renderTotal();
    $('whoami').textContent = '';
    $('chat').hidden = true;
    $('logout').hidden = true;
    $('login').hidden = false;
    setStatus(message || 'Signed out.', message ? 'error' : 'info');
}

async function devToken(username) {
    const res = await fetch('/dev/token', {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ username }),
    });
    const body = await res.json().catch(() => ({}));
    if (!res.ok) throw new Error(body.error || `HTTP ${res.status}`);
    return body.token;
}

// Development servers answer POST /dev/token (400 to an empty request).
async function probeDevTokens() {
    try {
        const res = await fetch('/dev/token', { method: 'POST', body: '{}' });
        $('dev-form').hidden = res.status !== 400;
    } catch (e) {
        $('dev-form').hidden = true;
    }
}

// --- connection ----------------------------------------------------------------

function onOpen() {
    setStatus(opened ? 'Reconnected.' : 'Connected.', 'ok');
    // The user's notifications are the conversation with user 0, the system.
    client.send('dm_history', { with_user: 0, limit: 20, offset: 0 });
    for (const conv of convs.values()) {
        if (conv.kind === 'room') {
            const data = { room: conv.name };
            // After a reconnection: everything after the last message seen.
            if (opened && conv.lastId !== null) data.since_id = conv.lastId;
            client.send('join_room', data);
        } else if (opened) {
            client.send('dm_history', { with_user: conv.userId, limit: PAGE_SIZE, offset: 0 });
        }
    }
    // Unread counts of every room and conversation (answered after the joins:
    // a connection's frames are handled in order).
    client.send('unread', {});
    queryPresence();
    opened = true;
}

function onClose(event) {
    // The answers awaited will not come on the next connection.
    client.pending.clear();
    searchLost();
    if (event.code === 4001) return; // AUTH_FAILED, already shown
    for (const conv of convs.values()) {
        if (conv.kind === 'room') {
            conv.members.clear();
            conv.joined = false;
        }
        conv.sentReadId = conv.lastReadId; // a mark_read sent may have been lost
        forgetTypists(conv);
    }
    typingIn = null;
    renderOnline();
    renderTyping();
    if (client.reconnectAttempts < client.maxReconnectAttempts) {
        setStatus(`Disconnected (${event.code}); reconnecting (attempt ${client.reconnectAttempts + 1})…`, 'error');
    } else {
        setStatus('Disconnected. Reload the page to try again.', 'error');
    }
}

// --- conversations ---------------------------------------------------------

function conversation(key, kind, fields) {
    let conv = convs.get(key);
    if (conv) return conv;
    const list = el('ol', { class: 'messages', 'data-testid': 'messages', 'data-conv': key });
    list.hidden = true;
    $('views').append(list);
    const label = el('span', { class: 'label' });
    const badge = el('span', { class: 'badge', 'data-testid': 'unread-badge' });
    badge.hidden = true;
    const button = el('button', { type: 'button', 'data-conv': key }, label, badge);
    button.addEventListener('click', () => show(key));
    const li = el('li', {}, button);
    $(kind === 'room' ? 'room-list' : 'dm-list').append(li);
    conv = {
        key, kind, list, button, label, badge, li, lastId: null, hasMore: true, loaded: false,
        // The messages shown, by id (kept to re-render a row edited or deleted).
        messages: new Map(),
        // Read state: this user's marker (lastReadId), the newest id sent in a
        // mark_read (sentReadId), the newest id the unread count accounts for
        // (countedId), the counts; in a conversation, how far the other party
        // has read (peerReadId) and whether they are online (presence).
        lastReadId: 0, sentReadId: 0, countedId: 0, unread: 0, mentions: 0,
        peerReadId: 0, presence: null,
        typists: new Map(), // user id -> {name, timer}: who is typing here
        joined: false,
        ...fields,
    };
    convs.set(key, conv);
    retitle(conv);
    return conv;
}

function addRoom(name) {
    return conversation(`room:${name}`, 'room', { name, members: new Map() });
}

function addDm(userId, username) {
    const conv = conversation(`dm:${userId}`, 'dm', { userId, username: username || null });
    if (username && conv.username !== username) {
        conv.username = username;
        retitle(conv);
    }
    return conv;
}

function retitle(conv) {
    conv.title = conv.kind === 'room' ? `# ${conv.name}` : `${conv.username || 'user'} (#${conv.userId})`;
    conv.label.textContent = conv.title;
    if (conv.key === current) $('view-title').textContent = conv.title;
}

function removeConv(conv) {
    conv.list.remove();
    conv.li.remove();
    forgetTypists(conv);
    convs.delete(conv.key);
    renderTotal();
    if (current === conv.key) show('room:general');
}

function show(key) {
    const conv = convs.get(key) || addRoom('general');
    if (typingIn && typingIn.key !== conv.key) stopTyping();
    if (jumpTo && jumpTo.key !== conv.key) jumpTo = null;
    current = conv.key;
    for (const c of convs.values()) {
        c.list.hidden = c !== conv;
        c.button.setAttribute('aria-current', c === conv ? 'true' : 'false');
    }
    $('view-title').textContent = conv.title;
    if (conv.kind === 'dm' && !conv.loaded && client) {
        client.send('dm_history', { with_user: conv.userId, limit: PAGE_SIZE, offset: 0 });
    }
    renderOlder();
    renderOnline();
    renderTyping();
    renderPresence();
    if (conv.kind === 'dm') queryPresence();
    $('views').scrollTop = $('views').scrollHeight;
    scheduleMarkRead();
}

function renderOlder() {
    const conv = convs.get(current);
    $('load-older').hidden = !conv || !conv.loaded || !conv.hasMore;
}

function renderOnline() {
    const conv = convs.get(current);
    const list = $('online-list');
    list.replaceChildren();
    $('online-title').hidden = list.hidden = !conv || conv.kind !== 'room';
    if (list.hidden) return;
    const members = [...conv.members].sort((a, b) => a[1].localeCompare(b[1]));
    for (const [id, name] of members) {
        const label = `${name} (#${id})`;
        let entry = label;
        if (id !== me.id) { // another member: a click opens the conversation with them
            entry = el('button', { type: 'button', title: `Write to ${name}` }, label);
            entry.addEventListener('click', () => show(addDm(id, name).key));
        }
        const item = el('li', { 'data-testid': 'online-user', 'data-user-id': String(id) }, entry);
        // A moderator or owner acts on the others (the server says who may act on whom).
        if (id !== me.id && MODERATES.has(conv.role)) {
            for (const [action, text, extra] of MODERATION) {
                const tool = el('button', {
                    type: 'button', class: 'moderate', 'data-testid': action,
                    title: `${text}: ${name}`,
                }, text);
                tool.addEventListener('click', () => moderate(conv, action, id, extra));
                item.append(' ', tool);
            }
        }
        list.append(item);
    }
}

// --- moderation ------------------------------------------------------------------

const MODERATES = new Set(['owner', 'moderator']);
// The member list's tools: the action, its label, and what it sends besides.
const MODERATION = [
    ['kick', 'Kick', {}],
    ['mute', 'Mute 10 min', { duration_seconds: 600 }],
    ['ban', 'Ban 1 h', { duration_seconds: 3600 }],
];

function moderate(conv, action, userId, extra) {
    if (!connected()) {
        setStatus('Not connected: nothing was done.', 'error');
        return;
    }
    client.send(action, { room: conv.name, user_id: userId, ...extra });
}

function until(when) {
    return when ? ` until ${new Date(when).toLocaleString()}` : '';
}

// --- read state: unread badges, marking read, "Seen" ---------------------------

function visible() {
    return document.visibilityState === 'visible';
}

// The view shows its newest message (the reader is not scrolled up).
function atBottom() {
    const views = $('views');
    return views.scrollHeight - views.scrollTop - views.clientHeight < 40;
}

function newestId(conv) {
    let newest = 0;
    for (const id of conv.messages.keys()) if (id > newest) newest = id;
    return newest;
}

function renderBadge(conv) {
    const { badge, unread, mentions } = conv;
    badge.hidden = !(unread > 0);
    badge.textContent = unread > 0 ? (unread > 99 ? '99+' : String(unread)) : '';
    badge.dataset.unread = String(unread);
    badge.dataset.mentions = String(mentions);
    badge.classList.toggle('mention', mentions > 0);
    badge.title = unread > 0
        ? `${unread} unread${mentions > 0 ? `, ${mentions} mentioning you` : ''}` : '';
    conv.button.classList.toggle('unread', unread > 0);
    renderTotal();
}

function renderTotal() {
    let total = 0;
    for (const conv of convs.values()) total += conv.unread;
    document.title = total > 0 ? `(${total}) chatd` : 'chatd';
}

// Counts from the server (join_room_ack, unread_counts, mark_read_ack,
// read_marker): they replace the page's, unless a newer mark_read is on its
// way (its answer will tell).
function applyCounts(conv, counts) {
    const readId = counts.last_read_id ?? 0;
    conv.lastReadId = Math.max(conv.lastReadId, readId);
    conv.sentReadId = Math.max(conv.sentReadId, conv.lastReadId);
    conv.countedId = Math.max(conv.countedId, counts.last_message_id ?? readId);
    if (readId < conv.sentReadId) return;
    if (conv.key === current && visible() && atBottom()) { // read as it comes
        conv.unread = conv.mentions = 0;
        renderBadge(conv);
        scheduleMarkRead();
        return;
    }
    conv.unread = counts.unread ?? 0;
    conv.mentions = counts.mentions ?? 0;
    renderBadge(conv);
}

function mentionsMe(m) {
    return Array.isArray(m.mentions) && me.id !== null && m.mentions.includes(me.id);
}

// A message delivered live (not history): one more unread unless it is this
// user's own (which moved their marker) or about to be marked read.
function countLive(conv, m) {
    const from = m.user_id ?? m.from_user_id;
    if (from === me.id) {
        conv.lastReadId = Math.max(conv.lastReadId, m.id);
        conv.sentReadId = Math.max(conv.sentReadId, m.id);
        conv.countedId = Math.max(conv.countedId, m.id);
        conv.unread = conv.mentions = 0;
        renderBadge(conv);
        return;
    }
    if (m.id <= conv.countedId || m.id <= conv.lastReadId) return;
    conv.countedId = m.id;
    if (conv.key === current && visible() && atBottom()) return; // read at once
    conv.unread += 1;
    if (mentionsMe(m)) conv.mentions += 1;
    renderBadge(conv);
}

// Mark the open conversation read up to its newest message, once the page
// is visible and shows it. Scheduled, so that a page of history or a burst
// of messages is one mark_read, and at most one a second: in a busy room a
// mark_read per message would cost the server a frame per member and
// message, and the badge of the open conversation stays clear meanwhile.
const MARK_EVERY = 1000; // ms
let lastMark = 0;        // when the last mark_read was sent (Date.now())

function scheduleMarkRead() {
    if (markTimer !== null) return;
    markTimer = setTimeout(markRead, Math.max(0, lastMark + MARK_EVERY - Date.now()));
}

function markRead() {
    markTimer = null;
    const conv = convs.get(current);
    if (!conv || !client || !client.ws || client.ws.readyState !== WebSocket.OPEN) return;
    if (!visible() || !atBottom()) return;
    if (conv.kind === 'room' && !conv.joined) return; // the server would refuse it
    const newest = newestId(conv);
    if (newest <= conv.sentReadId) return;
    conv.sentReadId = newest;
    lastMark = Date.now();
    if (newest >= conv.countedId) { // shown now: nothing left unread
        conv.unread = conv.mentions = 0;
        renderBadge(conv);
    }
    const where = conv.kind === 'room' ? { room: conv.name } : { with_user: conv.userId };
    client.send('mark_read', { ...where, message_id: newest });
}

// "Seen" under this user's newest direct message the other party has read.
function renderSeen(conv) {
    if (conv.kind !== 'dm') return;
    let seen = null;
    for (let li = conv.list.lastElementChild; li; li = li.previousElementSibling) {
        if (li.dataset.mine === 'true' && Number(li.dataset.id) <= conv.peerReadId) {
            seen = li;
            break;
        }
    }
    const old = conv.list.querySelector('.seen');
    if (old && old.parentElement === seen) return;
    if (old) old.remove();
    if (seen) seen.append(el('span', { class: 'seen', 'data-testid': 'seen' }, 'Seen'));
}

// --- typing ------------------------------------------------------------------

function typingTarget(conv) {
    return conv.kind === 'room' ? { room: conv.name } : { to_user_id: conv.userId };
}

function connected() {
    return client && client.ws && client.ws.readyState === WebSocket.OPEN;
}

// The composer changed: say that this user types (renewed every few
// seconds), or that they stopped when the input is empty.
function onComposerInput() {
    const conv = convs.get(current);
    if (!conv || !connected()) return;
    if (!$('message-input').value.trim()) {
        stopTyping();
        return;
    }
    if (conv.kind === 'room' && !conv.joined) return;
    if (typingIn && typingIn.key !== conv.key) stopTyping();
    const now = Date.now();
    if (typingIn && now - typingIn.at < TYPING_RENEW) return;
    client.send('typing', { ...typingTarget(conv), state: 'start' });
    typingIn = { key: conv.key, at: now };
}

function stopTyping() {
    if (!typingIn) return;
    const conv = convs.get(typingIn.key);
    typingIn = null;
    if (conv && connected()) client.send('typing', { ...typingTarget(conv), state: 'stop' });
}

function setTypist(conv, userId, name, typing) {
    const old = conv.typists.get(userId);
    if (old) clearTimeout(old.timer);
    if (typing) {
        const timer = setTimeout(() => setTypist(conv, userId, name, false), TYPING_FORGET);
        conv.typists.set(userId, { name, timer });
    } else {
        conv.typists.delete(userId);
    }
    if (conv.key === current) renderTyping();
}

function forgetTypists(conv) {
    for (const t of conv.typists.values()) clearTimeout(t.timer);
    conv.typists.clear();
}

function renderTyping() {
    const conv = convs.get(current);
    const names = conv ? [...conv.typists.values()].map((t) => t.name) : [];
    let text = '';
    if (names.length === 1) text = `${names[0]} is typing…`;
    else if (names.length === 2) text = `${names[0]} and ${names[1]} are typing…`;
    else if (names.length > 2) text = `${names.length} people are typing…`;
    $('typing').textContent = text;
}

// --- presence of the other party ----------------------------------------------

function queryPresence() {
    const conv = convs.get(current);
    if (conv && conv.kind === 'dm' && connected() && visible()) {
        client.send('presence_query', { user_ids: [conv.userId] });
    }
}

function renderPresence() {
    const conv = convs.get(current);
    const node = $('view-presence');
    node.replaceChildren();
    node.hidden = !conv || conv.kind !== 'dm' || !conv.presence;
    if (node.hidden) return;
    const { online, last_seen: lastSeen } = conv.presence;
    node.dataset.online = String(online);
    if (online) {
        node.textContent = 'online';
        return;
    }
    const when = new Date(lastSeen);
    if (!lastSeen || isNaN(when)) {
        node.textContent = 'offline';
        return;
    }
    const time = when.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
    const day = when.toDateString() === new Date().toDateString() ? 'today' : when.toLocaleDateString();
    node.append('last seen ', el('time', { datetime: lastSeen, title: lastSeen }, `${day} at ${time}`));
}

// --- messages --------------------------------------------------------------

function safeMediaUrl(url) {
    return typeof url === 'string' && /^(\/(?!\/)|https?:\/\/)/i.test(url) ? url : null;
}

function renderMessage(m, notification) {
    const li = el('li', { class: 'message', 'data-testid': 'message', 'data-id': String(m.id) });
    const from = m.user_id ?? m.from_user_id;
    const who = notification ? 'notification' : (m.username ?? m.from_username ?? `user${from}`);
    if (!notification && me.id !== null && from === me.id) li.dataset.mine = 'true';
    if (!notification && mentionsMe(m)) {
        li.classList.add('mention');
        li.dataset.mention = 'true';
    }
    const when = new Date(m.created_at);
    const time = el('time', { datetime: m.created_at, title: m.created_at },
        isNaN(when) ? '' : when.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' }));
    li.append(el('span', { class: 'meta' }, el('strong', { class: 'user' }, who), ' ', time), ' ');
    if (notification) li.classList.add('notification');
    if (m.deleted) { // a tombstone keeps the message's place, and nothing of what it said
        li.classList.add('deleted');
        li.append(el('span', { class: 'tombstone', 'data-testid': 'tombstone' }, 'message deleted'));
        return li;
    }
    if (m.message_type && m.message_type !== 'text' && !notification) {
        li.append(el('span', { class: 'kind' }, `[${m.message_type}]`), ' ');
    }
    if (m.reply_to) li.append(el('span', { class: 'reply' }, `↪ #${m.reply_to}`), ' ');
    li.append(el('span', { class: 'content', 'data-testid': 'content' }, m.content ?? ''));
    if (m.edited_at) {
        li.append(' ', el('span', { class: 'edited', 'data-testid': 'edited', title: m.edited_at }, '(edited)'));
    }
    const url = safeMediaUrl(m.media_url);
    if (url) {
        li.append(' ', el('a', { href: url, rel: 'noopener noreferrer', target: '_blank', class: 'media' },
            m.media_type ? `media (${m.media_type})` : 'media'));
    }
    if (m.data !== undefined && m.data !== null) {
        li.append(' ', el('code', { class: 'data' }, JSON.stringify(m.data)));
    }
    // The server lets only the author edit or delete, and never a reaction's text.
    if (li.dataset.mine === 'true' && m.message_type !== 'reaction') li.append(' ', renderActions());
    return li;
}

function actionButton(action, label, title) {
    return el('button', { type: 'button', class: 'action', 'data-action': action, 'data-testid': action, title }, label);
}

// Edit and Delete; their clicks are handled once for all rows (onRowAction).
function renderActions() {
    return el('span', { class: 'actions' },
        actionButton('edit', 'Edit', 'Edit this message'),
        actionButton('delete', 'Delete', 'Delete this message'));
}

// Kept as shown: a notification, live or from history, as message_type
// 'notification' (how history has it), so that a re-render knows it.
function kept(m, notification) {
    return notification && m.message_type !== 'notification' ? { ...m, message_type: 'notification' } : m;
}

// Insert in id order, once; keep the view at the bottom when it was there.
function addMessage(conv, m, notification = false) {
    m = kept(m, notification || m.message_type === 'notification');
    if (conv.kind === 'room') conv.lastId = Math.max(conv.lastId ?? 0, m.id);
    if (conv.messages.has(m.id)) {
        refresh(conv, m);
        return;
    }
    conv.messages.set(m.id, m);
    const views = $('views');
    const atBottom = views.scrollHeight - views.scrollTop - views.clientHeight < 40;
    const node = renderMessage(m, m.message_type === 'notification');
    let after = conv.list.lastElementChild;
    while (after && Number(after.dataset.id) > m.id) after = after.previousElementSibling;
    if (after) after.after(node);
    else conv.list.prepend(node);
    if (conv.key === current && atBottom && node === conv.list.lastElementChild) views.scrollTop = views.scrollHeight;
}

// A message shown already, come again (a page of history overlapping the
// last; a conversation's first page reloaded after a reconnection, which is
// how a conversation catches up on edits and deletions): a newer edit or a
// deletion replaces what is shown; a deletion is final.
function refresh(conv, m) {
    const old = conv.messages.get(m.id);
    if (old.deleted) return;
    if (m.deleted || (m.edited_at && m.edited_at > (old.edited_at ?? ''))) {
        conv.messages.set(m.id, m);
        rerender(conv, m.id);
    }
}

// A message delivered live: shown, counted, its sender no longer typing there.
function receive(conv, m, notification = false) {
    addMessage(conv, m, notification);
    countLive(conv, m);
    const from = m.user_id ?? m.from_user_id;
    if (conv.typists.has(from)) setTypist(conv, from, '', false);
    if (conv.kind === 'dm') {
        // The other party's message moved their marker: they have read what came before.
        if (from === conv.userId) conv.peerReadId = Math.max(conv.peerReadId, m.id);
        renderSeen(conv);
    }
    if (conv.key === current) scheduleMarkRead();
}

// Newest first, once each.
function addNotification(m) {
    if (notices.messages.has(m.id)) return;
    m = kept(m, true);
    notices.messages.set(m.id, m);
    const list = notices.list;
    let before = list.firstElementChild;
    while (before && Number(before.dataset.id) > m.id) before = before.nextElementSibling;
    list.insertBefore(renderMessage(m, true), before);
}

// --- edits and deletions -------------------------------------------------------

function rowOf(conv, id) {
    return conv.list.querySelector(`:scope > li[data-id="${Number(id)}"]`);
}

// The row of a kept message drawn again from it, in the same place. An open
// editor stays open through someone else's edit (the draft is not lost; a
// Cancel shows the new content), not through a deletion.
function rerender(conv, id) {
    const old = rowOf(conv, id);
    const m = conv.messages.get(id);
    if (!old || !m) return;
    if (editing && editing.key === conv.key && editing.id === id) {
        if (!m.deleted) return;
        editing = null;
    }
    old.replaceWith(renderMessage(m, m.message_type === 'notification'));
    renderSeen(conv); // "Seen" was in the old row
}

// What a deleted message keeps (as history shows it): who, when, where.
function tombstone(m) {
    const { id, room, user_id, username, from_user_id, from_username, to_user_id, created_at, message_type } = m;
    return { id, room, user_id, username, from_user_id, from_username, to_user_id, created_at, message_type,
        content: '', deleted: true };
}

// The conversation of a message_edited / message_deleted: its room, or the
// other party of a conversation (user 0: the notifications list).
function eventConv(data) {
    if (data.room !== undefined) return convs.get(`room:${data.room}`);
    const peer = data.from_user_id === me.id ? data.to_user_id : data.from_user_id;
    return peer === 0 ? notices : convs.get(`dm:${peer}`);
}

// An edit or deletion, live or replayed: applied in id order, which is how
// they come, it leaves the message as history shows it. A room's lastId
// counts it, so that since_id after a reconnection does not replay it again.
function applyChange(data, change) {
    const conv = eventConv(data);
    if (!conv) return;
    if (conv.kind === 'room') conv.lastId = Math.max(conv.lastId ?? 0, data.id);
    const m = conv.messages.get(data.message_id);
    if (!m || m.deleted) return; // not loaded here: history will show it as it is
    conv.messages.set(m.id, change(m));
    rerender(conv, m.id);
}

// An edit or deletion asked of the server; its answer (message_edited or
// message_deleted, or an error frame) re-renders the row or says why not.
function sendChange(type, data) {
    if (!connected()) {
        setStatus('Not connected: the message was not changed.', 'error');
        return false;
    }
    client.send(type, data);
    return true;
}

function startEdit(conv, li, m) {
    if (editing) closeEditor();
    const input = el('input', {
        class: 'edit-input', 'data-testid': 'edit-input', 'aria-label': 'Edited message',
        maxlength: String($('message-input').maxLength), autocomplete: 'off',
    });
    input.value = m.content ?? '';
    const form = el('form', { class: 'edit-form' }, input,
        el('button', { type: 'submit', 'data-testid': 'edit-save' }, 'Save'),
        actionButton('edit-cancel', 'Cancel', 'Keep the message as it is'));
    li.querySelector('.content').replaceWith(form);
    li.querySelector('.actions').hidden = true;
    editing = { key: conv.key, id: m.id };
    input.focus();
    input.setSelectionRange(input.value.length, input.value.length);
}

// The open editor closed, its row shown from the kept message.
function closeEditor() {
    if (!editing) return;
    const conv = editing.key === notices.key ? notices : convs.get(editing.key);
    const id = editing.id;
    editing = null;
    if (conv) rerender(conv, id);
}

function saveEdit(conv, form, m) {
    const content = form.querySelector('.edit-input').value;
    if (content === m.content) {
        closeEditor();
        return;
    }
    if (m.message_type === 'text' && !content.trim()) { // the server would refuse it
        setStatus('A message cannot be empty: Delete takes it back.', 'error');
        return;
    }
    // Shown as it was until the server says it changed.
    if (sendChange('edit_message', { message_id: m.id, content })) closeEditor();
}

// Delete asks first, in the row itself (a dialog would block the page).
function confirmDelete(conv, li) {
    const actions = li.querySelector('.actions');
    actions.classList.add('confirm');
    actions.replaceChildren('Delete this message? ',
        actionButton('delete-yes', 'Yes', 'Delete it'),
        actionButton('delete-no', 'No', 'Keep it'));
}

const rowActions = {
    edit: startEdit,
    'edit-cancel': () => closeEditor(),
    delete: confirmDelete,
    'delete-no': (conv, li, m) => rerender(conv, m.id),
    'delete-yes': (conv, li, m) => {
        sendChange('delete_message', { message_id: m.id });
        rerender(conv, m.id); // as it was until the server says it is gone
    },
};

// The conversation, row and kept message of an element in a row.
function rowContext(target) {
    const li = target.closest('li.message');
    const list = li && li.closest('ol.messages');
    const conv = list && convs.get(list.dataset.conv);
    const m = conv && conv.messages.get(Number(li.dataset.id));
    return m ? { conv, li, m } : null;
}

function onRowAction(event) {
    const button = event.target.closest('button[data-action]');
    const at = button && rowContext(button);
    if (at) rowActions[button.dataset.action](at.conv, at.li, at.m);
}

function onEditSubmit(event) {
    const form = event.target.closest('form.edit-form');
    if (!form) return;
    event.preventDefault();
    const at = rowContext(form);
    if (at) saveEdit(at.conv, form, at.m);
}

function onEditKey(event) {
    if (event.key === 'Escape' && event.target.matches('.edit-input')) {
        event.preventDefault();
        closeEditor();
    }
}

function dmPeer(m) {
    return m.from_user_id === me.id ? [m.to_user_id, null] : [m.from_user_id, m.from_username];
}

// --- search --------------------------------------------------------------------

function setSearchNote(text) {
    $('search-note').textContent = text;
}

function setSearchError(text, code = '') {
    const node = $('search-error');
    node.textContent = text;
    node.dataset.code = code;
    node.hidden = !text;
}

function clearSearch() {
    search = null;
    $('search-results').replaceChildren();
    $('search-more').hidden = true;
    $('search-more').disabled = false;
    setSearchNote('');
    setSearchError('');
}

// A new search from the box: everything this user may read, or only the
// conversation shown (a room, or the conversation with one user).
function startSearch() {
    const query = $('search-input').value.trim();
    if (!query) return;
    const conv = $('search-here').checked ? convs.get(current) : null;
    let where = {};
    if (conv) where = conv.kind === 'room' ? { room: conv.name } : { with_user: conv.userId };
    clearSearch();
    search = {
        query, where, label: conv ? conv.title : null,
        requestId: null, nextBeforeId: null, answered: false, count: 0,
    };
    sendSearch();
}

// The next page of the search shown: its first, or the older matches
// (before_id, as the last answer said).
function sendSearch() {
    const data = { query: search.query, ...search.where, limit: SEARCH_PAGE };
    if (search.nextBeforeId !== null) data.before_id = search.nextBeforeId;
    setSearchError('');
    search.requestId = connected() ? client.request('search', data, searchAnswered) : null;
    if (search.requestId === null) {
        setSearchError('Not connected: nothing was searched.');
        return;
    }
    $('search-more').disabled = true;
    setSearchNote('Searching…');
}

// The answer to a search (search_results or an error); an older search's,
// come after a newer one was asked, is dropped.
function searchAnswered(frame) {
    if (!search || frame.request_id !== search.requestId) return;
    search.requestId = null;
    $('search-more').disabled = false;
    if (frame.type === 'error') {
        const { code, message } = frame.data;
        const details = frame.data.details || {};
        let text = message || code;
        if (details.retry_after) text += ` (retry in ${details.retry_after} s)`;
        setSearchError(text, code);
        renderSearchNote();
        return;
    }
    if (frame.type !== 'search_results') return;
    const { messages = [], has_more: hasMore, next_before_id: next } = frame.data;
    const list = $('search-results');
    for (const m of messages) list.append(renderHit(m));
    search.answered = true;
    search.count += messages.length;
    search.nextBeforeId = hasMore && next !== null && next !== undefined ? next : null;
    $('search-more').hidden = search.nextBeforeId === null;
    renderSearchNote();
}

// The connection dropped with a search unanswered: it can be asked again.
function searchLost() {
    if (!search || search.requestId === null) return;
    search.requestId = null;
    $('search-more').disabled = false;
    setSearchError('The connection dropped before the answer: search again.');
    renderSearchNote();
}

function renderSearchNote() {
    if (!search.answered) {
        setSearchNote('');
        return;
    }
    const { count, label } = search;
    const more = search.nextBeforeId !== null;
    let text;
    if (count > 0) text = `${count} message${count === 1 ? '' : 's'} found${more ? ', and older ones' : ''}`;
    else text = more ? 'None yet: "More" looks further back' : 'No messages found';
    setSearchNote(label ? `${text} in ${label}` : text);
}

// Where a match is: its room, a conversation, or the notifications.
function hitPlace(m) {
    if (m.room !== undefined) return { key: `room:${m.room}`, text: `#${m.room}` };
    const [peer, name] = dmPeer(m);
    if (peer === 0) return { key: notices.key, text: 'Notifications' };
    const known = convs.get(`dm:${peer}`);
    return { key: `dm:${peer}`, text: `DM with ${name || (known && known.username) || `user #${peer}`}` };
}

// A match: where, who, when, what (as text); a click shows it in place.
function renderHit(m) {
    const place = hitPlace(m);
    const notification = m.message_type === 'notification' || place.key === notices.key;
    const from = m.user_id ?? m.from_user_id;
    const who = notification ? 'notification' : (m.username ?? m.from_username ?? `user${from}`);
    const when = new Date(m.created_at);
    const time = el('time', { datetime: m.created_at, title: m.created_at },
        isNaN(when) ? '' : when.toLocaleString([], { dateStyle: 'short', timeStyle: 'short' }));
    const kind = m.message_type && m.message_type !== 'text' && !notification ? `[${m.message_type}] ` : '';
    const button = el('button', { type: 'button', class: 'hit', title: `Show it in ${place.text}` },
        el('span', { class: 'meta' },
            el('span', { class: 'where', 'data-testid': 'search-where' }, place.text), ' · ',
            el('strong', { class: 'user' }, who), ' ', time),
        el('span', { class: 'content', 'data-testid': 'search-content' }, kind + (m.content ?? '')));
    button.addEventListener('click', () => openHit(m, place));
    return el('li', {
        class: 'search-result', 'data-testid': 'search-result', 'data-id': String(m.id), 'data-conv': place.key,
    }, button);
}

// A match clicked: its room (joined as the join form does) or conversation
// shown, then the message itself once it is there.
function openHit(m, place) {
    if (place.key === notices.key) {
        jumpTo = null;
        const li = rowOf(notices, m.id);
        if (li) highlight(li);
        else setStatus('That notification is older than the ones shown.', 'info');
        return;
    }
    let conv;
    if (m.room !== undefined) {
        const known = convs.has(place.key);
        conv = addRoom(m.room);
        show(conv.key);
        if (!known) client.joinRoom(m.room);
    } else {
        const [peer, name] = dmPeer(m);
        conv = addDm(peer, name);
        show(conv.key);
    }
    jumpTo = { key: conv.key, id: m.id };
    revealJump();
}

// The match clicked, if its conversation shows it: scrolled to and
// highlighted. Called again when a page of history comes; not there once the
// history is loaded, it is older than what is shown ("Load older messages"
// goes on looking) or gone.
function revealJump() {
    const conv = convs.get(jumpTo.key);
    const li = conv && rowOf(conv, jumpTo.id);
    if (li) {
        highlight(li);
        jumpTo = null;
    } else if (!conv) {
        jumpTo = null;
    } else if (conv.loaded) {
        if (!conv.hasMore) jumpTo = null;
        setStatus(conv.hasMore
            ? 'That message is older than the history shown: "Load older messages" goes on looking.'
            : 'That message is no longer in the history.', 'info');
    }
}

function highlight(li) {
    for (const old of document.querySelectorAll('li.message.found')) old.classList.remove('found');
    li.classList.add('found');
    li.scrollIntoView({ block: 'center' });
}

const handlers = {
    join_room_ack(data) {
        const conv = addRoom(data.room);
        conv.joined = true;
        conv.members = new Map((data.members || []).map((u) => [u.user_id, u.username]));
        conv.role = data.role || 'member';
        applyCounts(conv, data);
        if (data.recovered === false) {
            // More was missed than the server replays: start again from the newest.
            conv.list.replaceChildren();
            conv.messages.clear();
            conv.hasMore = true;
            if (conv.key === current) renderOlder();
        }
        if (!conv.loaded) client.getRoomHistory(conv.name, PAGE_SIZE, 0);
        if (conv.key === current) {
            renderOnline();
            scheduleMarkRead();
        }
    },
    leave_room_ack() {},
    room_message(data) {
        receive(addRoom(data.room), data);
    },
    direct_message(data) {
        const [peer, name] = dmPeer(data);
        receive(addDm(peer, name), data);
    },
    message_history(data) {
        if (data.with_user === 0) {
            data.messages.forEach(addNotification);
            return;
        }
        let conv;
        if (data.room !== undefined) {
            conv = addRoom(data.room);
        } else {
            conv = addDm(data.with_user);
            const theirs = data.messages.find((m) => m.from_user_id === data.with_user);
            if (theirs) addDm(data.with_user, theirs.from_username);
        }
        const views = $('views');
        const before = views.scrollHeight;
        for (const m of data.messages) {
            addMessage(conv, m);
            if (conv.kind === 'dm' && m.from_user_id === conv.userId) {
                conv.peerReadId = Math.max(conv.peerReadId, m.id);
            }
        }
        if (data.offset === 0 && conv.kind === 'room') conv.lastId = Math.max(conv.lastId ?? 0, 0);
        if (data.offset > 0) views.scrollTop += views.scrollHeight - before; // keep the reader's place
        else if (conv.key === current) views.scrollTop = views.scrollHeight;
        conv.loaded = true;
        conv.hasMore = data.has_more;
        renderOlder();
        renderSeen(conv);
        if (conv.key === current) scheduleMarkRead();
        if (jumpTo && jumpTo.key === conv.key) revealJump();
    },
    message_edited(data) {
        applyChange(data, (m) => ({ ...m, content: data.content, edited_at: data.edited_at }));
    },
    message_deleted(data) {
        applyChange(data, tombstone);
    },
    mark_read_ack(data) {
        const conv = data.room !== undefined ? convs.get(`room:${data.room}`) : convs.get(`dm:${data.with_user}`);
        if (conv) applyCounts(conv, data);
    },
    read_marker(data) { // this user read on another device
        const conv = data.room !== undefined ? convs.get(`room:${data.room}`) : convs.get(`dm:${data.with_user}`);
        if (conv) applyCounts(conv, data);
    },
    unread_counts(data) {
        for (const r of data.rooms || []) {
            const conv = convs.get(`room:${r.room}`);
            if (conv) applyCounts(conv, r);
        }
        const listed = new Set();
        for (const d of data.direct || []) {
            if (d.with_user === 0) continue; // notifications: shown in their own list
            listed.add(d.with_user);
            const known = convs.has(`dm:${d.with_user}`);
            const conv = addDm(d.with_user);
            applyCounts(conv, d);
            // A conversation this page did not know: its history (and its name).
            if (!known && !conv.loaded) {
                client.send('dm_history', { with_user: d.with_user, limit: PAGE_SIZE, offset: 0 });
            }
        }
        // The conversations not listed have nothing unread.
        for (const conv of convs.values()) {
            if (conv.kind === 'dm' && !listed.has(conv.userId) && conv.sentReadId <= conv.lastReadId) {
                conv.unread = conv.mentions = 0;
                renderBadge(conv);
            }
        }
        scheduleMarkRead();
    },
    read_receipt(data) {
        if (data.room !== undefined) return; // receipts in rooms are not shown
        const conv = convs.get(`dm:${data.with_user}`);
        if (!conv) return;
        conv.peerReadId = Math.max(conv.peerReadId, data.last_read_id);
        renderSeen(conv);
    },
    typing(data) {
        const conv = data.room !== undefined ? convs.get(`room:${data.room}`) : convs.get(`dm:${data.with_user}`);
        if (!conv || data.user_id === me.id) return;
        setTypist(conv, data.user_id, data.username || `user${data.user_id}`, data.state === 'start');
    },
    presence(data) {
        for (const u of data.users || []) {
            const conv = convs.get(`dm:${u.user_id}`);
            if (!conv) continue;
            conv.presence = { online: Boolean(u.online), last_seen: u.last_seen ?? null };
            if (conv.key === current) renderPresence();
        }
    },
    user_connected(data) {
        const conv = convs.get(`room:${data.room}`);
        if (conv) conv.members.set(data.user_id, data.username);
        if (conv && conv.key === current) renderOnline();
        if (current === `dm:${data.user_id}`) queryPresence();
    },
    user_disconnected(data) {
        const conv = convs.get(`room:${data.room}`);
        if (conv) {
            conv.members.delete(data.user_id);
            if (conv.typists.has(data.user_id)) setTypist(conv, data.user_id, '', false);
        }
        if (conv && conv.key === current) renderOnline();
        if (current === `dm:${data.user_id}`) queryPresence();
    },
    notification(data) {
        if (data.room) {
            receive(addRoom(data.room), data, true);
        } else {
            addNotification(data);
            setStatus('New notification.', 'info');
        }
    },
    pong() {},
    moderation_ack(data) {
        setStatus(`${data.action}: user #${data.user_id} in #${data.room}${until(data.until)}.`, 'ok');
    },
    kicked(data) {
        const conv = convs.get(`room:${data.room}`);
        if (conv) {
            conv.joined = false;
            conv.members.clear();
            forgetTypists(conv);
            if (conv.key === current) renderOnline();
        }
        const reason = data.reason ? `: ${data.reason}` : '';
        setStatus(`You were removed from #${data.room}${until(data.until)}${reason}`, 'error');
    },
    error(data) {
        const details = data.details || {};
        if (data.code === 'AUTH_FAILED') {
            logout(`Authentication failed: ${data.message}. Sign in again.`);
            return;
        }
        let text = `${data.code}: ${data.message}`;
        if (details.retry_after) text += ` (retry in ${details.retry_after} s)`;
        setStatus(text, 'error');
        // A room or user that was just opened and turned out not to exist.
        const room = convs.get(`room:${details.room}`);
        if (room && !room.loaded && room.name !== 'general') removeConv(room);
        const dm = convs.get(`dm:${details.user_id}`);
        if (dm && !dm.loaded && data.code === 'USER_NOT_FOUND') removeConv(dm);
        // A mark_read refused: its answer will not come.
        for (const conv of convs.values()) {
            if (details.message_id !== undefined && conv.sentReadId === details.message_id) {
                conv.sentReadId = conv.lastReadId;
            }
        }
    },
};

// --- forms -------------------------------------------------------------------

function onSubmit(id, action) {
    $(id).addEventListener('submit', (event) => {
        event.preventDefault();
        action();
    });
}

onSubmit('token-form', () => {
    const token = $('token-input').value.trim();
    $('token-input').value = '';
    if (token) login(token);
});

onSubmit('dev-form', async () => {
    const name = $('dev-name').value.trim();
    if (!name) return;
    setStatus('Getting a development token…');
    try {
        login(await devToken(name));
    } catch (e) {
        setStatus(`Could not get a token: ${e.message}`, 'error');
    }
});

onSubmit('join-form', () => {
    const name = $('join-input').value.trim();
    if (!name) return;
    $('join-input').value = '';
    const known = convs.has(`room:${name}`);
    const conv = addRoom(name);
    show(conv.key);
    if (!known) client.joinRoom(name);
});

onSubmit('dm-form', () => {
    const userId = Number($('dm-input').value);
    if (!Number.isSafeInteger(userId) || userId < 1) return;
    $('dm-input').value = '';
    show(addDm(userId).key);
});

onSubmit('search-form', startSearch);

$('search-more').addEventListener('click', () => {
    if (search && search.requestId === null && search.nextBeforeId !== null) sendSearch();
});

onSubmit('send-form', () => {
    const input = $('message-input');
    const content = input.value;
    const conv = convs.get(current);
    if (!content.trim() || !conv) return;
    if (!client.ws || client.ws.readyState !== WebSocket.OPEN) {
        setStatus('Not connected: the message was not sent.', 'error');
        return;
    }
    if (conv.kind === 'room') {
        const mentions = mentionedIn(conv, content);
        if (mentions.length) {
            // The reference sendRoomMessage, with the users mentioned.
            client.send('room_message', { room: conv.name, content, message_type: 'text', mentions });
        } else {
            client.sendRoomMessage(conv.name, content);
        }
    } else {
        client.sendDirectMessage(conv.userId, content);
    }
    input.value = '';
    stopTyping();
});

// The members online in the room whose name follows an @ in the text
// ("@alice", not "@alicein"), case-insensitive.
function mentionedIn(conv, content) {
    const text = content.toLowerCase();
    const ids = [];
    for (const [id, name] of conv.members) {
        const tag = `@${name.toLowerCase()}`;
        for (let at = text.indexOf(tag); at !== -1; at = text.indexOf(tag, at + 1)) {
            const next = text.charAt(at + tag.length);
            if (!next || !/[\p{L}\p{N}_]/u.test(next)) {
                ids.push(id);
                break;
            }
        }
    }
    return ids.slice(0, 50);
}

$('message-input').addEventListener('input', onComposerInput);
$('views').addEventListener('click', onRowAction);
$('views').addEventListener('submit', onEditSubmit);
$('views').addEventListener('keydown', onEditKey);
$('views').addEventListener('scroll', () => {
    if (atBottom()) scheduleMarkRead();
}, { passive: true });
document.addEventListener('visibilitychange', () => {
    if (!visible()) return;
    scheduleMarkRead();
    queryPresence();
});

$('load-older').addEventListener('click', () => {
    const conv = convs.get(current);
    if (!conv) return;
    const page = { limit: PAGE_SIZE, offset: conv.messages.size }; // offset: messages already shown
    if (conv.kind === 'room') client.getRoomHistory(conv.name, page.limit, page.offset);
    else client.send('dm_history', { with_user: conv.userId, ...page });
});

$('logout').addEventListener('click', () => logout());

probeDevTokens();
const saved = sessionStorage.getItem(TOKEN_KEY);
if (saved) login(saved);
