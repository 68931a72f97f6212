// The support console (contract §17) in headless Chromium: Debian's
// `chromium`, driven by puppeteer-core (no browser is downloaded), against
// the real penora-api and penora-worker that scripts/console.sh starts on a
// database and queue prefix of their own.
//
// What a person does, in order: sign in; find a user seeded with lots,
// deductions, a partial refund and a saved 1024² artwork; check every
// section against the API; grant 5, void a lot, refund half a reservation
// (each confirmed; a resent form moves credits once); a read key sees no
// action and is refused when it posts one anyway; a form from another origin
// is refused; a dead letter is replayed from the operations page and its
// refund lands. Throughout: no Content-Security-Policy violation, the key in
// no URL and no cookie. Screenshots of the user and operations pages at 1280
// and 390 px are written to $SCREENSHOTS.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { createServer } from "node:http";
import { deflateSync } from "node:zlib";
import { mkdirSync } from "node:fs";
import puppeteer from "puppeteer-core";
import amqp from "amqplib";

const base = need("PENORA_BASE_URL");
const adminKey = need("PENORA_API_KEY");
const chromium = need("CHROMIUM");
const worker = need("PENORA_WORKER");
const shots = need("SCREENSHOTS");
const amqpUrl = need("AMQP_URL");
const prefix = need("AMQP_PREFIX");
const user = "ada-lovelace";

function need(name) {
  const v = process.env[name];
  if (!v) throw new Error(`${name} is not set: run the browser tests with scripts/console.sh`);
  return v;
}

// ---- the API, as ImageGene calls it -------------------------------------

async function api(method, path, body, key = adminKey) {
  const r = await fetch(`${base}${path}`, {
    method,
    headers: { "X-API-Key": key, ...(body ? { "Content-Type": "application/json" } : {}) },
    body: body ? JSON.stringify(body) : undefined,
  });
  const json = await r.json();
  if (!r.ok) throw new Error(`${method} ${path}: ${r.status} ${JSON.stringify(json)}`);
  return json;
}

const info = () => api("GET", `/api/unified/user-info?user_id=${user}`);
const ledger = async () => (await api("GET", `/api/unified/transactions?user_id=${user}&limit=200`)).transactions;
const lots = async () => (await api("GET", `/api/unified/credit-lots?user_id=${user}&limit=200`)).lots;

async function until(what, ms, check) {
  const end = Date.now() + ms;
  for (;;) {
    const got = await check();
    if (got) return got;
    if (Date.now() > end) throw new Error(`${what}: not within ${ms} ms`);
    await new Promise((r) => setTimeout(r, 200));
  }
}

