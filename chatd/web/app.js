// The chatd page, built on the reference WebSocketClient (websocket-client.js,
// the protocol document's class, loaded unchanged before this file). No build
// step, no third-party code.
//
// Everything shown comes from the network and is shown as text: the DOM is
// built with createElement/textContent only, never innerHTML.
'use strict';

const PAGE_SIZE = 50;
const TOKEN_KEY = 'chatd.token';
const $ = (id) => document.getElementById(id);

// The reference class hard-codes ws://localhost:8080. ChatClient overrides
// connect() only, with the reference body unchanged except for two things: the
// URL comes from `location` (ws: or wss: as the page, the token URL-encoded), and
// onopen / onclose also call this.onOpen / this.onClose, so that the page can
// re-join its rooms after a reconnection and show the connection state.
// Reconnecting (5 attempts, growing delays) is still the reference handleReconnect.
class ChatClient extends WebSocketClient {
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
const notificationIds = new Set();

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
    convs.clear();
    notificationIds.clear();
    current = null;
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
    opened = true;
}

function onClose(event) {
    if (event.code === 4001) return; // AUTH_FAILED, already shown
    for (const conv of convs.values()) if (conv.kind === 'room') conv.members.clear();
    renderOnline();
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
    const button = el('button', { type: 'button', 'data-conv': key });
    button.addEventListener('click', () => show(key));
    const li = el('li', {}, button);
    $(kind === 'room' ? 'room-list' : 'dm-list').append(li);
    conv = { key, kind, list, button, li, ids: new Set(), lastId: null, hasMore: true, loaded: false, ...fields };
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
    conv.button.textContent = conv.title;
    if (conv.key === current) $('view-title').textContent = conv.title;
}

function removeConv(conv) {
    conv.list.remove();
    conv.li.remove();
    convs.delete(conv.key);
    if (current === conv.key) show('room:general');
}

function show(key) {
    const conv = convs.get(key) || addRoom('general');
    current = conv.key;
    for (const c of convs.values()) {
        c.list.hidden = c !== conv;
        c.button.setAttribute('aria-current', c === conv ? 'true' : 'false');
    }
    conv.button.classList.remove('unread');
    $('view-title').textContent = conv.title;
    if (conv.kind === 'dm' && !conv.loaded && client) {
        client.send('dm_history', { with_user: conv.userId, limit: PAGE_SIZE, offset: 0 });
    }
    renderOlder();
    renderOnline();
    $('views').scrollTop = $('views').scrollHeight;
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
        list.append(el('li', { 'data-testid': 'online-user', 'data-user-id': String(id) }, `${name} (#${id})`));
    }
}

// --- messages --------------------------------------------------------------

function safeMediaUrl(url) {
    return typeof url === 'string' && /^(\/(?!\/)|https?:\/\/)/i.test(url) ? url : null;
}

