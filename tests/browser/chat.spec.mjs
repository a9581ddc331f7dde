// End-to-end test of the chatd page in headless Chromium, driven by
// playwright-core. Run by tests/browser/run.sh, which starts the server and
// passes: CHATD_URL, CHATD_API_KEY, CHATD_PID_FILE and CHATD_SERVER_CMD (to
// restart the server), CHATD_SERVER_LOG, CHROMIUM, ARTIFACTS.
//
// Plain `node`, no test runner: the steps run in order and the first failure
// stops the run (exit status 1) after a screenshot of each page.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdirSync, openSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { chromium } from 'playwright-core';

const env = (name) => {
    const value = process.env[name];
    if (!value) throw new Error(`${name} is not set: run tests/browser/run.sh`);
    return value;
};
const BASE = env('CHATD_URL');
const API_KEY = env('CHATD_API_KEY');
const PID_FILE = env('CHATD_PID_FILE');
const SERVER_CMD = JSON.parse(env('CHATD_SERVER_CMD'));
const SERVER_LOG = env('CHATD_SERVER_LOG');
const ARTIFACTS = env('ARTIFACTS');
const TIMEOUT = 10_000;
mkdirSync(ARTIFACTS, { recursive: true });

// --- helpers: server, raw clients --------------------------------------------

async function devToken(username) {
    const res = await fetch(`${BASE}/dev/token`, { method: 'POST', body: JSON.stringify({ username }) });
    assert.equal(res.status, 200, `dev token for ${username}`);
    return res.json();
}

async function publish(body) {
    const res = await fetch(`${BASE}/api/publish`, {
        method: 'POST',
        headers: { authorization: `Bearer ${API_KEY}`, 'content-type': 'application/json' },
        body: JSON.stringify(body),
    });
    assert.equal(res.status, 200, `publish: ${await res.clone().text()}`);
}

async function healthy() {
    try {
        return (await fetch(`${BASE}/healthz`)).ok;
    } catch {
        return false;
    }
}

async function until(what, check, timeout = TIMEOUT) {
    const end = Date.now() + timeout;
    while (!(await check())) {
        if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
        await sleep(50);
    }
}

function alive(pid) {
    try {
        const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
        return stat.slice(stat.lastIndexOf(')') + 2)[0] !== 'Z';
    } catch {
        return false;
    }
}

async function stopServer() {
    const pid = Number(readFileSync(PID_FILE, 'utf8'));
    process.kill(pid, 'SIGTERM');
    await until('the server to exit', () => !alive(pid), 15_000);
}

async function startServer() {
    const log = openSync(SERVER_LOG, 'a');
    const child = spawn(SERVER_CMD[0], SERVER_CMD.slice(1), { detached: true, stdio: ['ignore', log, log] });
    writeFileSync(PID_FILE, String(child.pid));
    child.unref();
    await until('the restarted server', healthy, 15_000);
}

// A protocol client on Node's WebSocket, for the seeding and the third party.
async function rawClient(username) {
    const { token } = await devToken(username);
    const ws = new WebSocket(`${BASE.replace(/^http/, 'ws')}/ws/chat?token=${encodeURIComponent(token)}`);
    const frames = [];
    ws.onmessage = (event) => frames.push(JSON.parse(event.data));
    await new Promise((resolve, reject) => {
        ws.onopen = resolve;
        ws.onerror = () => reject(new Error(`${username}: WebSocket failed`));
    });
    return {
        send: (type, data, request_id) => ws.send(JSON.stringify({ type, data, request_id })),
        expect: (what, pred) => until(what, () => frames.some(pred)),
        frames,
        close: () => ws.close(),
    };
}

// --- helpers: pages --------------------------------------------------------------

const pages = [];

async function openPage(browser, name) {
    const context = await browser.newContext({ viewport: { width: 1200, height: 760 } });
    const page = await context.newPage();
    page.setDefaultTimeout(TIMEOUT);
    const problems = [];
    const dialogs = [];
    const frames = []; // WebSocket frames received: [socket number, parsed frame]
    let sockets = 0;
    page.on('pageerror', (err) => problems.push(`page error: ${err.message}`));
    page.on('console', (msg) => {
        if (/Content.Security.Policy|Refused to/i.test(msg.text())) problems.push(`CSP: ${msg.text()}`);
    });
    page.on('dialog', (dialog) => {
        dialogs.push(dialog.message());
        dialog.dismiss();
    });
    page.on('websocket', (ws) => {
        const n = ++sockets;
        ws.on('framereceived', (f) => frames.push([n, JSON.parse(f.payload)]));
    });
    const p = { name, context, page, problems, dialogs, frames };
    pages.push(p);
    await page.goto(`${BASE}/`);
    return p;
}

async function signIn(p, username) {
    const { page } = p;
    await page.locator('#dev-form').waitFor({ state: 'visible' });
    await page.getByLabel('Name (development server)').fill(username);
    await page.locator('#dev-submit').click();
    await page.locator('#whoami', { hasText: username }).waitFor();
    await page.locator('#status', { hasText: 'Connected.' }).waitFor();
    p.userId = Number(await page.locator('#whoami').getAttribute('data-user-id'));
    assert.ok(p.userId > 0, `${username} has a user id`);
}

const view = (p, key) => p.page.locator(`ol[data-conv="${key}"]`);
const message = (p, key, text) => view(p, key).locator('.content', { hasText: text });
const row = (p, key, text) => view(p, key).locator('li.message', { hasText: text });
const entry = (p, key) => p.page.locator(`#room-list, #dm-list`).locator(`button[data-conv="${key}"]`);
// The unread badge of a room or conversation, when it shows `count`.
const badge = (p, key, count) => entry(p, key).locator('[data-testid="unread-badge"]:not([hidden])',
    count === undefined ? {} : { hasText: new RegExp(`^${count}$`) });
