// Retries against the real service: answers lost after the service
// committed (a TCP proxy that drops them), real `503 busy` and
// `429 rate_limited` answers with Retry-After, refused connections and
// timeouts. Whatever happens on the way, credits move once.
import assert from "node:assert/strict";
import net from "node:net";
import { test } from "node:test";

import { PenoraClient, PenoraError, verifyWebhook } from "../src/index.js";
import { client, createKey, env, eventually, newUser, photoLikePng, webhookReceiver } from "./support.js";

/** One request as the proxy saw it. */
interface Seen {
  connection: number;
  requestLine: string;
  idempotencyKey: string | null;
  cut: boolean;
}

/**
 * A TCP proxy in front of `target` that drops the answer of the requests
 * `cut` picks: it forwards the request, waits for the service's answer to
 * start (the service answers after its transaction committed), and then
 * resets the client's connection instead of passing the answer on.
 */
async function cuttingProxy(target: string, cut: (seen: Seen, index: number) => boolean) {
  const { hostname, port } = new URL(target);
  const seen: Seen[] = [];
  let connections = 0;
  const sockets = new Set<net.Socket>();
  const server = net.createServer((downstream) => {
    connections += 1;
    const connection = connections;
    const upstream = net.connect(Number(port), hostname);
    sockets.add(downstream).add(upstream);
    let pending: Seen | null = null;
    let head = "";
    downstream.on("data", (bytes) => {
      // The request's head: its line and the Idempotency-Key header.
      if (pending === null) {
        head += bytes.toString("latin1");
        const end = head.indexOf("\r\n\r\n");
        if (end >= 0) {
          const lines = head.slice(0, end).split("\r\n");
          const key = lines.find((l) => l.toLowerCase().startsWith("idempotency-key:"));
          const entry: Seen = {
            connection,
            requestLine: lines[0] ?? "",
            idempotencyKey: key ? key.slice(key.indexOf(":") + 1).trim() : null,
            cut: false,
          };
          entry.cut = cut(entry, seen.length);
          seen.push(entry);
          pending = entry;
          head = "";
        }
      }
      upstream.write(bytes);
    });
    upstream.on("data", (bytes) => {
      if (pending?.cut) {
        downstream.resetAndDestroy();
        upstream.destroy();
        return;
      }
      pending = null;
      downstream.write(bytes);
    });
    const close = () => {
      downstream.destroy();
      upstream.destroy();
      sockets.delete(downstream);
      sockets.delete(upstream);
    };
    downstream.on("error", close).on("close", close);
    upstream.on("error", close).on("close", close);
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const address = server.address() as net.AddressInfo;
  return {
    url: `http://127.0.0.1:${address.port}`,
    seen,
    close: () =>
      new Promise<void>((resolve) => {
        for (const s of sockets) s.destroy();
        server.close(() => resolve());
      }),
  };
}

/** A fetch that notes every attempt: when it started and what it answered. */
function recordingFetch() {
  const attempts: Array<{ at: number; status: number | null; code: string | null; retryAfter: string | null; key: string | null }> = [];
  const recording: typeof fetch = async (input, init) => {
    const entry = {
      at: Date.now(),
      status: null as number | null,
      code: null as string | null,
      retryAfter: null as string | null,
      key: new Headers(init?.headers).get("idempotency-key"),
    };
    attempts.push(entry);
    const response = await fetch(input, init);
    entry.status = response.status;
    entry.retryAfter = response.headers.get("retry-after");
    if (!response.ok) {
      const body = (await response.clone().json().catch(() => null)) as { code?: string } | null;
      entry.code = body?.code ?? null;
    }
    return response;
  };
  return { attempts, fetch: recording };
}

test("a deduction whose answer is lost after the commit is retried with the same key and charged once", async (t) => {
  const admin = client();
  const user = newUser("cut");
  await admin.addCredits({ user_id: user, amount: 1000, reason: "purchase", reference: `buy-${user}` });
  // Every other deduction's first answer is dropped after the service committed it.
  const keys = new Set<string | null>();
  const proxy = await cuttingProxy(env.baseUrl, (seen) => {
    if (keys.has(seen.idempotencyKey)) return false;
    keys.add(seen.idempotencyKey);
    return keys.size % 2 === 1;
  });
  t.after(() => proxy.close());
  const penora = new PenoraClient({ baseUrl: proxy.url, apiKey: env.apiKey, maxRetries: 3, retryBaseMs: 50 });

  const deductions = 40;
  const results = [];
  for (let i = 0; i < deductions; i++) {
    results.push(await penora.deductCredits({ user_id: user, amount: 5, app_name: "imagegene", description: `image ${i}` }));
  }
  const cut = proxy.seen.filter((s) => s.cut);
  const retried = results.filter((r) => r.lastResponse.attempts === 2);
  assert.equal(cut.length, deductions / 2, "half the deductions lost their first answer");
  assert.equal(retried.length, deductions / 2, "each of those was answered by its second attempt");
  for (const r of retried) {
    assert.equal(r.lastResponse.replayed, true, "the retry answers what the first attempt did");
    const sent = proxy.seen.filter((s) => s.idempotencyKey === r.lastResponse.idempotencyKey);
    assert.equal(sent.length, 2, "both attempts carried the same Idempotency-Key");
    assert.ok(sent[0]?.cut && !sent[1]?.cut);
    assert.notEqual(sent[0]?.connection, sent[1]?.connection, "the retry came on a new connection");
  }
  assert.equal(new Set(results.map((r) => r.project_code)).size, deductions, "one reservation per logical call");

  const ledger = await admin.transactions({ user_id: user, limit: 200 });
  const charged = ledger.transactions.filter((e) => e.kind === "deduct");
  assert.equal(charged.length, deductions, "one ledger entry per deduction");
  assert.equal((await admin.userInfo(user)).credits, 1000 - 5 * deductions, "charged once each");
  assert.deepEqual(results.map((r) => r.new_balance), results.map((_, i) => 1000 - 5 * (i + 1)));
  t.diagnostic(
    `${deductions} deductions of 5 through the proxy: ${proxy.seen.length} requests, ${cut.length} answers dropped after commit, ` +
      `${retried.length} replayed on the second attempt; ledger ${charged.length} deduct entries, balance 1000 -> ${(await admin.userInfo(user)).credits}`,
  );
});

test("a partial refund, a grant and a save whose answers are lost are each done once", async (t) => {
  const admin = client();
  const user = newUser("cut-others");
  const proxy = await cuttingProxy(env.baseUrl, (seen) => seen.requestLine.startsWith("POST") && !proxy.seen.some((s) => s.cut && s.requestLine === seen.requestLine));
  t.after(() => proxy.close());
  const penora = new PenoraClient({ baseUrl: proxy.url, apiKey: env.apiKey, maxRetries: 3, retryBaseMs: 50 });

  const grant = await penora.addCredits({ user_id: user, amount: 30, reason: "purchase", reference: `order-${user}` });
  assert.equal(grant.lastResponse.attempts, 2);
  assert.equal(grant.lastResponse.replayed, true);
  const deduction = await penora.deductCredits({ user_id: user, amount: 10, app_name: "imagegene" }, { idempotencyKey: `gen-${user}` });
  assert.equal(deduction.project_code, `gen-${user}`, "a key of the caller's own names the reservation");
  const refund = await penora.refundCredits({ user_id: user, project_code: deduction.project_code, amount: 4, reason: "one of two images failed" });
  assert.equal(refund.lastResponse.attempts, 2);
  assert.equal(refund.credits_refunded, 4);
  assert.equal(refund.remaining_reserved, 6);
  const png = photoLikePng(512, 512, 3);
  const saved = await penora.saveProject({
    user_id: user, app_source: "imagegene", project_type: "ai_artwork", title: "Harbour", content: png.toString("base64"),
  });
  assert.equal(saved.lastResponse.attempts, 2);

  const ledger = (await admin.transactions({ user_id: user, limit: 50 })).transactions;
  assert.deepEqual(ledger.map((e) => e.kind).sort(), ["deduct", "grant", "refund"]);
  assert.equal((await admin.userInfo(user)).credits, 24);
  const projects = await admin.projects({ user_id: user });
  assert.equal(projects.total_count, 1, "one project saved");
  assert.equal(projects.all_projects[0]?.id, saved.project_id);
});

test("a 503 busy is retried after its Retry-After, with the same key", async (t) => {
  // The constrained API has one save slot and waits 200 ms for it: a
  // stalled upload holds it, so a save meets a real 503 busy.
  const { hostname, port } = new URL(env.constrainedUrl);
  const stalled = net.connect(Number(port), hostname);
  t.after(() => stalled.destroy());
  await new Promise<void>((resolve) => stalled.once("connect", () => resolve()));
  const prefix = `{"user_id":"nobody","app_source":"penora","project_type":"story","title":"stalled","content":"${"A".repeat(16_000)}`;
  stalled.write(
    `POST /api/unified/save-project HTTP/1.1\r\nHost: ${hostname}\r\nX-API-Key: ${env.apiKey}\r\n` +
      `Content-Type: application/json\r\nContent-Length: ${prefix.length + 1_000_000}\r\n\r\n${prefix}`,
  );
  await new Promise((r) => setTimeout(r, 300));

  const recorder = recordingFetch();
  const penora = new PenoraClient({ baseUrl: env.constrainedUrl, apiKey: env.apiKey, maxRetries: 3, fetch: recorder.fetch });
  const user = newUser("busy");
  await client().addCredits({ user_id: user, amount: 5, reason: "bonus", reference: `bonus-${user}` });
  const saving = penora.saveProject({
    user_id: user, app_source: "penora", project_type: "story", title: "Chapter two",
    content: Buffer.from("The storm had passed.").toString("base64"),
  });
  // Once the first attempt was refused, the slot is given back.
  while (recorder.attempts[0]?.status == null) await new Promise((r) => setTimeout(r, 20));
  stalled.destroy();
  const saved = await saving;

  assert.equal(saved.lastResponse.status, 202);
  assert.equal(saved.lastResponse.attempts, 2);
  const [first, second] = recorder.attempts;
  assert.ok(first && second);
  assert.deepEqual([first.status, first.code, first.retryAfter], [503, "busy", "1"]);
  const waited = second.at - first.at;
  assert.ok(waited >= 1000, `the retry waited Retry-After (1 s): ${waited} ms after the first attempt began`);
  assert.equal(first.key, second.key);
  assert.equal((await client().projects({ user_id: user })).total_count, 1);
  t.diagnostic(`503 busy with Retry-After: 1; second attempt ${waited} ms after the first began, answered 202`);
});

test("a 429 is retried after its Retry-After; without retries it is thrown, marked retryable", async (t) => {
  // A key of its own on the constrained API (2 requests a second, bursts of 3).
  const key = await createKey("*", "read");
  const strict = new PenoraClient({ baseUrl: env.constrainedUrl, apiKey: key, maxRetries: 0 });
  let refused: unknown;
  for (let i = 0; i < 10 && refused === undefined; i++) {
    await strict.quote({ width: 512, height: 512 }).catch((e: unknown) => {
      refused = e;
    });
  }
  assert.ok(refused instanceof PenoraError, "the bucket ran out within 10 quick requests");
  assert.equal(refused.status, 429);
  assert.equal(refused.code, "rate_limited");
  assert.equal(refused.retryable, true);

  const recorder = recordingFetch();
  const patient = new PenoraClient({ baseUrl: env.constrainedUrl, apiKey: key, maxRetries: 5, fetch: recorder.fetch });
  // Empty the bucket again, then ask.
  await Promise.all([1, 2, 3, 4].map(() => strict.quote({ width: 512, height: 512 }).catch(() => undefined)));
  const quote = await patient.quote({ width: 512, height: 512 });
  assert.equal(quote.credits, 2);
  const limited = recorder.attempts.filter((a) => a.status === 429);
  assert.ok(limited.length >= 1, "the first attempt met the limit");
  for (let i = 1; i < recorder.attempts.length; i++) {
    const before = recorder.attempts[i - 1];
    const after = recorder.attempts[i];
    assert.ok(before && after);
    const asked = Number(before.retryAfter) * 1000;
    assert.ok(after.at - before.at >= asked, `waited ${after.at - before.at} ms of the ${asked} asked`);
  }
  t.diagnostic(`429 rate_limited: ${limited.length} refused attempt(s), answered on attempt ${quote.lastResponse.attempts}`);
});

test("a refused connection is retried a bounded number of times, then thrown with the key to retry with", async () => {
  const closed = net.createServer();
  await new Promise<void>((resolve) => closed.listen(0, "127.0.0.1", resolve));
  const { port } = closed.address() as net.AddressInfo;
  await new Promise<void>((resolve) => closed.close(() => resolve()));
  const penora = new PenoraClient({ baseUrl: `http://127.0.0.1:${port}`, apiKey: env.apiKey, maxRetries: 2, retryBaseMs: 20 });
  const error = await penora
    .deductCredits({ user_id: newUser(), amount: 1, app_name: "imagegene" }, { idempotencyKey: "order-7781" })
    .catch((e: unknown) => e);
  assert.ok(error instanceof PenoraError);
  assert.deepEqual([error.status, error.code, error.attempts, error.retryable], [0, "network_error", 3, true]);
  assert.equal(error.idempotencyKey, "order-7781");
});

test("an attempt with no answer within timeoutMs is retried, and the call fails after its attempts", async (t) => {
  // A server that accepts and never answers.
  const held = new Set<net.Socket>();
  const silent = net.createServer((socket) => {
    held.add(socket);
    socket.on("error", () => {});
  });
  await new Promise<void>((resolve) => silent.listen(0, "127.0.0.1", resolve));
  t.after(() => {
    for (const s of held) s.destroy();
    return new Promise<void>((resolve) => silent.close(() => resolve()));
  });
  const { port } = silent.address() as net.AddressInfo;
  const recorder = recordingFetch();
  const penora = new PenoraClient({
    baseUrl: `http://127.0.0.1:${port}`, apiKey: env.apiKey, timeoutMs: 300, maxRetries: 1, retryBaseMs: 20, fetch: recorder.fetch,
  });
  const started = Date.now();
  const error = await penora.userInfo(newUser()).catch((e: unknown) => e);
  assert.ok(error instanceof PenoraError);
  assert.deepEqual([error.status, error.code, error.attempts], [0, "timeout", 2]);
  assert.equal(recorder.attempts.length, 2);
  assert.ok(Date.now() - started >= 600);
});

test("a webhook registration whose answer is lost is retried and registers once, with the secret that signs", async (t) => {
  const receiver = await webhookReceiver();
  t.after(() => receiver.close());

  // The first registration's answer is dropped after the service committed it.
  let cutOnce = false;
  const proxy = await cuttingProxy(env.baseUrl, (seen) => {
    if (cutOnce || !seen.requestLine.startsWith("POST /api/unified/webhooks ")) return false;
    cutOnce = true;
    return true;
  });
  t.after(() => proxy.close());
  const penora = new PenoraClient({ baseUrl: proxy.url, apiKey: env.apiKey, maxRetries: 3, retryBaseMs: 20 });
  const description = `lost answer ${newUser()}`;
  const endpoint = await penora.createWebhook({ url: receiver.url, events: ["balance.low"], description });
  assert.deepEqual([endpoint.lastResponse.attempts, endpoint.lastResponse.replayed], [2, true]);
  const sent = proxy.seen.filter((s) => s.requestLine.startsWith("POST /api/unified/webhooks "));
  assert.equal(sent.length, 2);
  assert.equal(sent[0]?.idempotencyKey, sent[1]?.idempotencyKey);
  const made = (await client().webhooks()).webhooks.filter((w) => w.description === description);
  assert.deepEqual(made.map((w) => w.id), [endpoint.id], "registered once");
  // The secret the retry answered is the one the endpoint signs with.
  const test = await client().testWebhook(endpoint.id);
  const delivery = await eventually("the test delivery", async () =>
    receiver.deliveries.find((d) => d.headers["webhook-id"] === test.event_id),
  );
  const event = verifyWebhook(endpoint.secret, delivery.headers, delivery.body);
  assert.equal(event.type, "webhook.test");
  await client().deleteWebhook(endpoint.id);
});
