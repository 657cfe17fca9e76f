// End-to-end: a page in headless Chromium uses MQTT.js (its browser bundle)
// to reach Tern at ws://127.0.0.1:<WS_PORT>/mqtt (or at BROKER_URL, which
// run.sh sets to the wss:// listener for the second run), subscribes,
// publishes, and must receive its own message and one a TCP client (the node
// `mqtt` package on TCP_PORT) sends. Run by run.sh, which starts and stops
// the broker; every wait here is bounded.
import http from "node:http";
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";
import mqtt from "mqtt";

const here = path.dirname(fileURLToPath(import.meta.url));
const TCP_PORT = Number(process.env.TCP_PORT);
const WS_PORT = Number(process.env.WS_PORT);
const WS_PATH = process.env.WS_PATH || "/mqtt";
// wss:// with the test certificate: Chromium is told to accept it (the
// certificate chain itself is verified by the TLS interop tests).
const BROKER_URL = process.env.BROKER_URL || `ws://127.0.0.1:${WS_PORT}${WS_PATH}`;
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
const WAIT_MS = 15000;
if (!TCP_PORT || !WS_PORT) {
  console.error("set TCP_PORT and WS_PORT (run.sh does)");
  process.exit(2);
}

// Whole-test watchdog: never hang, whatever happens.
const watchdog = setTimeout(() => {
  console.error("browser test: timed out after 90 s");
  process.exit(1);
}, 90000);

function assert(cond, what) {
  if (!cond) throw new Error("assertion failed: " + what);
}

// A static server on 127.0.0.1:0 for the page and the MQTT.js bundle.
const files = {
  "/": ["index.html", "text/html"],
  "/index.html": ["index.html", "text/html"],
  "/mqtt.min.js": ["node_modules/mqtt/dist/mqtt.min.js", "text/javascript"],
};
const server = http.createServer((req, res) => {
  const entry = files[new URL(req.url, "http://x").pathname];
  if (!entry) {
    res.writeHead(404).end();
    return;
  }
  res.writeHead(200, { "content-type": entry[1] });
  fs.createReadStream(path.join(here, entry[0])).pipe(res);
});
await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
const httpPort = server.address().port;

let browser;
let tcp;
let failed = false;
try {
  // The TCP side: subscribes to what the page sends, publishes to the page.
  tcp = mqtt.connect(`mqtt://127.0.0.1:${TCP_PORT}`, {
    clientId: "tern-browser-tcp",
    reconnectPeriod: 0,
    connectTimeout: WAIT_MS,
  });
  const tcpGot = [];
  tcp.on("message", (topic, payload) => tcpGot.push({ topic, payload: payload.toString() }));
  await new Promise((resolve, reject) => {
    tcp.once("connect", resolve);
    tcp.once("error", reject);
  });
  await tcp.subscribeAsync("browser/self", { qos: 1 });

  browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    timeout: WAIT_MS,
    args: [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
      "--ignore-certificate-errors",
    ],
  });
  const context = await browser.newContext({ ignoreHTTPSErrors: true });
  const page = await context.newPage();
  const consoleLines = [];
  page.on("console", (m) => consoleLines.push(m.text()));
  page.on("pageerror", (e) => consoleLines.push("pageerror: " + e.message));
  const brokerUrl = BROKER_URL;
  await page.goto(
    `http://127.0.0.1:${httpPort}/index.html?broker=${encodeURIComponent(brokerUrl)}`,
    { timeout: WAIT_MS },
  );
  try {
    await page.waitForFunction(() => window.tern && window.tern.subscribed, null, {
      timeout: WAIT_MS,
    });
  } catch (e) {
    const state = await page.evaluate(() => window.tern).catch(() => null);
    throw new Error(`page never subscribed: ${JSON.stringify(state)} ${consoleLines.join(" | ")}`);
  }

  await tcp.publishAsync("browser/tcp", "hello from tcp", { qos: 1 });
  await page
    .waitForFunction(() => window.tern.received.length >= 2, null, { timeout: WAIT_MS })
    .catch(() => {});
  const state = await page.evaluate(() => window.tern);
  console.log("page state:", JSON.stringify(state));
  const deadline = Date.now() + WAIT_MS;
  while (tcpGot.length < 1 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));

  assert(state.connected, "the page connected over WebSocket");
  assert(JSON.stringify(state.granted) === "[1]", "SUBACK granted QoS 1");
  assert(state.errors.length === 0, "no MQTT.js errors: " + state.errors.join("; "));
  const got = state.received.map((m) => `${m.topic}=${m.payload}`).sort();
  assert(
    JSON.stringify(got) ===
      JSON.stringify(["browser/self=hello from the page", "browser/tcp=hello from tcp"]),
    "the page received its own and the TCP client's message, got " + JSON.stringify(got),
  );
  assert(
    tcpGot.length === 1 && tcpGot[0].payload === "hello from the page",
    "the TCP client received the page's message, got " + JSON.stringify(tcpGot),
  );
  console.log(`browser test passed: MQTT.js in Chromium over ${brokerUrl} talked to a TCP client`);
} catch (e) {
  failed = true;
  console.error("browser test FAILED:", e && e.stack ? e.stack : e);
} finally {
  if (browser) await browser.close().catch(() => {});
  if (tcp) tcp.end(true);
  server.close();
  clearTimeout(watchdog);
}
process.exit(failed ? 1 : 0);
