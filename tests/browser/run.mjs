// Drives the page (index.html + dist/app.js) in headless Chromium against a
// running metadata-service, from an origin other than the service's, and
// prints what the browser saw. tests/real_binary/browser.rs runs it.
//
//   node run.mjs --server http://127.0.0.1:50051 --token JWT --user USER \
//     --other-user OTHER --page-port PORT [--chromium /usr/bin/chromium]
//
// The page is served at http://127.0.0.1:PORT (the origin the server must
// allow) and again at http://127.0.0.1:<another port> (an origin it must
// not). Protocol on stdout, one line each:
//   ORIGINS <allowed> <other>
//   WATCHING                  the page's Watch of USER is open: write now,
//                             then send any line on stdin
//   RESULT <json>             everything the page reported
// Progress goes to stderr. Exit status 0 once RESULT is printed, whatever
// the results (the caller judges them), else 1.

import { readFile } from "node:fs/promises";
import { createServer } from "node:http";
import { dirname, join } from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import { chromium } from "playwright-core";

const HERE = dirname(fileURLToPath(import.meta.url));
/** The whole run, page loads and the wait for the caller's write included. */
const LIMIT_MS = 50_000;

const { values: opts } = parseArgs({
  options: {
    server: { type: "string" },
    token: { type: "string" },
    user: { type: "string" },
    "other-user": { type: "string" },
    "page-port": { type: "string" },
    chromium: { type: "string", default: process.env.CHROMIUM ?? "/usr/bin/chromium" },
  },
});
for (const name of ["server", "token", "user", "other-user", "page-port"]) {
  if (!opts[name]) {
    console.error(`run.mjs: --${name} is required`);
    process.exit(1);
  }
}

const log = (...args) => console.error("run.mjs:", ...args);
const say = (line) => process.stdout.write(`${line}\n`);

setTimeout(() => {
  log(`still running after ${LIMIT_MS} ms: giving up`);
  process.exit(1);
}, LIMIT_MS).unref();

/** Lines of stdin, one at a time. */
const stdin = createInterface({ input: process.stdin })[Symbol.asyncIterator]();

const FILES = {
  "/index.html": ["index.html", "text/html; charset=utf-8"],
  "/app.js": ["dist/app.js", "text/javascript; charset=utf-8"],
};

/** A static server of the page on 127.0.0.1:port (0: any free port). */
async function serve(port) {
  const server = createServer(async (req, res) => {
    const path = new URL(req.url, "http://x").pathname;
    const file = FILES[path === "/" ? "/index.html" : path];
    if (path === "/favicon.ico") {
      res.writeHead(204).end();
      return;
    }
    if (!file) {
      res.writeHead(404).end();
      return;
    }
    try {
      const body = await readFile(join(HERE, file[0]));
      res.writeHead(200, { "content-type": file[1], "cache-control": "no-store" }).end(body);
    } catch (err) {
      res.writeHead(500).end(String(err));
    }
  });
  await new Promise((resolve, reject) => {
    server.once("error", reject);
    server.listen(port, "127.0.0.1", resolve);
  });
  return { server, origin: `http://127.0.0.1:${server.address().port}` };
}

/** A page of `origin`, its console and its failed requests recorded. */
async function open(browser, origin) {
  const context = await browser.newContext();
  const page = await context.newPage();
  const seen = { console: [], failedRequests: [], pageErrors: [] };
  page.on("console", (m) => seen.console.push(`${m.type()}: ${m.text()}`));
  page.on("pageerror", (e) => seen.pageErrors.push(String(e)));
  page.on("requestfailed", (r) =>
    seen.failedRequests.push(`${r.method()} ${r.url()}: ${r.failure()?.errorText}`),
  );
  const query = new URLSearchParams({ server: opts.server, token: opts.token });
  await page.goto(`${origin}/index.html?${query}`);
  await page.waitForFunction(() => window.ready === true, null, { timeout: 10_000 });
  return { page, seen };
}

/** window.run(step, args) in the page; a throw is reported, not raised. */
async function step(page, name, args = {}) {
  try {
    const out = await page.evaluate(([s, a]) => window.run(s, a), [name, args]);
    log(name, JSON.stringify(out));
    return out;
  } catch (err) {
    log(name, "threw", err);
    return { thrown: String(err) };
  }
}

const allowed = await serve(Number(opts["page-port"]));
const other = await serve(0);
say(`ORIGINS ${allowed.origin} ${other.origin}`);

const browser = await chromium.launch({
  executablePath: opts.chromium,
  args: ["--no-sandbox"],
  headless: true,
});
const results = { browser: browser.version() };
try {
  const { page, seen } = await open(browser, allowed.origin);
  const user = opts.user;
  const otherUser = opts["other-user"];
  // (a) own record: public and unsafe metadata, no private.
  results.getOwn = await step(page, "get", { userId: user });
  // (b) own unsafe metadata.
  results.mergeUnsafe = await step(page, "merge", {
    userId: user,
    unsafeMetadata: { fromBrowser: { step: "b" } },
  });
  // (c) private metadata: refused.
  results.mergePrivate = await step(page, "merge", {
    userId: user,
    privateMetadata: { fromBrowser: "must not land" },
  });
  // (d) someone else's record: refused.
  results.getOther = await step(page, "get", { userId: otherUser });
  // (e) Watch of its own user; the caller writes once it is open.
  results.watchStart = await step(page, "watchStart", { userIds: [user] });
  say("WATCHING");
  const written = await stdin.next();
  if (written.done) {
    throw new Error("stdin closed before the caller wrote");
  }
  results.watchEvents = await step(page, "watchEvents", { count: 1, timeoutMs: 10_000 });
  // Before the stop, whose aborted request is no failure of the page.
  results.allowedPage = structuredClone(seen);
  await step(page, "watchStop");

  // (f) a page of an origin the server does not allow.
  const blocked = await open(browser, other.origin);
  results.otherOriginGet = await step(blocked.page, "get", { userId: user });
  // Chromium reports the CORS refusal on the console, just after the fetch fails.
  const deadline = Date.now() + 2_000;
  while (!blocked.seen.console.some((l) => l.includes("CORS")) && Date.now() < deadline) {
    await new Promise((r) => setTimeout(r, 50));
  }
  results.otherOriginPage = blocked.seen;
} catch (err) {
  results.error = String(err?.stack ?? err);
} finally {
  await browser.close();
  allowed.server.close();
  other.server.close();
}
say(`RESULT ${JSON.stringify(results)}`);
process.exit(0);
