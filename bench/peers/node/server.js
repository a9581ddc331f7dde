'use strict';
/*
 * A small chat server on Node's `ws` package: the peer chatd is measured
 * against in bench/ (see docs/benchmarks.md). It speaks the subset of chatd's
 * protocol the benchmark uses, in the same JSON shape, and keeps everything in
 * memory (nothing is persisted):
 *
 *   ws://HOST:PORT/ws/chat?token=JWT   HS256 checked with node's crypto HMAC
 *                                      (exp required, 10 s leeway); a bad token
 *                                      is refused with HTTP 401
 *   join_room {room}                -> join_room_ack {room, success, message, members}
 *   room_message {room, content}    -> room_message to every member, the sender
 *                                      included, with a server-assigned increasing
 *                                      id and created_at; only the sender's copy
 *                                      carries its request_id
 *
 * The shared frame is JSON-encoded once and turned into one Buffer, which is
 * passed to every member's send() (ws then frames, and with permessage-deflate
 * compresses, per recipient: that is how ws works).
 *
 * Usage: node server.js --port 9001 --secret S [--deflate 0|1] [--max-seconds 900]
 * It exits on SIGTERM/SIGINT or after --max-seconds, whichever comes first.
 */
const http = require('http');
const crypto = require('crypto');
const { WebSocketServer } = require('ws');

function arg(name, fallback) {
  const i = process.argv.indexOf('--' + name);
  return i > 0 && i + 1 < process.argv.length ? process.argv[i + 1] : fallback;
}

const HOST = arg('host', '127.0.0.1');
const PORT = Number(arg('port', '9001'));
const SECRET = arg('secret', '');
const DEFLATE = arg('deflate', '0') === '1';
const MAX_SECONDS = Number(arg('max-seconds', '900'));
const LEEWAY = 10;
if (!SECRET) {
  console.error('node peer: --secret is required');
  process.exit(2);
}

/** HS256 JWT check: signature, alg, exp/nbf, user_id. Returns {user_id, username} or null. */
function verify(token) {
  if (typeof token !== 'string') return null;
  const parts = token.split('.');
  if (parts.length !== 3) return null;
  try {
    const mac = crypto.createHmac('sha256', SECRET).update(parts[0] + '.' + parts[1]).digest();
    const sig = Buffer.from(parts[2], 'base64url');
    if (sig.length !== mac.length || !crypto.timingSafeEqual(sig, mac)) return null;
    const header = JSON.parse(Buffer.from(parts[0], 'base64url').toString('utf8'));
    if (header.alg !== 'HS256') return null;
    const claims = JSON.parse(Buffer.from(parts[1], 'base64url').toString('utf8'));
    const now = Date.now() / 1000;
    if (typeof claims.exp !== 'number' || claims.exp + LEEWAY < now) return null;
    if (typeof claims.nbf === 'number' && claims.nbf - LEEWAY > now) return null;
    const id = claims.user_id;
    if (!Number.isSafeInteger(id) || id < 1) return null;
    const name = typeof claims.username === 'string' && claims.username ? claims.username : 'user' + id;
    return { user_id: id, username: name };
  } catch (e) {
    return null;
  }
}

const rooms = new Map(); // room name -> Set of sockets
let nextId = 0;

function send(ws, frame) {
  ws.send(JSON.stringify(frame));
}

function error(ws, code, message, requestId) {
  const frame = { type: 'error', data: { code, message }, timestamp: new Date().toISOString() };
  if (requestId !== undefined) frame.request_id = requestId;
  send(ws, frame);
}

function onMessage(ws, raw, isBinary) {
  if (isBinary) return error(ws, 'INVALID_FORMAT', 'binary frames are not supported');
  let msg;
  try {
    msg = JSON.parse(raw);
  } catch (e) {
    return error(ws, 'INVALID_FORMAT', 'not JSON');
  }
  const data = msg && typeof msg.data === 'object' && msg.data !== null ? msg.data : {};
  const rid = msg ? msg.request_id : undefined;
  if (msg.type === 'join_room') {
    const room = data.room;
    if (typeof room !== 'string' || !room) return error(ws, 'INVALID_FORMAT', 'room required', rid);
    let members = rooms.get(room);
    if (!members) rooms.set(room, (members = new Set()));
    members.add(ws);
    ws.rooms.add(room);
    const seen = new Map();
    for (const m of members) seen.set(m.ident.user_id, m.ident.username);
    const list = [];
    for (const [user_id, username] of seen) list.push({ user_id, username });
    const ack = {
      type: 'join_room_ack',
      data: { room, success: true, message: 'Joined room successfully', members: list },
      timestamp: new Date().toISOString(),
    };
    if (rid !== undefined) ack.request_id = rid;
    return send(ws, ack);
  }
  if (msg.type === 'room_message') {
    const room = data.room;
    const members = rooms.get(room);
    if (!members || !members.has(ws)) return error(ws, 'PERMISSION_DENIED', 'not in room', rid);
    const content = data.content;
    if (typeof content !== 'string' || !content.trim()) return error(ws, 'INVALID_FORMAT', 'content', rid);
    const now = new Date().toISOString();
    const frame = {
      type: 'room_message',
      data: {
        id: ++nextId, room, user_id: ws.ident.user_id, username: ws.ident.username,
        content, message_type: 'text', created_at: now,
      },
      timestamp: now,
      user_id: ws.ident.user_id,
    };
    const shared = Buffer.from(JSON.stringify(frame));
    let own = shared;
    if (rid !== undefined) {
      frame.request_id = rid;
      own = Buffer.from(JSON.stringify(frame));
    }
    for (const m of members) m.send(m === ws ? own : shared, { binary: false });
    return undefined;
  }
  return error(ws, 'INVALID_FORMAT', 'unsupported type', rid);
}

const wss = new WebSocketServer({
  noServer: true,
  maxPayload: 1 << 20,
  // threshold 128 as chatd (ws's default is 1024); otherwise ws's defaults.
  perMessageDeflate: DEFLATE ? { threshold: 128 } : false,
});

const server = http.createServer((req, res) => {
  res.writeHead(req.url === '/healthz' ? 200 : 404, { 'content-type': 'text/plain' });
  res.end(req.url === '/healthz' ? 'ok\n' : 'not found\n');
});

server.on('upgrade', (req, socket, head) => {
  const url = new URL(req.url, 'http://localhost');
  if (url.pathname !== '/ws/chat') {
    socket.end('HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n');
    return;
  }
  const ident = verify(url.searchParams.get('token'));
  if (!ident) {
    socket.end('HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n');
    return;
  }
  wss.handleUpgrade(req, socket, head, (ws) => {
    ws.ident = ident;
    ws.rooms = new Set();
    ws.on('message', (raw, isBinary) => onMessage(ws, raw, isBinary));
    ws.on('error', () => {});
    ws.on('close', () => {
      for (const room of ws.rooms) {
        const members = rooms.get(room);
        if (members) {
          members.delete(ws);
          if (members.size === 0) rooms.delete(room);
        }
      }
    });
  });
});

server.listen({ host: HOST, port: PORT, backlog: 4096 }, () => {
  console.log(`node ws peer listening on ${HOST}:${server.address().port} deflate=${DEFLATE}`);
});

function stop() {
  process.exit(0);
}
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
setTimeout(stop, MAX_SECONDS * 1000);