const typing = (p, text) => p.page.locator('#typing', { hasText: text });
const presence = (p, text) => p.page.locator('#view-presence:not([hidden])', { hasText: text });
const received = (p, pred) => p.frames.some(([, f]) => pred(f));

// Waits until the badge of a room or conversation is not shown.
async function noBadge(p, key) {
    await badge(p, key).waitFor({ state: 'hidden' });
}

async function say(p, text) {
    await p.page.getByLabel('Message', { exact: true }).fill(text);
    await p.page.locator('#send-button').click();
}

// --- the scenario --------------------------------------------------------------

const steps = [];
async function step(name, fn) {
    const started = Date.now();
    await fn();
    steps.push(name);
    console.log(`ok ${steps.length} - ${name} (${Date.now() - started} ms)`);
}

const started = Date.now();
const browser = await chromium.launch({
    // Playwright gives each launch a fresh temporary profile (user data dir).
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    args: [
        '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
        '--disable-background-networking', '--disable-component-update', '--disable-sync',
    ],
});
let failed = false;
try {
    let alice, bob;
    const XSS = '<img src=x onerror=alert(1)>';

    await step('seed 60 messages of history in general', async () => {
        const seeder = await rawClient('seeder');
        seeder.send('join_room', { room: 'general' });
        const batch = [];
        for (let i = 1; i <= 60; i++) {
            const content = `history ${String(i).padStart(2, '0')}`;
            batch.push({ type: 'room_message', data: { room: 'general', content }, request_id: i });
        }
        seeder.send('message_batch', { messages: batch });
        await seeder.expect('the 60 copies', () => seeder.frames.filter((f) => f.request_id === 60).length > 0);
        assert.equal(seeder.frames.filter((f) => f.type === 'error').length, 0, JSON.stringify(seeder.frames));
        seeder.close();
    });

    await step('a bad token is refused: AUTH_FAILED, back to the sign-in form', async () => {
        const mallory = await openPage(browser, 'mallory');
        await mallory.page.getByLabel('Token', { exact: false }).fill('not-a-token');
        await mallory.page.locator('#token-submit').click();
        await mallory.page.locator('#status', { hasText: 'Authentication failed' }).waitFor();
        await mallory.page.locator('#token-form').waitFor({ state: 'visible' });
        assert.equal(await mallory.page.locator('#chat').isVisible(), false);
        // A pasted good token works.
        const { token } = await devToken('mallory');
        await mallory.page.getByLabel('Token', { exact: false }).fill(token);
        await mallory.page.locator('#token-submit').click();
        await mallory.page.locator('#whoami', { hasText: 'mallory' }).waitFor();
        await mallory.page.locator('#status', { hasText: 'Connected.' }).waitFor();
        await mallory.context.close();
        pages.splice(pages.indexOf(mallory), 1);
    });

    await step('alice and bob sign in with dev tokens and see general', async () => {
        alice = await openPage(browser, 'alice');
        await signIn(alice, 'alice');
        bob = await openPage(browser, 'bob');
        await signIn(bob, 'bob');
        for (const p of [alice, bob]) {
            await message(p, 'room:general', 'history 60').waitFor();
            assert.equal(await p.page.locator('#view-title').textContent(), '# general');
            assert.equal(await p.page.locator('#room-list button').first().textContent(), '# general');
        }
    });

    await step('who is online: bob sees alice (ack), alice sees bob (user_connected)', async () => {
        await bob.page.locator(`#online-list [data-user-id="${alice.userId}"]`, { hasText: 'alice' }).waitFor();
        await alice.page.locator(`#online-list [data-user-id="${bob.userId}"]`, { hasText: 'bob' }).waitFor();
    });

    await step('room messages both ways, with username and time', async () => {
        await say(alice, 'hello from alice');
        await message(bob, 'room:general', 'hello from alice').waitFor();
        const row = view(bob, 'room:general').locator('li', { hasText: 'hello from alice' });
        assert.equal(await row.locator('.user').textContent(), 'alice');
        assert.match(await row.locator('time').textContent(), /\d/);
        await say(bob, 'hi alice, bob here');
        await message(alice, 'room:general', 'hi alice, bob here').waitFor();
    });

    await step('markup in a message is shown as text', async () => {
        await say(alice, XSS);
        for (const p of [alice, bob]) {
            await view(p, 'room:general').getByText(XSS, { exact: true }).waitFor();
            assert.equal(await p.page.locator('img').count(), 0, `${p.name}: no img element`);
        }
        // A media message from another client: a plain text link, rel noopener.
        const dave = await rawClient('dave');
        dave.send('join_room', { room: 'general' });
        dave.send('room_message', {
            room: 'general', message_type: 'image', content: '<b>caption</b>',
            media_url: '/uploads/cat.png', media_type: 'image/png',
        }, 'i1');
        await dave.expect('dave\'s copy', (f) => f.request_id === 'i1' || f.type === 'error');
        assert.equal(dave.frames.filter((f) => f.type === 'error').length, 0, JSON.stringify(dave.frames));
        dave.close();
        const row = view(bob, 'room:general').locator('li', { hasText: '<b>caption</b>' });
        await row.waitFor();
        const link = row.locator('a.media');
        assert.equal(await link.getAttribute('href'), '/uploads/cat.png');
        assert.equal(await link.getAttribute('rel'), 'noopener noreferrer');
        assert.equal(await bob.page.locator('#views b, #views img').count(), 0);
        await sleep(200); // an onerror handler would have fired by now
        assert.deepEqual(bob.dialogs, []);
        assert.deepEqual(alice.dialogs, []);
    });

    await step('a direct message from alice reaches bob in its own conversation', async () => {
        await alice.page.getByLabel('Write to user id').fill(String(bob.userId));
        await alice.page.locator('#dm-submit').click();
        await alice.page.locator('#view-title', { hasText: `(#${bob.userId})` }).waitFor();
        await say(alice, 'psst, just for bob');
        const key = `dm:${alice.userId}`;
        const entry = bob.page.locator(`#dm-list button[data-conv="${key}"]`);
        await entry.waitFor();
        assert.match(await entry.textContent(), /alice/);
        assert.equal(await message(bob, 'room:general', 'psst').count(), 0, 'not in the room');
        await entry.click();
        await bob.page.locator('#view-title', { hasText: 'alice' }).waitFor();
        await message(bob, key, 'psst, just for bob').waitFor();
        for (const p of [alice, bob]) await p.page.locator('#room-list button', { hasText: '# general' }).click();
    });

    await step('notifications: in the room, and to one user', async () => {
        await publish({ content: 'deploy finished', room: 'general', data: { build: 42 } });
        await publish({ content: 'your report is ready', user_id: bob.userId });
        await view(bob, 'room:general').locator('li.notification', { hasText: 'deploy finished' }).waitFor();
        await view(alice, 'room:general').locator('li.notification', { hasText: 'deploy finished' }).waitFor();
        await bob.page.locator('#notifications li', { hasText: 'your report is ready' }).waitFor();
        assert.equal(await alice.page.locator('#notifications li').count(), 0);
    });

    await step('after a reload, "load older" pages back through history', async () => {
        await bob.page.reload();
        await bob.page.locator('#whoami', { hasText: 'bob' }).waitFor(); // token kept for the tab
        await message(bob, 'room:general', 'deploy finished').waitFor();
        await bob.page.locator('#notifications li', { hasText: 'your report is ready' }).waitFor();
        const rows = view(bob, 'room:general').locator('li');
        assert.equal(await rows.count(), 50);
        assert.equal(await message(bob, 'room:general', 'history 01').count(), 0);
        await bob.page.locator('#load-older').click();
        await message(bob, 'room:general', 'history 01').waitFor();
        await until('all 65 rows (60 seeded, 4 said, 1 notification)', async () => (await rows.count()) === 65);
        assert.equal(await bob.page.locator('#load-older').isVisible(), false, 'nothing older');
        // History in order: ids ascending.
        const ids = await rows.evaluateAll((els) => els.map((e) => Number(e.dataset.id)));
        assert.deepEqual(ids, [...ids].sort((a, b) => a - b));
        // The conversation with alice comes back from dm_history.
        await bob.page.getByLabel('Write to user id').fill(String(alice.userId));
        await bob.page.locator('#dm-submit').click();
        await message(bob, `dm:${alice.userId}`, 'psst, just for bob').waitFor();
        await bob.page.locator('#room-list button', { hasText: '# general' }).click();
    });

    await step('server restart: bob reconnects and recovers what he missed', async () => {
        const sockets = new Set(bob.frames.map(([n]) => n));
        await stopServer();
        await bob.page.locator('#status', { hasText: 'reconnecting' }).waitFor();
        await bob.context.setOffline(true); // keep bob away until carol has spoken
        await startServer();
        const carol = await rawClient('carol');
        carol.send('join_room', { room: 'general' });
        carol.send('room_message', { room: 'general', content: 'sent while bob was away' }, 'c1');
        await carol.expect('carol\'s copy', (f) => f.request_id === 'c1');
        assert.equal(carol.frames.filter((f) => f.type === 'error').length, 0, JSON.stringify(carol.frames));
        carol.close();
        // Bob really was away when carol spoke: nothing on a new socket yet.
        assert.ok(bob.frames.every(([n]) => sockets.has(n)), 'bob has not reconnected yet');
        assert.equal(await message(bob, 'room:general', 'sent while bob was away').count(), 0);
        await bob.context.setOffline(false);
        await message(bob, 'room:general', 'sent while bob was away').waitFor({ timeout: 20_000 });
        await bob.page.locator('#status', { hasText: 'Reconnected.' }).waitFor();
        const ack = bob.frames.find(([n, f]) => !sockets.has(n) && f.type === 'join_room_ack' && f.data.room === 'general');
        assert.ok(ack, 'bob re-joined general on a new connection');
        assert.equal(ack[1].data.recovered, true, 'with since_id, and recovered');
        assert.equal(await message(bob, 'room:general', 'sent while bob was away').count(), 1, 'once');
        assert.equal(await message(bob, 'room:general', 'hello from alice').count(), 1, 'no duplicates');
        // And the page works on the new connection: bob talks, alice (reconnected too) hears.
        await alice.page.locator('#status', { hasText: 'Reconnected.' }).waitFor({ timeout: 20_000 });
        await say(bob, 'back online');
        await message(alice, 'room:general', 'back online').waitFor();
        await message(alice, 'room:general', 'sent while bob was away').waitFor();
        await bob.page.locator(`#online-list [data-user-id="${alice.userId}"]`).waitFor();
    });

    // --- read state, typing, mentions, presence: alice and bob, two contexts ---
    const dmBob = () => `dm:${bob.userId}`;     // alice's conversation with bob
    const dmAlice = () => `dm:${alice.userId}`; // bob's conversation with alice

    await step('a click on a member online opens the conversation; its header says online', async () => {
        // Alice's own name is not a link.
        await alice.page.locator(`#online-list [data-user-id="${alice.userId}"]`).waitFor();
        assert.equal(await alice.page.locator(`#online-list [data-user-id="${alice.userId}"] button`).count(), 0);
        await alice.page.locator(`#online-list [data-user-id="${bob.userId}"] button`, { hasText: 'bob' }).click();
        await alice.page.locator('#view-title', { hasText: `bob (#${bob.userId})` }).waitFor();
        // The conversation of the earlier step, not a second one.
        await message(alice, dmBob(), 'psst, just for bob').waitFor();
        assert.equal(await alice.page.locator(`#dm-list button[data-conv="${dmBob()}"]`).count(), 1);
        assert.equal(await view(alice, dmBob()).isVisible(), true);
        await presence(alice, /^online$/).waitFor();
        assert.equal(await alice.page.locator('#online-list').isVisible(), false, 'no member list in a conversation');
    });

    await step('unread badges: a room\'s count while away, cleared when read', async () => {
        // Alice reads her conversation with bob; bob talks in general.
        await say(bob, 'first unread');
        await badge(alice, 'room:general', 1).waitFor();
        await say(bob, 'second unread');
        await badge(alice, 'room:general', 2).waitFor();
        assert.equal(await alice.page.title(), '(2) chatd');
        assert.equal(await badge(bob, 'room:general').count(), 0, 'own messages are never unread');
        await alice.page.locator('#room-list button', { hasText: '# general' }).click();
        await message(alice, 'room:general', 'second unread').waitFor();
        await noBadge(alice, 'room:general');
        const second = Number(await row(alice, 'room:general', 'second unread').getAttribute('data-id'));
        await until('the server to agree: general read', () => received(alice, (f) => f.type === 'mark_read_ack'
            && f.data.room === 'general' && f.data.last_read_id >= second && f.data.unread === 0));
        assert.equal(await alice.page.title(), 'chatd');
        // Read where she is: a message in the room she shows raises no badge.
        await say(bob, 'seen at once');
        await message(alice, 'room:general', 'seen at once').waitFor();
        const id = Number(await row(alice, 'room:general', 'seen at once').getAttribute('data-id'));
        await until('alice to have read it', () => received(alice, (f) => f.type === 'mark_read_ack'
            && f.data.room === 'general' && f.data.last_read_id >= id && f.data.unread === 0));
        assert.equal(await badge(alice, 'room:general').count(), 0);
    });

    await step('a conversation\'s badge (kept across a reload) and "Seen" under the message read', async () => {
        await bob.page.locator(`#online-list [data-user-id="${alice.userId}"] button`).click();
        await bob.page.locator('#view-title', { hasText: `alice (#${alice.userId})` }).waitFor();
        await say(bob, 'are you there?');
        await badge(alice, dmBob(), 1).waitFor();
        await alice.page.locator(`#dm-list button[data-conv="${dmBob()}"]`).click();
        await noBadge(alice, dmBob());
        // Bob sees that alice read it.
        const asked = row(bob, dmAlice(), 'are you there?');
        await asked.locator('[data-testid="seen"]', { hasText: 'Seen' }).waitFor();
        // Alice goes back to the room; bob writes again: a badge, and "Seen" stays where it was.
        await alice.page.locator('#room-list button', { hasText: '# general' }).click();
        await say(bob, 'ping while you are away');
        await badge(alice, dmBob(), 1).waitFor();
        assert.equal(await view(bob, dmAlice()).locator('[data-testid="seen"]').count(), 1);
        assert.equal(await asked.locator('[data-testid="seen"]').count(), 1);
        // The count comes from the server after a reload (unread_counts).
        await alice.page.reload();
        await alice.page.locator('#status', { hasText: 'Connected.' }).waitFor();
        await badge(alice, dmBob(), 1).waitFor();
        await alice.page.locator(`#dm-list button[data-conv="${dmBob()}"]`, { hasText: 'bob' }).waitFor();
        // Read: the badge goes, and bob's "Seen" moves to his newest message.
        await alice.page.locator(`#dm-list button[data-conv="${dmBob()}"]`).click();
        await message(alice, dmBob(), 'ping while you are away').waitFor();
        await noBadge(alice, dmBob());
        await row(bob, dmAlice(), 'ping while you are away').locator('[data-testid="seen"]').waitFor();
        assert.equal(await view(bob, dmAlice()).locator('[data-testid="seen"]').count(), 1);
        // Alice's side, from the history alone: bob has written since her
        // last message, so he has read it.
        await row(alice, dmBob(), 'psst, just for bob').locator('[data-testid="seen"]').waitFor();
        assert.equal(await view(alice, dmBob()).locator('[data-testid="seen"]').count(), 1);
    });

    await step('typing: "alice is typing…" in the conversation, gone when she clears or sends', async () => {
        // Both show their conversation: alice with bob, bob with alice.
        const input = alice.page.getByLabel('Message', { exact: true });
        const stops = () => bob.frames.filter(([, f]) => f.type === 'typing' && f.data.with_user === alice.userId
            && f.data.state === 'stop').length;
        await input.fill('I am typ');
        await typing(bob, 'alice is typing…').waitFor();
        const before = stops();
        await input.fill('');
        await typing(bob, 'typing').waitFor({ state: 'hidden' });
        await until('the stop alice sent', () => stops() === before + 1);
        await input.fill('typed and sent');
        await typing(bob, 'alice is typing…').waitFor();
        await alice.page.locator('#send-button').click();
        await message(bob, dmAlice(), 'typed and sent').waitFor();
        await typing(bob, 'typing').waitFor({ state: 'hidden' });
        // Shown only with the conversation: bob goes to general, where nobody types.
        await input.fill('again');
        await typing(bob, 'alice is typing…').waitFor();
        await bob.page.locator('#room-list button', { hasText: '# general' }).click();
        await bob.page.locator('#view-title', { hasText: '# general' }).waitFor();
        assert.equal(await bob.page.locator('#typing').textContent(), '');
        await input.fill('');
        await until('alice\'s stops', () => stops() >= before + 3); // cleared, sent, cleared
        // Never echoed to the typist.
        assert.equal(await alice.page.locator('#typing').textContent(), '');
        assert.ok(!received(alice, (f) => f.type === 'typing' && f.data.user_id === alice.userId), 'not to the typist');
    });

    await step('typing in a room; the server ends a start not renewed', async () => {
        await alice.page.locator('#room-list button', { hasText: '# general' }).click();
        const input = bob.page.getByLabel('Message', { exact: true });
        await input.fill('hmm');
        await typing(alice, 'bob is typing…').waitFor();
        // Bob stops typing without clearing: the server says stop after 6 s.
        await typing(alice, 'typing').waitFor({ state: 'hidden', timeout: 20_000 });
        await until('the server\'s stop', () => received(alice, (f) =>
            f.type === 'typing' && f.data.room === 'general' && f.data.user_id === bob.userId && f.data.state === 'stop'));
        await input.fill('');
    });

    await step('mentions: "@alice" highlights the message for alice and marks her badge', async () => {
        await alice.page.locator(`#dm-list button[data-conv="${dmBob()}"]`).click();
        await say(bob, 'hey @alice, look at this');
        const mentioned = badge(alice, 'room:general', 1);
        await mentioned.waitFor();
        assert.equal(await mentioned.getAttribute('data-mentions'), '1');
        assert.match(await mentioned.getAttribute('class'), /\bmention\b/);
        const frame = alice.frames.find(([, f]) => f.type === 'room_message' && f.data.content === 'hey @alice, look at this');
        assert.deepEqual(frame[1].data.mentions, [alice.userId]);
        await alice.page.locator('#room-list button', { hasText: '# general' }).click();
        await noBadge(alice, 'room:general');
        await row(alice, 'room:general', 'hey @alice, look at this').and(alice.page.locator('li.mention')).waitFor();
        assert.equal(await row(alice, 'room:general', 'first unread').getAttribute('data-mention'), null);
        // Only for the one mentioned.
        await row(bob, 'room:general', 'hey @alice, look at this').waitFor();
        assert.equal(await row(bob, 'room:general', 'hey @alice, look at this').getAttribute('data-mention'), null);
        // "@bobby" is not bob; "@Bob" is.
        await say(alice, 'not @bobby, but @Bob');
        await row(bob, 'room:general', 'not @bobby, but @Bob').and(bob.page.locator('li.mention')).waitFor();
        await say(alice, 'and not @bobby');
        await message(bob, 'room:general', 'and not @bobby').waitFor();
        assert.equal(await row(bob, 'room:general', 'and not @bobby').getAttribute('data-mention'), null);
    });

    await step('last seen: bob\'s header says when alice left, online when she is back', async () => {
        await bob.page.locator(`#dm-list button[data-conv="${dmAlice()}"]`).click();
        await presence(bob, /^online$/).waitFor();
        const left = Date.now();
        await alice.page.locator('#logout').click();
        await presence(bob, /^last seen /).waitFor();
        const when = Date.parse(await bob.page.locator('#view-presence time').getAttribute('datetime'));
        assert.ok(Math.abs(when - left) < 60_000, `last seen ${new Date(when).toISOString()}, left ${new Date(left).toISOString()}`);
        const id = alice.userId;
        await signIn(alice, 'alice');
        assert.equal(alice.userId, id, 'the same alice');
        await presence(bob, /^online$/).waitFor();
    });

    // --- edits and deletions --------------------------------------------------
    const general = 'room:general';
    const byId = (p, key, id) => view(p, key).locator(`li.message[data-id="${id}"]`);
    const idOf = async (p, key, text) => Number(await row(p, key, text).getAttribute('data-id'));
    const shownIds = (p, key) => view(p, key).locator('li').evaluateAll((els) => els.map((e) => Number(e.dataset.id)));

    // A user edits a message of theirs through the page: Edit, the new text, Enter.
    async function edit(p, id, content) {
        const mine = byId(p, general, id);
        await mine.locator('[data-testid="edit"]').click();
        const input = mine.locator('[data-testid="edit-input"]');
        await input.fill(content);
        await input.press('Enter');
        await mine.locator('.content', { hasText: content }).waitFor();
        await mine.locator('[data-testid="edited"]').waitFor();
    }

    // ... and deletes one: Delete, then "Yes" in the row.
    async function remove(p, id) {
        const mine = byId(p, general, id);
        await mine.locator('[data-testid="delete"]').click();
        await mine.locator('[data-testid="delete-yes"]').click();
        await mine.locator('[data-testid="tombstone"]').waitFor();
    }

    // A row shown as a tombstone: in place, nothing of what it said, no actions.
    async function isTombstone(p, id, text) {
        const gone = byId(p, general, id);
        await gone.locator('[data-testid="tombstone"]', { hasText: 'message deleted' }).waitFor();
        assert.equal(await gone.locator('.content, a.media, button').count(), 0, `${p.name}: ${text} is gone`);
        assert.equal(await message(p, general, text).count(), 0, `${p.name}: ${text} is gone`);
    }

    await step('alice edits her message in place and deletes another after confirming; bob sees both live', async () => {
        await bob.page.locator('#room-list button', { hasText: '# general' }).click();
        await bob.page.locator('#view-title', { hasText: '# general' }).waitFor();
        await say(alice, 'a typo: teh end');
        await say(alice, 'a message to take back');
        for (const p of [alice, bob]) await message(p, general, 'a message to take back').waitFor();
        const typo = await idOf(alice, general, 'a typo: teh end');
        const back = await idOf(alice, general, 'a message to take back');
        const before = [await shownIds(alice, general), await shownIds(bob, general)];
        // Edit: an input in place of the text, prefilled and focused; Escape changes nothing.
        const mine = byId(alice, general, typo);
        await mine.locator('[data-testid="edit"]').click();
        const input = mine.locator('[data-testid="edit-input"]');
        assert.equal(await input.inputValue(), 'a typo: teh end');
        assert.ok(await input.evaluate((e) => e === document.activeElement), 'the input has the focus');
        await input.fill('never sent');
        await input.press('Escape');
        await mine.locator('.content', { hasText: 'a typo: teh end' }).waitFor();
        assert.equal(await mine.locator('[data-testid="edited"]').count(), 0);
        // Then for real: Save (Enter), and bob sees the new text marked "(edited)".
        await edit(alice, typo, 'a typo: the end');
        const theirs = byId(bob, general, typo);
        await theirs.locator('.content', { hasText: /^a typo: the end$/ }).waitFor();
        const marker = theirs.locator('[data-testid="edited"]', { hasText: '(edited)' });
        await marker.waitFor();
        const edited = bob.frames.find(([, f]) => f.type === 'message_edited' && f.data.message_id === typo);
        assert.equal(await marker.getAttribute('title'), edited[1].data.edited_at);
        assert.ok(!received(alice, (f) => f.type === 'message_edited' && f.data.content === 'never sent'));
        // Delete: asked in the row; "No" keeps it, "Yes" leaves a tombstone.
        const other = byId(alice, general, back);
        await other.locator('[data-testid="delete"]').click();
        await other.getByText('Delete this message?').waitFor();
        await other.locator('[data-testid="delete-no"]').click();
        await other.locator('[data-testid="delete"]').waitFor();
        assert.equal(await message(alice, general, 'a message to take back').count(), 1);
        await remove(alice, back);
        for (const p of [alice, bob]) await isTombstone(p, back, 'a message to take back');
        // Both rows kept their places.
        assert.deepEqual([await shownIds(alice, general), await shownIds(bob, general)], before);
    });

    await step('bob, offline meanwhile, recovers an edit and a deletion (since_id counts events)', async () => {
        await say(alice, 'edit me while bob is away');
        await say(alice, 'delete me while bob is away');
        await message(bob, general, 'delete me while bob is away').waitFor();
        const later = await idOf(alice, general, 'edit me while bob is away');
        const away = await idOf(alice, general, 'delete me while bob is away');
        // An edit bob sees: the newest id he has is this event's, not a message's.
        await edit(alice, later, 'edited once');
        await byId(bob, general, later).locator('.content', { hasText: 'edited once' }).waitFor();
        const seen = bob.frames.find(([, f]) => f.type === 'message_edited' && f.data.message_id === later)[1].data.id;
        const sockets = new Set(bob.frames.map(([n]) => n));
        // Offline stops new connections, not the open one: it drops as a lost network would.
        await bob.context.setOffline(true);
        await bob.page.evaluate(() => client.ws.close()); // the page's ChatClient
        await bob.page.locator('#status', { hasText: 'reconnecting' }).waitFor();
        await edit(alice, later, 'edited twice');
        await remove(alice, away);
        assert.equal(await message(bob, general, 'edited twice').count(), 0, 'bob is away');
        await bob.context.setOffline(false);
        await bob.page.locator('#status', { hasText: 'Reconnected.' }).waitFor({ timeout: 20_000 });
        await byId(bob, general, later).locator('.content', { hasText: /^edited twice$/ }).waitFor();
        await byId(bob, general, later).locator('[data-testid="edited"]').waitFor();
        await isTombstone(bob, away, 'delete me while bob is away');
        // Recovered by the re-join's replay, which began after the edit bob had.
        const fresh = bob.frames.filter(([n]) => !sockets.has(n)).map(([, f]) => f);
        const ack = fresh.find((f) => f.type === 'join_room_ack' && f.data.room === 'general');
        assert.ok(ack, 'bob re-joined general on a new connection');
        assert.equal(ack.data.recovered, true, 'with since_id, and recovered');
        assert.ok(fresh.some((f) => f.type === 'message_edited' && f.data.message_id === later && f.data.content === 'edited twice'));
        assert.ok(fresh.some((f) => f.type === 'message_deleted' && f.data.message_id === away));
        const replayed = ['room_message', 'notification', 'message_edited', 'message_deleted'];
        assert.ok(!fresh.some((f) => replayed.includes(f.type) && f.data.id <= seen), 'nothing replayed twice');
        assert.ok(!fresh.some((f) => f.type === 'message_history' && f.data.room === 'general'), 'no history needed');
    });

    await step('after a reload, history shows the edited text and the tombstones in place', async () => {
        const expected = await shownIds(alice, general);
        const sockets = new Set(bob.frames.map(([n]) => n));
        await bob.page.reload();
        await bob.page.locator('#whoami', { hasText: 'bob' }).waitFor();
        await message(bob, general, 'edited twice').waitFor();
        for (const [text, content] of [['a typo: teh end', 'a typo: the end'], ['edit me while bob is away', 'edited twice']]) {
            const id = await idOf(alice, general, content);
            await byId(bob, general, id).locator('.content', { hasText: new RegExp(`^${content}$`) }).waitFor();
            await byId(bob, general, id).locator('[data-testid="edited"]').waitFor();
            assert.equal(await message(bob, general, text).count(), 0);
        }
        const tombs = await view(alice, general).locator('li.message.deleted').evaluateAll((els) => els.map((e) => Number(e.dataset.id)));
        assert.equal(tombs.length, 2);
        await isTombstone(bob, tombs[0], 'a message to take back');
        await isTombstone(bob, tombs[1], 'delete me while bob is away');
        const page = bob.frames.find(([n, f]) => !sockets.has(n) && f.type === 'message_history' && f.data.room === 'general');
        assert.ok(page[1].data.messages.filter((m) => m.deleted).length === 2, 'tombstones from history');
        // The same rows, in the same order, as alice's page (kept through it all).
        assert.deepEqual(await shownIds(bob, general), expected.slice(-50));
    });

    await step('only the author has Edit and Delete, and not on a notification', async () => {
        const alices = await idOf(alice, general, 'a typo: the end');
        const bobs = await idOf(alice, general, 'back online');
        for (const [p, own, other] of [[alice, alices, bobs], [bob, bobs, alices]]) {
            await byId(p, general, own).locator('[data-testid="edit"]').waitFor();
            assert.equal(await byId(p, general, own).locator('[data-testid="delete"]').count(), 1, `${p.name}: own`);
            assert.equal(await byId(p, general, other).locator('button').count(), 0, `${p.name}: not another's`);
            assert.equal(await view(p, general).locator('li.notification button').count(), 0, `${p.name}: notification`);
            // Every row with Edit is the user's own.
            const users = await view(p, general).locator('li:has([data-testid="edit"]) .user').allTextContents();
            assert.ok(users.length > 0 && users.every((u) => u === p.name), `${p.name}: ${users}`);
        }
    });

    await step('no page errors, no CSP violations, no dialogs, no error frames', async () => {
        for (const p of pages) {
            assert.deepEqual(p.problems, [], p.name);
            assert.deepEqual(p.dialogs, [], p.name);
            assert.deepEqual(p.frames.filter(([, f]) => f.type === 'error'), [], p.name);
        }
    });

    await bob.page.screenshot({ path: join(ARTIFACTS, 'chat.png') });
    console.log(`# screenshot: ${join(ARTIFACTS, 'chat.png')}`);

    // --- search: a user of its own (its refused query is an error frame on purpose) ---

    await step('search: accents and case ignored, "No messages found", a click shows the match in its room', async () => {
        const dora = await openPage(browser, 'dora');
        await signIn(dora, 'dora');
        const { page } = dora;
        // Dora writes in random, then goes back to general; eve writes to her.
        await page.getByLabel('Join a room').fill('random');
        await page.locator('#join-submit').click();
        await page.locator('#view-title', { hasText: '# random' }).waitFor();
        await say(dora, 'Le Café est ouvert');
        await say(dora, 'the kitchen closes at ten');
        await message(dora, 'room:random', 'the kitchen closes at ten').waitFor();
        const cafe = await idOf(dora, 'room:random', 'Le Café est ouvert');
        const eve = await rawClient('eve');
        eve.send('direct_message', { to_user_id: dora.userId, content: 'un café, dora ?' }, 'e1');
        await eve.expect('eve\'s copy', (f) => f.request_id === 'e1' || f.type === 'error');
        assert.equal(eve.frames.filter((f) => f.type === 'error').length, 0, JSON.stringify(eve.frames));
        eve.close();
        // After a reload the page has general only: a match in random must open it.
        await page.reload();
        await page.locator('#status', { hasText: 'Connected.' }).waitFor();
        await page.locator('#view-title', { hasText: '# general' }).waitFor();
        assert.equal(await entry(dora, 'room:random').count(), 0, 'random is not open');

        const results = page.locator('#search-results [data-testid="search-result"]');
        const note = page.locator('#search-note');
        const error = page.locator('#search-error');
        const answers = () => dora.frames.filter(([, f]) => f.type === 'search_results' || f.type === 'error').length;
        // A search through the box, until its answer is shown.
        async function searchFor(query) {
            const before = answers();
            await page.getByLabel('Search messages').fill(query);
            await page.locator('#search-submit').click();
            await until(`the answer to "${query}"`, () => answers() > before);
            await until(`"${query}" answered on the page`, async () =>
                (await note.textContent()) !== 'Searching…' || (await error.isVisible()));
        }
        const contents = () => results.locator('[data-testid="search-content"]').allTextContents();

        for (const query of ['cafe', 'CAFÉ', 'caf*']) {
            await searchFor(query);
            assert.deepEqual(await contents(), ['un café, dora ?', 'Le Café est ouvert'], query);
            assert.equal(await note.textContent(), '2 messages found', query);
            assert.equal(await error.isVisible(), false, query);
            assert.equal(await page.locator('#search-more').isVisible(), false, query);
        }
        // Each match says where, who and when.
        const inRoom = results.filter({ hasText: 'Le Café est ouvert' });
        assert.equal(await inRoom.locator('[data-testid="search-where"]').textContent(), '#random');
        assert.equal(await inRoom.locator('.user').textContent(), 'dora');
        assert.match(await inRoom.locator('time').textContent(), /\d/);
        const inDm = results.filter({ hasText: 'un café, dora ?' });
        assert.equal(await inDm.locator('[data-testid="search-where"]').textContent(), 'DM with eve');
        assert.equal(await inDm.locator('.user').textContent(), 'eve');
        const sent = dora.frames.filter(([, f]) => f.type === 'search_results').at(-1)[1];
        assert.equal(sent.data.query, 'caf*');
        assert.equal(sent.data.has_more, false);

        await searchFor('zanzibar');
        await note.filter({ hasText: /^No messages found$/ }).waitFor();
        assert.equal(await results.count(), 0);

        // A click on the match in random: the room joined and shown, the message highlighted.
        await searchFor('cafe');
        await inRoom.locator('button').click();
        await page.locator('#view-title', { hasText: '# random' }).waitFor();
        await entry(dora, 'room:random').waitFor();
        const found = view(dora, 'room:random').locator(`li.message.found[data-id="${cafe}"]`);
        await found.waitFor();
        assert.ok(await found.evaluate((li) => {
            const shown = document.getElementById('views').getBoundingClientRect();
            const at = li.getBoundingClientRect();
            return at.top >= shown.top && at.bottom <= shown.bottom;
        }), 'scrolled into view');
        assert.ok(received(dora, (f) => f.type === 'join_room_ack' && f.data.room === 'random'));
        // The DM match opens the conversation with eve.
        const dmKey = await inDm.getAttribute('data-conv');
        await inDm.locator('button').click();
        await page.locator('#view-title', { hasText: 'eve' }).waitFor();
        await view(dora, dmKey).locator('li.message.found', { hasText: 'un café, dora ?' }).waitFor();
        assert.equal(await view(dora, 'room:random').locator('li.found').count(), 0, 'one highlight at a time');

        // Only the conversation shown: general has no café.
        await page.locator('#room-list button', { hasText: '# general' }).click();
        await page.getByLabel('Only in the conversation shown').check();
        await searchFor('cafe');
        assert.equal(await note.textContent(), 'No messages found in # general');
        const scoped = dora.frames.filter(([, f]) => f.type === 'search_results').at(-1)[1];
        assert.equal(scoped.data.messages.length, 0);
        await page.getByLabel('Only in the conversation shown').uncheck();

        // Markup found is shown as text.
        await searchFor('onerror');
        assert.deepEqual(await contents(), [XSS]);
        assert.equal(await page.locator('img').count(), 0);

        // "More": the 60 seeded messages, 20 at a time, newest first, once each.
        await searchFor('history');
        assert.equal(await results.count(), 20);
        assert.equal(await note.textContent(), '20 messages found, and older ones');
        for (const shown of [40, 60]) {
            await page.locator('#search-more').click();
            await until(`${shown} matches`, async () => (await results.count()) === shown);
        }
        await page.locator('#search-more').waitFor({ state: 'hidden' });
        assert.equal(await note.textContent(), '60 messages found');
        const texts = await contents();
        assert.deepEqual(texts, Array.from({ length: 60 }, (_, i) => `history ${String(60 - i).padStart(2, '0')}`));
        const ids = await results.evaluateAll((els) => els.map((e) => Number(e.dataset.id)));
        assert.deepEqual(ids, [...ids].sort((a, b) => b - a));
        const paged = dora.frames.filter(([, f]) => f.type === 'search_results' && f.data.query === 'history');
        assert.deepEqual(paged.map(([, f]) => [f.data.messages.length, f.data.has_more]), [[20, true], [20, true], [20, false]]);
        assert.equal(paged[2][1].data.next_before_id, null);

        // A query refused: its message under the box, not in the status line.
        await searchFor('c*');
        await error.filter({ hasText: 'prefix' }).waitFor();
        assert.equal(await error.getAttribute('data-code'), 'INVALID_FORMAT');
        assert.equal(await results.count(), 0);
        assert.equal(await note.textContent(), '');
        assert.doesNotMatch(await page.locator('#status').textContent(), /INVALID_FORMAT/);
        const refused = dora.frames.filter(([, f]) => f.type === 'error').map(([, f]) => f.data.code);
        assert.deepEqual(refused, ['INVALID_FORMAT']);
        // And the next search clears it.
        await searchFor('kitchen');
        assert.equal(await error.isVisible(), false);
        assert.deepEqual(await contents(), ['the kitchen closes at ten']);

        assert.deepEqual(dora.problems, []);
        assert.deepEqual(dora.dialogs, []);
        await page.screenshot({ path: join(ARTIFACTS, 'search.png') });
        await dora.context.close();
        pages.splice(pages.indexOf(dora), 1);
    });

    // --- moderation: last, as it refuses bob things on purpose ---------------------

    async function setRole(userId, role) {
        const res = await fetch(`${BASE}/api/rooms/general/roles/${userId}`, {
            method: 'PUT',
            headers: { authorization: `Bearer ${API_KEY}`, 'content-type': 'application/json' },
            body: JSON.stringify({ role }),
        });
        assert.equal(res.status, 200, `role: ${await res.clone().text()}`);
    }
    const member = (p, id) => p.page.locator(`#online-list li[data-user-id="${id}"]`);
    const status = (p, text) => p.page.locator('#status', { hasText: text });

    await step('a moderator kicks from the member list; the member reads "removed from #general"', async () => {
        // A member has no tools; made a moderator (the API), alice has them after a reload.
        assert.equal(await member(alice, bob.userId).locator('[data-testid="kick"]').count(), 0);
        await setRole(alice.userId, 'moderator');
        await alice.page.reload();
        await alice.page.locator('#whoami', { hasText: 'alice' }).waitFor();
        await alice.page.locator('#room-list button', { hasText: '# general' }).click();
        await member(alice, bob.userId).locator('[data-testid="kick"]').click();
        await status(bob, 'You were removed from #general').waitFor();
        await status(alice, `kick: user #${bob.userId} in #general`).waitFor();
        await member(alice, bob.userId).waitFor({ state: 'detached' });
        assert.ok(received(bob, (f) => f.type === 'kicked' && f.data.by_user_id === alice.userId));
        // bob has no tools on alice
        assert.equal(await member(bob, alice.userId).locator('button.moderate').count(), 0);
    });

    await step('mute: bob\'s message refused; ban: bob out, and refused when he comes back', async () => {
        await bob.page.reload(); // (a kick is not a ban: bob joins again)
        await bob.page.locator('#whoami', { hasText: 'bob' }).waitFor();
        await member(alice, bob.userId).locator('[data-testid="mute"]').click();
        await status(alice, `mute: user #${bob.userId} in #general until`).waitFor();
        await bob.page.locator('#room-list button', { hasText: '# general' }).click();
        await say(bob, 'can I speak?');
        await status(bob, 'You are muted in this room').waitFor();
        assert.equal(await message(alice, 'room:general', 'can I speak?').count(), 0);
        await member(alice, bob.userId).locator('[data-testid="ban"]').click();
        await status(bob, /You were removed from #general until/).waitFor();
        await bob.page.reload();
        await bob.page.locator('#whoami', { hasText: 'bob' }).waitFor();
        await status(bob, 'You are banned from this room').waitFor();
        const refusals = bob.frames.filter(([, f]) => f.type === 'error').map(([, f]) => f.data.code);
        assert.deepEqual(refusals, ['PERMISSION_DENIED', 'PERMISSION_DENIED']);
        assert.deepEqual(alice.frames.filter(([, f]) => f.type === 'error'), []);
    });

} catch (err) {
    failed = true;
    console.error(`not ok ${steps.length + 1} - ${err.stack || err}`);
    for (const p of pages) {
        await p.page.screenshot({ path: join(ARTIFACTS, `failure-${p.name}.png`) }).catch(() => {});
        if (p.problems.length) console.error(`# ${p.name}: ${p.problems.join('; ')}`);
    }
} finally {
    await browser.close();
}
console.log(`# ${steps.length} steps, ${failed ? 'FAILED' : 'passed'}, ${((Date.now() - started) / 1000).toFixed(1)} s`);
process.exit(failed ? 1 : 0);
