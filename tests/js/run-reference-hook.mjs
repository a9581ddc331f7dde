// Drives the seed's useWebSocket React hook, unchanged, against a running
// chatd: rendered with react-test-renderer, it connects (through the seed's
// WebSocketClient), joins a room, sends a room message and a direct message,
// and asks for history; the hook's own handlers collect what comes back.
// Like run-seed-client.mjs, it only wraps the global WebSocket so that the
// client's hard-coded ws://localhost:8080 reaches the test server.
// Prints one JSON line: the hook's `messages` state at the end.
import { readFileSync } from "node:fs";
import React from "react";
import TestRenderer from "react-test-renderer";

const port = process.env.CHATD_PORT;
const token = process.env.CHATD_TOKEN;
const peer = Number(process.env.CHATD_PEER);
const NativeWebSocket = globalThis.WebSocket;
let socket = null; // the hook exposes no "open" state (it never sets `connected`)
globalThis.WebSocket = class extends NativeWebSocket {
  constructor(url, protocols) {
    super(url.replace("ws://localhost:8080", `ws://127.0.0.1:${port}`), protocols);
    socket = this;
  }
};
globalThis.IS_REACT_ACT_ENVIRONMENT = true;
const source = readFileSync(new URL("../../chatd/web/websocket-client.js", import.meta.url), "utf8");
globalThis.WebSocketClient = new Function(`${source}\nreturn WebSocketClient;`)();
console.log = () => {};
const { useWebSocket } = await import("./use-websocket.mjs");

let hook = null;
function App() {
  hook = useWebSocket(token);
  return null;
}

const { act } = TestRenderer;
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
async function until(check, what) {
  for (let i = 0; i < 500; i++) {
    if (check()) return;
    await act(async () => { await sleep(10); });
  }
  process.stdout.write(JSON.stringify({ timeout: what, messages: hook && hook.messages }) + "\n");
  process.exit(1);
}

let renderer;
await act(async () => { renderer = TestRenderer.create(React.createElement(App)); });
await until(() => socket && socket.readyState === NativeWebSocket.OPEN, "open");
await act(async () => { hook.joinRoom("general"); });
await act(async () => { await sleep(50); });
await act(async () => { hook.sendMessage("general", "hello from the hook"); });
await until(() => hook.messages.some((m) => m.content === "hello from the hook"), "room message");
// `client` is the WebSocketClient, handed out once a message has re-rendered.
await act(async () => { hook.client.sendDirectMessage(peer, "psst from the hook"); });
await until(() => hook.messages.some((m) => m.content === "psst from the hook"), "direct message");
await act(async () => { hook.client.getRoomHistory("general", 50, 0); });
await until(() => hook.messages.length >= 3, "history");
const messages = hook.messages;
await act(async () => {
  hook.client.maxReconnectAttempts = 0;
  renderer.unmount(); // the hook's cleanup disconnects
});
process.stdout.write(JSON.stringify({ messages }) + "\n");
process.exit(0);