function renderMessage(m, notification) {
    const li = el('li', { class: 'message', 'data-testid': 'message', 'data-id': String(m.id) });
    const who = notification ? 'notification' : (m.username ?? m.from_username ?? `user${m.user_id ?? m.from_user_id}`);
    const when = new Date(m.created_at);
    const time = el('time', { datetime: m.created_at, title: m.created_at },
        isNaN(when) ? '' : when.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' }));
    li.append(el('span', { class: 'meta' }, el('strong', { class: 'user' }, who), ' ', time), ' ');
    if (notification) li.classList.add('notification');
    if (m.message_type && m.message_type !== 'text' && !notification) {
        li.append(el('span', { class: 'kind' }, `[${m.message_type}]`), ' ');
    }
    if (m.reply_to) li.append(el('span', { class: 'reply' }, `↪ #${m.reply_to}`), ' ');
    li.append(el('span', { class: 'content', 'data-testid': 'content' }, m.content ?? ''));
    const url = safeMediaUrl(m.media_url);
    if (url) {
        li.append(' ', el('a', { href: url, rel: 'noopener noreferrer', target: '_blank', class: 'media' },
            m.media_type ? `media (${m.media_type})` : 'media'));
    }
    if (m.data !== undefined && m.data !== null) {
        li.append(' ', el('code', { class: 'data' }, JSON.stringify(m.data)));
    }
    return li;
}

// Insert in id order, once; keep the view at the bottom when it was there.
function addMessage(conv, m, notification = false) {
    if (conv.ids.has(m.id)) return;
    conv.ids.add(m.id);
    if (conv.kind === 'room') conv.lastId = Math.max(conv.lastId ?? 0, m.id);
    const views = $('views');
    const atBottom = views.scrollHeight - views.scrollTop - views.clientHeight < 40;
    const node = renderMessage(m, notification || m.message_type === 'notification');
    let after = conv.list.lastElementChild;
    while (after && Number(after.dataset.id) > m.id) after = after.previousElementSibling;
    if (after) after.after(node);
    else conv.list.prepend(node);
    if (conv.key !== current) conv.button.classList.add('unread');
    else if (atBottom && node === conv.list.lastElementChild) views.scrollTop = views.scrollHeight;
}

// Newest first, once each.
function addNotification(m) {
    if (notificationIds.has(m.id)) return;
    notificationIds.add(m.id);
    const list = $('notifications');
    let before = list.firstElementChild;
    while (before && Number(before.dataset.id) > m.id) before = before.nextElementSibling;
    list.insertBefore(renderMessage(m, true), before);
}

function dmPeer(m) {
    return m.from_user_id === me.id ? [m.to_user_id, null] : [m.from_user_id, m.from_username];
}

const handlers = {
    join_room_ack(data) {
        const conv = addRoom(data.room);
        conv.members = new Map((data.members || []).map((u) => [u.user_id, u.username]));
        if (data.recovered === false) {
            // More was missed than the server replays: start again from the newest.
            conv.list.replaceChildren();
            conv.ids.clear();
            conv.hasMore = true;
            if (conv.key === current) renderOlder();
        }
        if (!conv.loaded) client.getRoomHistory(conv.name, PAGE_SIZE, 0);
        if (conv.key === current) renderOnline();
    },
    leave_room_ack() {},
    room_message(data) {
        addMessage(addRoom(data.room), data);
    },
    direct_message(data) {
        const [peer, name] = dmPeer(data);
        addMessage(addDm(peer, name), data);
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
        for (const m of data.messages) addMessage(conv, m);
        if (data.offset === 0 && conv.kind === 'room') conv.lastId = Math.max(conv.lastId ?? 0, 0);
        if (data.offset > 0) views.scrollTop += views.scrollHeight - before; // keep the reader's place
        else if (conv.key === current) views.scrollTop = views.scrollHeight;
        conv.loaded = true;
        conv.hasMore = data.has_more;
        renderOlder();
    },
    user_connected(data) {
        const conv = convs.get(`room:${data.room}`);
        if (conv) conv.members.set(data.user_id, data.username);
        if (conv && conv.key === current) renderOnline();
    },
    user_disconnected(data) {
        const conv = convs.get(`room:${data.room}`);
        if (conv) conv.members.delete(data.user_id);
        if (conv && conv.key === current) renderOnline();
    },
    notification(data) {
        if (data.room) {
            addMessage(addRoom(data.room), data, true);
        } else {
            addNotification(data);
            setStatus('New notification.', 'info');
        }
    },
    pong() {},
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

onSubmit('send-form', () => {
    const input = $('message-input');
    const content = input.value;
    const conv = convs.get(current);
    if (!content.trim() || !conv) return;
    if (!client.ws || client.ws.readyState !== WebSocket.OPEN) {
        setStatus('Not connected: the message was not sent.', 'error');
        return;
    }
    if (conv.kind === 'room') client.sendRoomMessage(conv.name, content);
    else client.sendDirectMessage(conv.userId, content);
    input.value = '';
});

$('load-older').addEventListener('click', () => {
    const conv = convs.get(current);
    if (!conv) return;
    const page = { limit: PAGE_SIZE, offset: conv.ids.size }; // offset: messages already shown
    if (conv.kind === 'room') client.getRoomHistory(conv.name, page.limit, page.offset);
    else client.send('dm_history', { with_user: conv.userId, ...page });
});

$('logout').addEventListener('click', () => logout());

probeDevTokens();
const saved = sessionStorage.getItem(TOKEN_KEY);
if (saved) login(saved);
