// The pgsession dashboard in a real headless Chromium (playwright-core, the
// system's /usr/bin/chromium; no browser is downloaded).
//
//   node e2e/dashboard.mjs http://127.0.0.1:PORT
//
// Driven by crates/pgsession-cli/tests/cli/dashboard.rs, which runs
// `pgsession serve` behind a fault proxy. The two talk over this process's
// stdio: the script prints `@@ want <step>` (load, fault, heal) when the page
// is ready for it and waits for `ok <step>` on stdin; `@@ done <json>` ends.
// Anything else it prints is a log for the person reading a failure.
//
// It checks that the page loads nothing from anywhere but the server, draws
// its figures, that they move under load, that the breaker shown goes to
// `open` when the database goes away and back to `closed` after it returns;
// it saves screenshots taken during the fault (desktop and a 390×844 phone)
// into SCREENSHOT_DIR (default: docs/ of the repository).
//
// Environment: CHROMIUM (default /usr/bin/chromium), SCREENSHOT_DIR,
// STEP_TIMEOUT_MS (default 60000), LOAD_MS (15000), FAULT_MS (6000).

import { existsSync, mkdirSync, mkdtempSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const base = (process.argv[2] || "").replace(/\/$/, "");
const chromiumPath = process.env.CHROMIUM || "/usr/bin/chromium";
const shotDir = resolve(process.env.SCREENSHOT_DIR || join(here, "..", "docs"));
const STEP_TIMEOUT = Number(process.env.STEP_TIMEOUT_MS) || 60_000;
// How long the page watches the load before the fault, and the fault before
// the screenshot.
const LOAD_MS = Number(process.env.LOAD_MS) || 15_000;
const FAULT_MS = Number(process.env.FAULT_MS) || 6_000;
const started = Date.now();

const log = (...args) => console.log(`[${((Date.now() - started) / 1000).toFixed(1)}s]`, ...args);
function fail(message) {
  throw new Error(message);
}

if (!/^https?:\/\/[^/]+$/.test(base)) {
  console.error("usage: node e2e/dashboard.mjs http://127.0.0.1:PORT");
  process.exit(2);
}
if (!existsSync(chromiumPath)) {
  console.error(
    `FAIL: no Chromium at ${chromiumPath}. Install it (apt-get install -y chromium) or set CHROMIUM=/path/to/chromium.`,
  );
  process.exit(1);
}
let chromium;
try {
  ({ chromium } = await import("playwright-core"));
} catch (e) {
  console.error(`FAIL: cannot load playwright-core (run \`npm ci\` in ${here}): ${e.message}`);
  process.exit(1);
}

// ---- the Rust test at the other end of stdio ------------------------------
const replies = [];
const waiters = [];
createInterface({ input: process.stdin }).on("line", (line) => {
  const waiter = waiters.shift();
  if (waiter) waiter(line.trim());
  else replies.push(line.trim());
});
async function want(step) {
  console.log(`@@ want ${step}`);
  const reply = replies.length
    ? replies.shift()
    : await new Promise((res, rej) => {
        const timer = setTimeout(() => rej(new Error(`no answer from the test to "want ${step}"`)), STEP_TIMEOUT);
        waiters.push((line) => {
          clearTimeout(timer);
          res(line);
        });
      });
  if (reply !== `ok ${step}`) fail(`the test answered ${JSON.stringify(reply)} to "want ${step}"`);
  log(`${step}: done by the test`);
}

// ---- the page ----------------------------------------------------------------
const profile = mkdtempSync(join(tmpdir(), "pgsession-dashboard-chromium-"));
const context = await chromium.launchPersistentContext(profile, {
  executablePath: chromiumPath,
  headless: true,
  viewport: { width: 1280, height: 900 },
  args: [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
  ],
});
const summary = { base, screenshots: [] };
let page;
try {
  page = context.pages()[0] ?? (await context.newPage());
  const problems = [];
  const foreign = [];
  page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
  page.on("console", (m) => {
    if (m.type() === "error") problems.push(`console error: ${m.text()}`);
  });
  page.on("request", (r) => {
    const url = r.url();
    if (!url.startsWith(base + "/") && !url.startsWith("data:")) foreign.push(url);
  });

  const text = (id) => page.locator(`[data-testid="${id}"]`).first().innerText();
  const number = async (id) => {
    const t = (await text(id)).replace(/,/g, "").trim();
    return t === "–" || t === "" ? null : Number.parseFloat(t);
  };
  const dataset = (id, key) => page.locator(`[data-testid="${id}"]`).first().getAttribute(`data-${key}`);
  async function until(what, check, timeout = STEP_TIMEOUT) {
    const deadline = Date.now() + timeout;
    let last;
    for (;;) {
      try {
        last = await check();
        if (last === true) return;
      } catch (e) {
        last = e.message;
      }
      if (Date.now() > deadline) fail(`timed out after ${timeout} ms waiting for ${what} (last: ${JSON.stringify(last)})`);
      await page.waitForTimeout(250);
    }
  }
  const polls = async () => Number(await dataset("dashboard", "polls"));
  // Coloured pixels in a canvas' plot area: proof that something was drawn.
  const inked = (id) =>
    page.evaluate((id) => {
      const c = document.querySelector(`[data-testid="${id}"]`);
      const g = c.getContext("2d");
      const { data } = g.getImageData(0, 0, c.width, c.height);
      let n = 0;
      for (let i = 0; i < data.length; i += 4) {
        const [r, gr, b, a] = [data[i], data[i + 1], data[i + 2], data[i + 3]];
        if (a > 0 && Math.max(r, gr, b) - Math.min(r, gr, b) > 60) n++;
      }
      return n;
    }, id);

  const response = await page.goto(`${base}/dashboard?interval=1`, { waitUntil: "load" });
  if (!response || response.status() !== 200) fail(`GET /dashboard answered ${response && response.status()}`);
  await until("three polls of /health and /metrics", async () => (await polls()) >= 3 || `polls=${await polls()}`);
  await until("the breaker shown closed", async () => (await text("breaker-state")) === "closed" || (await text("breaker-state")));
  const before = {
    requests: await number("requests-total"),
    operations: await number("operations-total"),
    polls: await polls(),
  };
  log("before load:", JSON.stringify(before));
  summary.before = before;

  // ---- under load: the figures move ----------------------------------------
  await want("load");
  const loadAt = Date.now();
  await until("requests counted under load", async () => {
    const now = await number("requests-total");
    return now >= before.requests + 30 || `requests-total=${now}`;
  });
  await until("a request rate, an acquire time and query times per operation", async () => {
    const rate = await number("requests-rate");
    const p99 = await text("acquire-p99");
    const legend = await text("query-legend");
    const ok = rate > 0 && /\d/.test(p99) && /load\s+[\d.]+\s*(µs|ms|s)/.test(legend) && /save\s+[\d.]+\s*(µs|ms|s)/.test(legend);
    return ok || `rate=${rate} p99=${p99} legend=${legend}`;
  });
  const loaded = {
    requests: await number("requests-total"),
    operations: await number("operations-total"),
    rate: await number("requests-rate"),
    acquireP50: await text("acquire-p50"),
    acquireP99: await text("acquire-p99"),
    queryLegend: await text("query-legend"),
    poolMax: await number("pool-max"),
  };
  log("under load:", JSON.stringify(loaded));
  if (!(loaded.operations > before.operations)) fail(`operations-total did not move: ${before.operations} -> ${loaded.operations}`);
  if (!(loaded.poolMax >= 1)) fail(`pool max shown is ${loaded.poolMax}`);
  summary.underLoad = loaded;
  // A few more seconds of load, so that the charts (and the screenshot)
  // show it before the fault.
  await page.waitForTimeout(Math.max(0, LOAD_MS - (Date.now() - loadAt)));
  summary.inked = {};
  for (const chart of ["chart-rps", "chart-acquire", "chart-query", "chart-pool", "chart-errors", "chart-journal", "breaker-timeline"]) {
    const n = await inked(chart);
    summary.inked[chart] = n;
    if (n < 30) fail(`the ${chart} canvas looks empty (${n} coloured pixels)`);
  }

  // ---- the database goes away: the breaker opens -----------------------------
  await want("fault");
  const faultAt = Date.now();
  await until("the breaker shown open", async () => (await text("breaker-state")) === "open" || (await text("breaker-state")));
  summary.openAfterMs = Date.now() - faultAt;
  log(`breaker open on the page after ${summary.openAfterMs} ms`);
  await until("a breaker event in the list", async () => {
    const events = await page.locator('[data-testid="events"] li[data-kind="breaker"]').allInnerTexts();
    return events.some((e) => /-> open/.test(e)) || `events=${JSON.stringify(events)}`;
  }, 15_000);
  const status = await text("status");
  if (status !== "degraded") fail(`status shown during the fault is ${JSON.stringify(status)}, expected degraded`);
  // Let the red band and the rates grow a little before the picture.
  await page.waitForTimeout(FAULT_MS);
  if ((await text("breaker-state")) !== "open" && (await text("breaker-state")) !== "half_open") {
    fail(`the breaker shown left open too soon: ${await text("breaker-state")}`);
  }
  summary.duringFault = {
    status,
    errorsPerMin: await text("errors-per-min"),
    fallbackPerMin: await text("fallback-per-min"),
    journal: await number("journal-entries"),
    seen: await dataset("breaker-timeline", "seen"),
  };
  log("during the fault:", JSON.stringify(summary.duringFault));
  mkdirSync(shotDir, { recursive: true });
  const desktop = join(shotDir, "dashboard-fault.png");
  await page.screenshot({ path: desktop, fullPage: true });
  summary.screenshots.push({ path: desktop, bytes: statSync(desktop).size });
  await page.setViewportSize({ width: 390, height: 844 });
  await page.waitForTimeout(1500);
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  if (overflow > 1) fail(`the page is ${overflow}px wider than a 390px phone screen`);
  const phone = join(shotDir, "dashboard-phone.png");
  await page.screenshot({ path: phone });
  summary.screenshots.push({ path: phone, bytes: statSync(phone).size });
  await page.setViewportSize({ width: 1280, height: 900 });
  log("screenshots:", summary.screenshots.map((s) => `${s.path} (${s.bytes} bytes)`).join(", "));

  // ---- the database returns: the breaker closes ------------------------------
  await want("heal");
  const healAt = Date.now();
  await until("the breaker shown closed again", async () => (await text("breaker-state")) === "closed" || (await text("breaker-state")));
  summary.closedAfterMs = Date.now() - healAt;
  log(`breaker closed on the page after ${summary.closedAfterMs} ms`);
  const seen = (await dataset("breaker-timeline", "seen")) || "";
  if (!seen.split(" ").includes("open") || !seen.split(" ").includes("closed")) fail(`breaker timeline saw ${JSON.stringify(seen)}`);
  await until("a breaker event back to closed", async () => {
    const events = await page.locator('[data-testid="events"] li[data-kind="breaker"]').allInnerTexts();
    return events.some((e) => /-> closed/.test(e)) || `events=${JSON.stringify(events)}`;
  }, 15_000);
  summary.after = { requests: await number("requests-total"), journal: await number("journal-entries") };

  if (foreign.length) fail(`the page fetched from elsewhere than ${base}: ${foreign.join(", ")}`);
  if (problems.length) fail(`the page reported errors:\n  ${problems.join("\n  ")}`);
  console.log(`@@ done ${JSON.stringify(summary)}`);
} catch (e) {
  console.error(`FAIL: ${e.message}`);
  if (page) {
    const debug = join(tmpdir(), `pgsession-dashboard-failure-${process.pid}.png`);
    await page.screenshot({ path: debug, fullPage: true }).catch(() => {});
    console.error(`(a screenshot of the page as it was: ${debug})`);
    const body = await page.locator("body").innerText().catch(() => "");
    console.error(`--- page text ---\n${body}`);
  }
  process.exitCode = 1;
} finally {
  await context.close().catch(() => {});
  rmSync(profile, { recursive: true, force: true });
  process.stdin.destroy();
}
