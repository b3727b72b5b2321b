// The pgsession dashboard in a real headless Chromium (playwright-core, the
// system's /usr/bin/chromium; no browser is downloaded).
//
//   node e2e/dashboard.mjs http://127.0.0.1:PORT
//
// Driven by crates/pgsession-cli/tests/cli/dashboard.rs, which runs
// `pgsession serve` behind a fault proxy. The two talk over this process's
// stdio: the script prints `@@ want <step>` (load, fault, conflict, heal)
// when the page is ready for it and waits for `ok <step>` on stdin;
// `@@ done <json>` ends. Anything else it prints is a log for the person
// reading a failure.
//
// What it checks, as an operator would meet it:
//
// - a page open from the start: its figures move under load; when the
//   database goes away the breaker shows `open` and the "Database health"
//   card is failing, never a green "ok";
// - a second page opened in the middle of the outage: at its first poll it
//   already draws what came before (the server's history: load, the breaker
//   closed then open), its card is failing, and the timeline shows the
//   outage under way and the breaker's probes folded into one entry;
// - after the database returns: one outage entry with its start, end and
//   duration, one probing entry with its count, the journal's write-back
//   with its progress, and the write-back conflict and dead letter, each
//   pointing at `pgsession journal list`;
// - nothing is fetched from anywhere but the server, and no page error.
//
// Screenshots (the mid-incident page on a desktop and a 390×844 phone, and
// the recovered page) go to SCREENSHOT_DIR (default: target/ of the
// repository).
//
// Environment: CHROMIUM (default /usr/bin/chromium), SCREENSHOT_DIR,
// STEP_TIMEOUT_MS (default 60000), LOAD_MS (15000), PROBES (5: failed
// probes seen before the second page opens).

import { existsSync, mkdirSync, mkdtempSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const base = (process.argv[2] || "").replace(/\/$/, "");
const chromiumPath = process.env.CHROMIUM || "/usr/bin/chromium";
const shotDir = resolve(process.env.SCREENSHOT_DIR || join(here, "..", "target", "dashboard-screenshots"));
const STEP_TIMEOUT = Number(process.env.STEP_TIMEOUT_MS) || 60_000;
// How long the page watches the load before the fault.
const LOAD_MS = Number(process.env.LOAD_MS) || 15_000;
// Failed probes folded into the timeline before the second page opens.
const PROBES = Number(process.env.PROBES) || 5;
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

// ---- pages -------------------------------------------------------------------
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
const problems = [];
const foreign = [];
const pages = [];

// A page of the dashboard, with the helpers that read it.
function watch(page, name) {
  pages.push(page);
  page.on("pageerror", (e) => problems.push(`${name}: page error: ${e.message}`));
  page.on("console", (m) => {
    if (m.type() === "error") problems.push(`${name}: console error: ${m.text()}`);
  });
  page.on("request", (r) => {
    const url = r.url();
    if (!url.startsWith(base + "/") && !url.startsWith("data:")) foreign.push(url);
  });
  const locate = (id) => page.locator(`[data-testid="${id}"]`).first();
  const d = {
    page,
    name,
    text: (id) => locate(id).innerText(),
    number: async (id) => {
      const t = (await locate(id).innerText()).replace(/,/g, "").trim();
      return t === "–" || t === "" ? null : Number.parseFloat(t);
    },
    dataset: (id, key) => locate(id).getAttribute(`data-${key}`),
    polls: async () => Number(await locate("dashboard").getAttribute("data-polls")),
    async until(what, check, timeout = STEP_TIMEOUT) {
      const deadline = Date.now() + timeout;
      let last;
      for (;;) {
        try {
          last = await check();
          if (last === true) return;
        } catch (e) {
          last = e.message;
        }
        if (Date.now() > deadline) fail(`${name}: timed out after ${timeout} ms waiting for ${what} (last: ${JSON.stringify(last)})`);
        await page.waitForTimeout(200);
      }
    },
    // Coloured pixels in a canvas: proof that something was drawn.
    inked: (id) =>
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
      }, id),
    // The health card: its state, and whether anything in it is green.
    card: () =>
      page.evaluate(() => {
        const card = document.querySelector('[data-testid="health-card"]');
        const pill = document.querySelector('[data-testid="last-check-result"]');
        const rgb = (el) => (getComputedStyle(el).backgroundColor.match(/\d+/g) || []).map(Number);
        const greenish = ([r, g, b]) => g > 100 && g > r * 1.4 && g > b * 1.4;
        return {
          state: card.dataset.state,
          value: card.querySelector('[data-testid="last-check"]').innerText,
          pill: pill.innerText,
          detail: card.querySelector('[data-testid="last-check-detail"]').innerText,
          green: greenish(rgb(pill)) || greenish(rgb(card)) || greenish(getComputedStyle(card).borderLeftColor.match(/\d+/g).map(Number)),
        };
      }),
    // The timeline's entries, newest first.
    timeline: () =>
      page.evaluate(() =>
        [...document.querySelectorAll('[data-testid="timeline"] li[data-kind]')].map((li) => ({
          kind: li.dataset.kind,
          count: Number(li.dataset.count),
          ongoing: li.dataset.ongoing === "true",
          times: [...li.querySelectorAll("time")].map((t) => t.dateTime),
          text: li.innerText.replace(/\s+/g, " ").trim(),
          hint: li.querySelector('[data-testid="hint"]')?.innerText ?? null,
        })),
      ),
  };
  return d;
}
const CHARTS = ["chart-rps", "chart-acquire", "chart-query", "chart-pool", "chart-errors", "chart-journal", "breaker-timeline"];
async function open(d) {
  const response = await d.page.goto(`${base}/dashboard?interval=1`, { waitUntil: "load" });
  if (!response || response.status() !== 200) fail(`GET /dashboard answered ${response && response.status()}`);
}
async function shot(page, file, fullPage = true) {
  mkdirSync(shotDir, { recursive: true });
  const path = join(shotDir, file);
  await page.screenshot({ path, fullPage });
  summary.screenshots.push({ path, bytes: statSync(path).size });
}