// A photo-like 1024² PNG: smooth gradients, waves and grain, as a generator's
// output (a flat image would compress to nothing).
function photoLikePng(size) {
  const raw = Buffer.alloc((size * 3 + 1) * size);
  let seed = 12345;
  const noise = () => ((seed = (seed * 1103515245 + 12345) & 0x7fffffff) % 17) - 8;
  for (let y = 0; y < size; y++) {
    const row = y * (size * 3 + 1);
    raw[row] = 0;
    for (let x = 0; x < size; x++) {
      const i = row + 1 + x * 3;
      const wave = Math.sin(x / 37) * Math.cos(y / 53) * 40;
      raw[i] = clamp((x / size) * 200 + wave + noise());
      raw[i + 1] = clamp((y / size) * 180 + 30 - wave + noise());
      raw[i + 2] = clamp(120 + Math.sin((x + y) / 91) * 90 + noise());
    }
  }
  const chunk = (type, data) => {
    const len = Buffer.alloc(4);
    len.writeUInt32BE(data.length);
    const td = Buffer.concat([Buffer.from(type), data]);
    const crc = Buffer.alloc(4);
    crc.writeUInt32BE(crc32(td));
    return Buffer.concat([len, td, crc]);
  };
  const ihdr = Buffer.alloc(13);
  ihdr.writeUInt32BE(size, 0);
  ihdr.writeUInt32BE(size, 4);
  ihdr[8] = 8;
  ihdr[9] = 2;
  return Buffer.concat([
    Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]),
    chunk("IHDR", ihdr),
    chunk("IDAT", deflateSync(raw)),
    chunk("IEND", Buffer.alloc(0)),
  ]);
}
const clamp = (v) => Math.max(0, Math.min(255, Math.round(v)));
const CRC = Array.from({ length: 256 }, (_, n) => {
  let c = n;
  for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
  return c >>> 0;
});
function crc32(buf) {
  let c = 0xffffffff;
  for (const b of buf) c = CRC[(c ^ b) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

// ---- the worker, which this file stops and starts -----------------------

let workerProcess;
function startWorker() {
  workerProcess = spawn(worker, [], { stdio: ["ignore", "ignore", "inherit"], env: process.env });
}
async function stopWorker() {
  if (!workerProcess) return;
  const done = new Promise((r) => workerProcess.once("exit", r));
  workerProcess.kill("SIGTERM");
  await done;
  workerProcess = undefined;
}

// ---- the browser ---------------------------------------------------------

let browser;
const violations = [];
const urls = [];

async function newPage(context = browser) {
  const page = await context.newPage();
  // Runs before the page's own (the DevTools protocol's script is not the
  // page's, so the policy does not stop it): every violation is recorded.
  await page.evaluateOnNewDocument(() => {
    document.addEventListener("securitypolicyviolation", (e) => {
      console.error(`CSP-VIOLATION ${e.violatedDirective} ${e.blockedURI}`);
    });
  });
  page.on("console", (m) => {
    const text = m.text();
    // (Chrome also logs each as "Refused to … Content Security Policy": the
    // event is counted once, by the listener above.)
    if (text.startsWith("CSP-VIOLATION")) {
      violations.push(`${page.url()}: ${text}`);
    }
  });
  page.on("request", (r) => urls.push(r.url()));
  await page.setViewport({ width: 1280, height: 900 });
  return page;
}

async function signIn(page, key) {
  await page.bringToFront();
  await page.goto(`${base}/console`);
  assert.match(page.url(), /\/console\/sign-in$/);
  // With the keyboard: the key field has the focus (autofocus; in a tab
  // that never had the focus, Tab reaches it), Enter sends it.
  const focused = () => page.evaluate(() => document.activeElement?.id);
  for (let tab = 0; tab < 5 && (await focused()) !== "api_key"; tab++) {
    await page.keyboard.press("Tab");
  }
  assert.equal(await focused(), "api_key", "the key field is reached with the keyboard");
  await page.keyboard.type(key);
  await Promise.all([page.waitForNavigation(), page.keyboard.press("Enter")]);
  if (!/\/console\/users$/.test(page.url())) {
    throw new Error(`not signed in: ${page.url()}: ${(await page.content()).slice(0, 2000)}`);
  }
}

async function submit(page, selector) {
  const [response] = await Promise.all([page.waitForNavigation(), page.click(selector)]);
  return response;
}

async function screenshot(page, name) {
  for (const width of [1280, 390]) {
    await page.setViewport({ width, height: 900 });
    // Nothing wider than the screen: tables scroll or stack, text wraps.
    const wide = await page.evaluate(() => document.documentElement.scrollWidth);
    assert.ok(wide <= width, `${name} is ${wide} px wide at ${width} px`);
    await page.screenshot({ path: `${shots}/${name}-${width}.png`, fullPage: true });
  }
  await page.setViewport({ width: 1280, height: 900 });
}

const text = (page, selector) => page.$eval(selector, (e) => e.textContent.trim());
const exact = (page, field) => page.$eval(`[data-field=${field}] [data-exact]`, (e) => Number(e.dataset.exact));

before(async () => {
  mkdirSync(shots, { recursive: true });
  startWorker();
  browser = await puppeteer.launch({
    executablePath: chromium,
    headless: true,
    args: ["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"],
  });
  // The user: a paid purchase, a promotional bonus that expires, thirty
  // deductions of 3, one of them half refunded, and a saved artwork.
  await api("POST", "/api/unified/add-credits", { user_id: user, amount: 100, reason: "purchase", reference: "pay-1" });
  await api("POST", "/api/unified/add-credits", {
    user_id: user, amount: 20, reason: "welcome bonus", reference: "bonus-1",
    category: "promotional", expires_at: "2099-01-01T00:00:00Z",
  });
  for (let i = 0; i < 30; i++) {
    await api("POST", "/api/unified/deduct-credits", { user_id: user, amount: 3, app_name: "imagegene", project_code: `img-${i}` });
  }
  await api("POST", "/api/unified/deduct-credits", { user_id: user, amount: 4, app_name: "imagegene", project_code: "art-1" });
  await api("POST", "/api/unified/refund-credits", { user_id: user, project_code: "img-27", amount: 1, reference: "blurry-27", reason: "blurry" });
  // A daily spend limit and a monthly allowance that starts later.
  await api("PUT", "/api/unified/limits", { user_id: user, period: "day", max_credits: 500 });
  await api("PUT", "/api/unified/allowances", {
    user_id: user, allowance_id: "monthly-plan", amount: 50, period: "month", starts_at: "2099-01-01T00:00:00Z",
  });
  const png = photoLikePng(1024);
  const saved = await api("POST", "/api/unified/save-project", {
    user_id: user, app_source: "imagegene", project_type: "ai_artwork", title: "Analytical engine at dusk",
    content: png.toString("base64"), project_code: "art-1",
  });
  await until("the artwork's thumbnail", 30_000, async () => {
    const r = await fetch(`${base}/api/unified/projects/${saved.project_id}/thumbnail?user_id=${user}`, {
      headers: { "X-API-Key": adminKey },
    });
    return r.status === 200;
  });
});

after(async () => {
  await browser?.close();
  await stopWorker();
  assert.deepEqual(violations, [], "no Content-Security-Policy violation on any page");
  const leaked = urls.filter((u) => u.includes(adminKey));
  assert.deepEqual(leaked, [], "the key is in no URL the browser asked for");
});

let admin;

test("sign in: the session cookie is HttpOnly and is not the key", async () => {
  admin = await newPage();
  await signIn(admin, adminKey);
  const cookies = await admin.cookies();
  assert.equal(cookies.length, 1, JSON.stringify(cookies.map((c) => c.name)));
  const [cookie] = cookies;
  assert.equal(cookie.name, "penora_console");
  assert.equal(cookie.httpOnly, true);
  assert.equal(cookie.sameSite, "Strict");
  assert.notEqual(cookie.value, adminKey);
  assert.ok(!cookie.value.includes(adminKey));
  const readable = await admin.evaluate(() => document.cookie);
  assert.equal(readable, "", "scripts see no cookie");
  // The violations recorder works: an image from elsewhere, added by hand,
  // is refused by the policy and recorded.
  await admin.evaluate(() => {
    const img = document.createElement("img");
    img.src = "http://127.0.0.2:9/tracker.png";
    document.body.append(img);
  });
  await until("the planted violation recorded", 5_000, async () => violations.length > 0);
  assert.match(violations.join("\n"), /img-src/);
  violations.length = 0;
});

test("the user's page shows what the API holds", async () => {
  await admin.goto(`${base}/console/users`);
  await admin.type("#q", "ada");
  await submit(admin, "form[role=search] button");
  await submit(admin, `a[href="/console/users/${user}"]`);
  const { credits } = await info();
  assert.equal(credits, 120 - 94 + 1);
  assert.equal(await exact(admin, "spendable"), credits);
  // 30 × 3 reserved, 1 of them refunded; art-1's 4 were settled by its save.
  assert.equal(await exact(admin, "reserved"), 89);
  const apiLots = await lots();
  const paid = apiLots.filter((l) => l.category === "paid" && l.status === "active").reduce((s, l) => s + l.remaining, 0);
  assert.equal(await exact(admin, "category-paid"), paid);
  const lotIds = await admin.$$eval("#lots ~ .scroll td[data-label=Lot], section[aria-labelledby=lots] td[data-label=Lot]", (tds) => tds.map((t) => Number(t.textContent)));
  assert.deepEqual([...new Set(lotIds)].sort(), apiLots.map((l) => l.lot_id).sort());
  // Amounts for people, the exact value on hover.
  const hover = await admin.$eval("section[aria-labelledby=lots] td[data-label=Granted] span", (s) => s.title);
  assert.match(hover, /^\d+ Ku$/);
  const expiry = await admin.$eval("section[aria-labelledby=lots] time[datetime='2099-01-01T00:00:00.000Z']", (t) => t.title);
  assert.equal(expiry, "2099-01-01T00:00:00.000Z");
  // Reservations with their state and refund deadline.
  const states = await admin.$$eval("section[aria-labelledby=reservations] td[data-label=State]", (t) => t.map((e) => e.textContent));
  assert.ok(states.includes("partially_refunded"));
  assert.equal(await admin.$$eval("section[aria-labelledby=reservations] td[data-label='Refund deadline'] time", (t) => t.length), states.length);
  // Limits and allowances, as the API lists them.
  const limits = (await api("GET", `/api/unified/limits?user_id=${user}`)).limits;
  const shownLimits = await admin.$$eval("section[aria-labelledby=limits] td[data-label='At most'] [data-exact]", (s) => s.map((e) => Number(e.dataset.exact)));
  assert.deepEqual(shownLimits, limits.map((l) => l.max_credits));
  const allowances = (await api("GET", `/api/unified/allowances?user_id=${user}`)).allowances;
  const shownAllowances = await admin.$$eval("section[aria-labelledby=limits] td[data-label=Allowance] code", (c) => c.map((e) => e.textContent));
  assert.deepEqual(shownAllowances, allowances.map((a) => a.allowance_id));
  // The ledger: the newest 25 with their running balance, then the rest.
  const entries = await ledger();
  const shown = await admin.$$eval("section[aria-labelledby=ledger] tbody tr", (rows) =>
    rows.map((r) => ({
      id: Number(r.querySelector("td[data-label=Entry]").textContent),
      after: Number(r.querySelector("td[data-label='Balance after'] [data-exact]").dataset.exact),
    })),
  );
  assert.deepEqual(shown, entries.slice(0, 25).map((e) => ({ id: e.id, after: e.balance_after })));
  await submit(admin, "a[rel=next]");
  const rest = await admin.$$eval("section[aria-labelledby=ledger] td[data-label=Entry]", (t) => t.map((e) => Number(e.textContent)));
  assert.deepEqual(rest, entries.slice(25).map((e) => e.id));
  await admin.goto(`${base}/console/users/${user}`);
  // The artwork with its thumbnail, loaded.
  const thumb = await admin.$eval("section[aria-labelledby=projects] img.thumb", (i) => ({ w: i.naturalWidth, h: i.naturalHeight, done: i.complete }));
  assert.ok(thumb.done && thumb.w > 0 && thumb.w <= 256, JSON.stringify(thumb));
  assert.match(await text(admin, "section[aria-labelledby=audit] [data-field=audit]"), /links? checked|waiting/);
  await screenshot(admin, "console-user");
});

test("grant 5 with a reason: confirmed, once, the acting key on the entry", async () => {
  const { credits } = await info();
  await admin.goto(`${base}/console/users/${user}`);
  await admin.type("#g-amount", "5");
  await admin.type("#g-reason", "goodwill: an image never came");
  await submit(admin, "form[action$='/grant'] button");
  assert.match(await admin.content(), /Confirm/);
  assert.equal((await info()).credits, credits, "asking moved nothing");
  const confirmation = await formFields(admin, "form[action$='/grant']");
  // A double click on Confirm.
  await Promise.all([admin.waitForNavigation(), admin.click("form[action$='/grant'] button", { count: 2 })]);
  assert.ok(await admin.$("[data-replayed]"), "the entry it made is shown");
  const actedBy = await text(admin, "td[data-label='Acted by']");
  assert.equal(actedBy, "bootstrap", "the bootstrap key's id is shown on the entry");
  // The confirmed form sent again: once, and the page says so.
  await postForm(admin, `${base}${confirmation.action}`, confirmation.fields);
  assert.equal(await admin.$eval("[data-replayed]", (e) => e.dataset.replayed), "true");
  assert.equal((await info()).credits, credits + 5);
  const grants = (await ledger()).filter((e) => e.kind === "grant" && e.amount === 5);
  assert.equal(grants.length, 1);
  // The page shows it too.
  await admin.goto(`${base}/console/users/${user}`);
  assert.equal(await exact(admin, "spendable"), credits + 5);
});

test("void the promotional lot and refund half a reservation", async () => {
  // A bonus granted twice by mistake: the second one is voided.
  const second = await api("POST", "/api/unified/add-credits", {
    user_id: user, amount: 7, reason: "welcome bonus", reference: "bonus-1-again", category: "promotional",
  });
  const before = (await info()).credits;
  const promo = (await lots()).find((l) => l.lot_id === second.lot_id);
  assert.equal(promo.remaining, 7);
  await admin.goto(`${base}/console/users/${user}`);
  await admin.click(`details:has(input[value='${promo.lot_id}']) > summary`);
  await admin.type(`#v-reason-${promo.lot_id}`, "bonus granted twice");
  await submit(admin, `form[action$='/void'] input[value='${promo.lot_id}'] ~ button`);
  await submit(admin, "form[action$='/void'] button");
  assert.equal(await text(admin, "td[data-label=Kind]"), "void");
  const voided = (await lots()).find((l) => l.lot_id === promo.lot_id);
  assert.equal(voided.status, "voided");
  assert.equal((await info()).credits, before - promo.remaining);

  // Half of a reservation of 4 (an artwork still generating).
  await api("POST", "/api/unified/deduct-credits", { user_id: user, amount: 4, app_name: "imagegene", project_code: "art-2" });
  const mid = (await info()).credits;
  await admin.goto(`${base}/console/users/${user}`);
  const form = "form[action$='/refund']:has(input[value='art-2'])";
  await admin.click("details:has(input[value='art-2']) > summary");
  await admin.type(`${form} input[name=amount]`, "2");
  await admin.type(`${form} input[name=reason]`, "half the batch failed");
  await submit(admin, `${form} button`);
  const confirmation = await formFields(admin, "form[action$='/refund']");
  await submit(admin, "form[action$='/refund'] button");
  assert.equal(await text(admin, "td[data-label=Kind]"), "refund");
  assert.equal(await admin.$eval("[data-replayed]", (e) => e.dataset.replayed), "false");
  await postForm(admin, `${base}${confirmation.action}`, confirmation.fields);
  assert.equal(await admin.$eval("[data-replayed]", (e) => e.dataset.replayed), "true");
  assert.equal((await info()).credits, mid + 2, "refunded once");
  const refunds = (await ledger()).filter((e) => e.kind === "refund" && e.project_code === "art-2");
  assert.equal(refunds.length, 1);
  assert.equal(refunds[0].amount, 2);
  await admin.goto(`${base}/console/users/${user}`);
  const row = await admin.$eval("section[aria-labelledby=reservations] tr:has(input[value='art-2'])", (r) => ({
    refunded: Number(r.querySelector("td[data-label=Refunded] [data-exact]").dataset.exact),
    state: r.querySelector("td[data-label=State]").textContent,
  }));
  assert.deepEqual(row, { refunded: 2, state: "partially_refunded" });
});

test("a read key sees no action, and is refused when it posts one anyway", async () => {
  const { key } = await makeKey(["read"]);
  const context = await browser.createBrowserContext();
  const reader = await newPage(context);
  await signIn(reader, key);
  await reader.goto(`${base}/console/users/${user}`);
  assert.equal(await reader.$$eval("main form", (f) => f.length), 0, "no action form");
  const credits = (await info()).credits;
  // Post the admin's form anyway, with the reader's own session and token.
  const csrf = await reader.$eval("header form input[name=csrf]", (i) => i.value);
  const response = await postForm(reader, `${base}/console/users/${user}/grant`, {
    csrf, nonce: crypto.randomUUID(), amount: "5", category: "paid", reason: "x", confirm: "yes",
  });
  assert.equal(response.status(), 403);
  assert.match(await reader.content(), /forbidden/);
  assert.equal((await info()).credits, credits);
  await context.close();
});

test("a form posted from another origin is refused", async () => {
  const credits = (await info()).credits;
  const csrf = await (async () => {
    await admin.goto(`${base}/console/users/${user}`);
    return admin.$eval("header form input[name=csrf]", (i) => i.value);
  })();
  // Another origin on this machine: another port (the same site, so the
  // SameSite cookie goes along; the console must refuse it itself).
  const evil = createServer((req, res) => {
    res.setHeader("Content-Type", "text/html");
    res.end(`<form id=f method=post action="${base}/console/users/${user}/grant">
      <input name=csrf value="${csrf}"><input name=nonce value="${crypto.randomUUID()}">
      <input name=amount value=500><input name=reason value=stolen><input name=confirm value=yes></form>
      <script>document.getElementById("f").submit()</script>`);
  });
  await new Promise((r) => evil.listen(0, "127.0.0.1", r));
  const page = await newPage();
  const navigated = page.waitForNavigation({ waitUntil: "load" });
  // Its own page, not the console's: the violations recorder is for the console.
  await page.goto(`http://127.0.0.1:${evil.address().port}/`);
  const response = await navigated;
  assert.equal(response.status(), 403);
  assert.match(await page.content(), /another site/);
  assert.equal((await info()).credits, credits, "nothing moved");
  await page.close();
  evil.close();
});

test("a dead letter is replayed from the operations page and its refund lands", async () => {
  // Park a generation.failed event the way the broker parks a poison
  // message: a consumer that returns it unacknowledged past the delivery
  // limit, while the worker is away.
  await stopWorker();
  const code = "dl-art";
  await api("POST", "/api/unified/deduct-credits", { user_id: user, amount: 6, app_name: "imagegene", project_code: code });
  const creditsBefore = (await info()).credits;
  const connection = await amqp.connect(amqpUrl);
  const ch = await connection.createConfirmChannel();
  const eventId = `evt_${crypto.randomUUID().replaceAll("-", "")}`;
  await new Promise((resolve, reject) =>
    ch.publish(`${prefix}imagegene.events`, "generation.failed",
      Buffer.from(JSON.stringify({ event_id: eventId, user_id: user, project_code: code, occurred_at: new Date().toISOString(), reason: "GPU fell over" })),
      { persistent: true, contentType: "application/json", messageId: eventId },
      (e) => (e ? reject(e) : resolve())),
  );
  const work = `${prefix}penora.generation-events`;
  for (let i = 0; i < 200; i++) {
    const m = await ch.get(work, { noAck: false });
    if (!m) break;
    ch.nack(m, false, true);
  }
  await until("the event parked by the broker", 15_000, async () => (await ch.checkQueue(`${work}.dead`)).messageCount === 1);
  await connection.close();
  startWorker();
  // The operator's checks, recorded for the page.
  const reconcile = await runOps(["reconcile"]);
  assert.equal(reconcile.code, 0, reconcile.stdout);
  const audit = await runOps(["audit", "verify"]);
  assert.equal(audit.code, 0, audit.stdout);

  await admin.goto(`${base}/console/ops`);
  // Showing the page looks at no message: the dead letters are listed on
  // an operator's request.
  assert.equal(await admin.$("section[aria-labelledby=dead]"), null);
  const checks = await admin.$$eval("section[aria-labelledby=checks] tbody tr", (rows) =>
    rows.map((r) => [...r.querySelectorAll("td")].slice(0, 3).map((td) => td.textContent.trim())),
  );
  assert.deepEqual(checks.map((c) => c.slice(0, 2)), [["penora-ops reconcile", "OK"], ["penora-ops audit verify", "OK"]]);
  assert.equal(checks[0][2], reconcile.stdout.trim().split("\n").at(-1), "the line the command printed");
  const depth = await admin.$$eval("section[aria-labelledby=queues] tbody tr", (rows) =>
    Object.fromEntries(rows.map((r) => [r.querySelector("code").textContent, r.querySelector("td[data-label=Parked]").textContent.trim()])),
  );
  assert.equal(depth["penora.generation-events"], "1");
  await submit(admin, "form[action='/console/ops/dead-letters']:has(input[value='penora.generation-events']) button");
  const ids = await admin.$$eval("section[aria-labelledby=dead] td[data-label='Message id'] code", (c) => c.map((e) => e.textContent));
  assert.deepEqual(ids, [eventId]);
  assert.match(await admin.content(), /penora-ops dlq replay/);
  await screenshot(admin, "console-ops");
  await submit(admin, `form[action='/console/ops/dead-letters/replay']:has(input[value='${eventId}']) button`);
  assert.equal(await admin.$eval("[data-replayed]", (e) => e.dataset.replayed), "1");
  await until("the replayed event's refund", 20_000, async () => (await info()).credits === creditsBefore + 6);
  const refunds = (await ledger()).filter((e) => e.kind === "refund" && e.project_code === code);
  assert.equal(refunds.length, 1);
  await admin.goto(`${base}/console/ops`);
  const after = await admin.$$eval("section[aria-labelledby=queues] tbody tr", (rows) =>
    Object.fromEntries(rows.map((r) => [r.querySelector("code").textContent, r.querySelector("td[data-label=Parked]").textContent.trim()])),
  );
  assert.equal(after["penora.generation-events"], "0", "nothing parked any more");
});

test("sign out ends the session", async () => {
  await admin.goto(`${base}/console/users`);
  await submit(admin, "header form button");
  assert.match(admin.url(), /\/console\/sign-in$/);
  await admin.goto(`${base}/console/users/${user}`);
  assert.match(admin.url(), /\/console\/sign-in$/, "back to sign in");
});

// Runs penora-ops with `args`: its exit code and output.
async function runOps(args) {
  return new Promise((resolve, reject) => {
    const p = spawn(need("PENORA_OPS"), args, { env: process.env });
    let stdout = "";
    p.stdout.on("data", (d) => (stdout += d));
    p.on("error", reject);
    p.on("exit", (code) => resolve({ code, stdout }));
  });
}

// An API key of `scopes`, made with penora-ops as an operator would.
async function makeKey(scopes) {
  const ops = need("PENORA_OPS");
  const out = await new Promise((resolve, reject) => {
    const p = spawn(ops, ["keys", "create", "--name", "support-reader", "--app", "*", "--scopes", scopes.join(",")], { env: process.env });
    let stdout = "";
    p.stdout.on("data", (d) => (stdout += d));
    p.on("exit", (c) => (c === 0 ? resolve(stdout) : reject(new Error(`penora-ops keys create: ${c}`))));
  });
  const key = /^key:\s+(\S+)$/m.exec(out)?.[1];
  if (!key) throw new Error("penora-ops keys create printed no key");
  return { key };
}

// The action and fields of the form at `selector`, to send them again.
async function formFields(page, selector) {
  return page.$eval(selector, (f) => ({
    action: f.getAttribute("action"),
    fields: Object.fromEntries(new FormData(f).entries()),
  }));
}

// Submits a form built in the page (as a hand-made request would be: the
// DevTools protocol's script, which the page's policy does not govern).
async function postForm(page, action, fields) {
  const navigated = page.waitForNavigation();
  await page.evaluate((action, fields) => {
    const f = document.createElement("form");
    f.method = "post";
    f.action = action;
    for (const [k, v] of Object.entries(fields)) {
      const i = document.createElement("input");
      i.name = k;
      i.value = v;
      f.appendChild(i);
    }
    document.body.appendChild(f);
    f.submit();
  }, action, fields);
  return navigated;
}
