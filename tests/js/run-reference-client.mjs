// Drives the seed's WebSocketClient, unchanged, against a running chatd.
//
// The class hard-codes ws://localhost:8080; the only thing this harness
// changes is the global WebSocket, which it wraps to point that address at the
// test server's port (CHATD_PORT). Prints one JSON line with what it saw.
// Needs Node.js with a global WebSocket (Node 22+, or 20/21 with
// --experimental-websocket).
import { readFileSync } from "node:fs";

const port = process.env.CHATD_PORT;
const token = process.env.CHATD_TOKEN;
const NativeWebSocket = globalThis.WebSocket;
globalThis.WebSocket = class extends NativeWebSocket {
  constructor(url, protocols) {
    super(url.replace("ws://localhost:8080", `ws://127.0.0.1:${port}`), protocols);
  }
};

const source = readFileSync(new URL("../../chatd/web/websocket-client.js", import.meta.url), "utf8");
const WebSocketClient = new Function(`${source}\nreturn WebSocketClient;`)();
console.log = () => {}; // the class logs in French on every open/close

const seen = { acks: [], messages: [], history: null, errors: [] };
const client = new WebSocketClient(token);
const done = new Promise((resolve) => {
  client.onMessage("join_room_ack", (data) => {
    seen.acks.push(data);
    client.sendRoomMessage("general", "Bonjour tout le monde !");
  });
  client.onMessage("room_message", (data) => {
    seen.messages.push(data);
    client.getRoomHistory("general", 10, 0);
  });
  client.onMessage("message_history", (data) => {
    seen.history = data;
    resolve();
  });
  client.onMessage("error", (data) => {
    seen.errors.push(data);
    resolve();
  });
});
client.connect();
const opened = setInterval(() => {
  if (client.ws && client.ws.readyState === NativeWebSocket.OPEN) {
    clearInterval(opened);
    client.joinRoom("general");
  }
}, 10);
const timeout = setTimeout(() => {
  process.stdout.write(JSON.stringify({ ...seen, timeout: true }) + "\n");
  process.exit(1);
}, 10000);
await done;
clearTimeout(timeout);
client.maxReconnectAttempts = 0; // let the process end after disconnect
client.disconnect();
process.stdout.write(JSON.stringify(seen) + "\n");
process.exit(0);