try {
  // ---- a page open from the start -------------------------------------------
  const a = watch(context.pages()[0] ?? (await context.newPage()), "page A");
  await open(a);
  await a.until("three polls of /health and /history", async () => (await a.polls()) >= 3 || `polls=${await a.polls()}`);
  await a.until("the breaker shown closed", async () => (await a.text("breaker-state")) === "closed" || (await a.text("breaker-state")));
  await a.until("a healthy card", async () => {
    const card = await a.card();
    return (card.state === "ok" && card.green) || JSON.stringify(card);
  });
  const before = { requests: await a.number("requests-total"), operations: await a.number("operations-total") };
  log("before load:", JSON.stringify(before));
  summary.before = before;

  // ---- under load: the figures move ----------------------------------------
  await want("load");
  const loadAt = Date.now();
  await a.until("requests counted under load", async () => {
    const now = await a.number("requests-total");
    return now >= before.requests + 30 || `requests-total=${now}`;
  });
  await a.until("a request rate, an acquire time and query times per operation", async () => {
    const rate = await a.number("requests-rate");
    const p99 = await a.text("acquire-p99");
    const legend = await a.text("query-legend");
    const ok = rate > 0 && /\d/.test(p99) && /load\s+[\d.]+\s*(µs|ms|s)/.test(legend) && /save\s+[\d.]+\s*(µs|ms|s)/.test(legend);
    return ok || `rate=${rate} p99=${p99} legend=${legend}`;
  });
  const loaded = {
    requests: await a.number("requests-total"),
    operations: await a.number("operations-total"),
    rate: await a.number("requests-rate"),
    acquireP99: await a.text("acquire-p99"),
    queryLegend: await a.text("query-legend"),
    poolMax: await a.number("pool-max"),
  };
  log("under load:", JSON.stringify(loaded));
  if (!(loaded.operations > before.operations)) fail(`operations-total did not move: ${before.operations} -> ${loaded.operations}`);
  if (!(loaded.poolMax >= 1)) fail(`pool max shown is ${loaded.poolMax}`);
  summary.underLoad = loaded;
  // A few more seconds of load, so that the history shows it.
  await a.page.waitForTimeout(Math.max(0, LOAD_MS - (Date.now() - loadAt)));
  summary.inked = {};
  for (const chart of CHARTS) {
    const n = await a.inked(chart);
    summary.inked[chart] = n;
    if (n < 30) fail(`the ${chart} canvas looks empty (${n} coloured pixels)`);
  }

  // ---- the database goes away ------------------------------------------------
  await want("fault");
  const faultAt = Date.now();
  await a.until("the breaker shown open", async () => (await a.text("breaker-state")) === "open" || (await a.text("breaker-state")));
  summary.openAfterMs = Date.now() - faultAt;
  log(`breaker open on page A after ${summary.openAfterMs} ms`);
  await a.until("the health card failing, not green", async () => {
    const card = await a.card();
    return (card.state === "failing" && !card.green) || JSON.stringify(card);
  });
  summary.cardDuringFault = await a.card();
  log("card during the fault:", JSON.stringify(summary.cardDuringFault));
  const status = await a.text("status");
  if (status !== "degraded") fail(`status shown during the fault is ${JSON.stringify(status)}, expected degraded`);

  // A session written during the outage, then changed in the database
  // behind this instance's back: a write-back conflict waits.
  await want("conflict");

  // The breaker probes: one folded entry whose count grows.
  await a.until(`${PROBES} failed probes folded into one timeline entry`, async () => {
    const probing = (await a.timeline()).filter((e) => e.kind === "probing");
    return (probing.length === 1 && probing[0].count >= PROBES && probing[0].ongoing) || JSON.stringify(probing);
  });
  const outageA = (await a.timeline()).filter((e) => e.kind === "outage");
  if (outageA.length !== 1 || !outageA[0].ongoing) fail(`outage entries during the fault: ${JSON.stringify(outageA)}`);

  // ---- a page opened in the middle of the incident -------------------------------
  const b = watch(await context.newPage(), "page B");
  await open(b);
  await b.until("the first poll of page B", async () => (await b.polls()) >= 1 || `polls=${await b.polls()}`);
  const fromHistory = {
    samples: Number(await b.dataset("dashboard", "history")),
    spanS: Number(await b.dataset("dashboard", "history-span-s")),
    from: await b.dataset("dashboard", "history-from"),
    seen: await b.dataset("breaker-timeline", "seen"),
    card: await b.card(),
    timeline: await b.timeline(),
  };
  summary.midIncident = { ...fromHistory, timeline: fromHistory.timeline.map((e) => e.text) };
  log("page B at its first poll:", JSON.stringify(summary.midIncident));
  const seen = (fromHistory.seen || "").split(" ");
  if (!seen.includes("closed") || !seen.includes("open")) fail(`page B's breaker band at its first poll saw ${JSON.stringify(fromHistory.seen)}`);
  if (fromHistory.card.state !== "failing" || fromHistory.card.green) fail(`page B's health card: ${JSON.stringify(fromHistory.card)}`);
  const ongoing = fromHistory.timeline.filter((e) => e.kind === "outage" && e.ongoing);
  if (ongoing.length !== 1) fail(`page B's timeline: ${JSON.stringify(fromHistory.timeline)}`);
  // Its history reaches back before the outage began (both by the server's clock).
  if (!(fromHistory.samples > 1 && Date.parse(fromHistory.from) < Date.parse(ongoing[0].times[0]))) {
    fail(`page B's history (${fromHistory.samples} samples from ${fromHistory.from}) does not reach back before the outage (${ongoing[0].times[0]})`);
  }
  for (const chart of ["chart-rps", "chart-acquire", "chart-query", "breaker-timeline"]) {
    const n = await b.inked(chart);
    if (n < 30) fail(`page B's ${chart} is empty at its first poll (${n} coloured pixels): no history drawn`);
  }
  await shot(b.page, "dashboard-fault.png");
  await b.page.setViewportSize({ width: 390, height: 844 });
  const polled = await b.polls();
  await b.until("a poll drawn in the phone layout", async () => (await b.polls()) > polled || `polls=${await b.polls()}`);
  const overflow = await b.page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  if (overflow > 1) fail(`the page is ${overflow}px wider than a 390px phone screen`);
  await shot(b.page, "dashboard-phone.png", false);
  await b.page.setViewportSize({ width: 1280, height: 900 });

  // ---- the database returns --------------------------------------------------
  await want("heal");
  const healAt = Date.now();
  for (const d of [a, b]) {
    await d.until("the breaker shown closed again", async () => (await d.text("breaker-state")) === "closed" || (await d.text("breaker-state")));
  }
  summary.closedAfterMs = Date.now() - healAt;
  log(`breaker closed on the pages after ${summary.closedAfterMs} ms`);
  await b.until("the story told: one outage, folded probes, the write-back, the conflict and its dead letter", async () => {
    const t = await b.timeline();
    const of = (kind) => t.filter((e) => e.kind === kind);
    const outage = of("outage"), probing = of("probing"), wb = of("write_back");
    const done =
      outage.length === 1 && !outage[0].ongoing && outage[0].times.length === 2 &&
      probing.length === 1 && !probing[0].ongoing && probing[0].count >= PROBES &&
      wb.length >= 1 && wb.some((e) => !e.ongoing && /written back/.test(e.text)) &&
      of("conflict").length >= 1 && of("dead_letter").length >= 1 &&
      [...of("conflict"), ...of("dead_letter")].every((e) => /pgsession journal list/.test(e.hint || ""));
    return done || JSON.stringify(t.map((e) => [e.kind, e.count, e.ongoing, e.text, e.hint]));
  });
  await b.until("the health card green again", async () => {
    const card = await b.card();
    return (card.state === "ok" && card.green) || JSON.stringify(card);
  });
  await b.until("the journal drawn empty", async () => /entries\s+0\b/.test(await b.page.locator("#l-journal").innerText()) || (await b.page.locator("#l-journal").innerText()));
  const story = await b.timeline();
  summary.timeline = story.map((e) => ({ kind: e.kind, count: e.count, text: e.text, hint: e.hint }));
  const outage = story.find((e) => e.kind === "outage");
  log("the outage:", outage.text);
  if (!/away for \d/.test(outage.text)) fail(`the outage entry gives no duration: ${outage.text}`);
  const breakerEvents = await b.page.locator('[data-testid="events"] li[data-kind="breaker"]').count();
  summary.rawBreakerEvents = breakerEvents;
  summary.after = { requests: await b.number("requests-total"), journal: await b.number("journal-entries") };
  await b.page.evaluate(() => window.scrollTo(0, 0));
  await shot(b.page, "dashboard-recovered.png");

  if (foreign.length) fail(`the page fetched from elsewhere than ${base}: ${foreign.join(", ")}`);
  if (problems.length) fail(`the page reported errors:\n  ${problems.join("\n  ")}`);
  console.log(`@@ done ${JSON.stringify(summary)}`);
} catch (e) {
  console.error(`FAIL: ${e.message}`);
  for (const [i, page] of pages.entries()) {
    const debug = join(tmpdir(), `pgsession-dashboard-failure-${process.pid}-${i}.png`);
    await page.screenshot({ path: debug, fullPage: true }).catch(() => {});
    console.error(`(a screenshot of page ${i} as it was: ${debug})`);
    const body = await page.locator("body").innerText().catch(() => "");
    console.error(`--- page ${i} text ---\n${body}`);
  }
  process.exitCode = 1;
} finally {
  await context.close().catch(() => {});
  rmSync(profile, { recursive: true, force: true });
  process.stdin.destroy();
}
