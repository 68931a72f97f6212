// The integration guide's flow through the SDK, against the running
// service: check the balance, deduct, generate (a photo-like 1024² PNG),
// save it naming the deduction, list it, read it back; and a generation
// that fails, reported as ImageGene does, over AMQP, and refunded.
import assert from "node:assert/strict";
import { test } from "node:test";

import { PenoraError, type WithResponse, type components, publishGenerationEvent } from "../src/index.js";
import { client, env, eventually, imageSize, newUser, photoLikePng, schemaErrors } from "./support.js";

type S = components["schemas"];
/** An answer typed by the generated schema, with what came with it. */
type R<T> = WithResponse<T>;

test("the guide's flow: balance, deduct, save a 1024² artwork, list it, read it; a failed generation refunded by event", async () => {
  const penora = client();
  const user = newUser("guide");
  const granted: R<S["Success_AddCreditsResponse"]> = await penora.addCredits({
    user_id: user,
    amount: 50,
    reason: "signup bonus",
    reference: `signup-${user}`,
  });
  assert.equal(granted.new_balance, 50);

  // 1. Enough credits?
  const info: R<S["Success_UserInfo"]> = await penora.userInfo(user);
  assert.equal(info.credits, 50);
  const { credits: cost }: R<S["Success_QuoteResponse"]> = await penora.quote({ width: 1024, height: 1024 });
  assert.equal(cost, 5, "the guide's price list: 1024² costs 5");
  assert.ok(info.credits >= cost);

  // 2. Deduct before generating (the SDK sends an Idempotency-Key, which
  //    becomes the reservation's project_code).
  const deduction: R<S["Success_DeductResponse"]> = await penora.deductCredits({
    user_id: user,
    amount: cost,
    app_name: "imagegene",
    description: "Sunset over hills",
  });
  assert.equal(deduction.credits_deducted, 5);
  assert.equal(deduction.new_balance, 45);
  assert.equal(deduction.reservation_status, "reserved");
  assert.equal(deduction.project_code, deduction.lastResponse.idempotencyKey);
  assert.equal(deduction.lastResponse.replayed, false);
  assert.match(deduction.lastResponse.requestId ?? "", /.+/);

  // 3. Generate: a photo-like 1024² artwork.
  const png = photoLikePng(1024, 1024, 7);
  assert.ok(png.length > 1_000_000, `a photo-like PNG is large (${png.length} bytes)`);

  // 4a. Save it, naming the deduction: the reservation settles once stored.
  const saved: R<S["Success_SaveProjectResponse"]> = await penora.saveProject({
    user_id: user,
    app_source: "imagegene",
    project_type: "ai_artwork",
    title: "Sunset over hills",
    content: png.toString("base64"),
    project_code: deduction.project_code,
    metadata: { prompt: "a sunset over hills", seed: 7, width: 1024, height: 1024 },
  });
  assert.equal(saved.lastResponse.status, 202);
  assert.equal(saved.status, "queued");
  const project = await eventually("the artwork saved", async () => {
    const page: R<S["Success_ProjectsResponse"]> = await penora.projects({ user_id: user, app: "imagegene" });
    const item = page.imagegene_projects.find((p) => p.id === saved.project_id);
    return item?.status === "saved" ? item : undefined;
  });
  assert.equal(project.title, "Sunset over hills");
  assert.equal(project.metadata.prompt, "a sunset over hills");
  assert.equal(project.project_code, deduction.project_code);
  const content = await penora.projectContent(saved.project_id, user);
  assert.match(content.contentType, /^image\//);
  assert.deepEqual(
    { width: imageSize(content.bytes).width, height: imageSize(content.bytes).height },
    { width: 1024, height: 1024 },
  );
  assert.equal(content.bytes.length, project.size_bytes);
  const thumbnail = await penora.projectThumbnail(saved.project_id, user);
  assert.ok(imageSize(thumbnail.bytes).width < 1024);
  const settled = await eventually("the reservation settled", async () => {
    const page: R<S["Success_TransactionsResponse"]> = await penora.transactions({ user_id: user });
    return page.transactions.find((t) => t.kind === "settle" && t.project_code === deduction.project_code);
  });
  assert.equal(settled.amount, 0);
  assert.equal((await penora.userInfo(user)).reserved_credits, 0);

  // 4b. The next generation fails: ImageGene publishes generation.failed,
  //     the worker gives the credits back.
  const second = await penora.deductCredits({ user_id: user, amount: cost, app_name: "imagegene" });
  assert.equal(second.new_balance, 40);
  const published = await publishGenerationEvent(
    env.amqpUrl,
    { type: "generation.failed", userId: user, projectCode: second.project_code, reason: "GPU out of memory" },
    { prefix: env.amqpPrefix },
  );
  assert.match(published.eventId, /^evt_[0-9a-f]{32}$/);
  const refund = await eventually("the failed generation refunded", async () => {
    const page = await penora.transactions({ user_id: user });
    return page.transactions.find((t) => t.kind === "refund" && t.project_code === second.project_code);
  });
  assert.equal(refund.amount, 5);
  assert.equal(refund.description, "GPU out of memory");
  const after = await penora.userInfo(user);
  assert.equal(after.credits, 45);
  assert.equal(after.reserved_credits, 0);

  // The same event again (a publisher that did not see the confirm) gives nothing more.
  await publishGenerationEvent(
    env.amqpUrl,
    {
      type: "generation.failed",
      userId: user,
      projectCode: second.project_code,
      reason: "GPU out of memory",
      eventId: published.eventId,
    },
    { prefix: env.amqpPrefix },
  );
  // A marker event after it: once its refund landed, the repeat was handled before it.
  const third = await penora.deductCredits({ user_id: user, amount: 2, app_name: "imagegene" });
  await publishGenerationEvent(
    env.amqpUrl,
    { type: "generation.failed", userId: user, projectCode: third.project_code, reason: "marker" },
    { prefix: env.amqpPrefix },
  );
  await eventually("the marker refunded", async () =>
    (await penora.userInfo(user)).reserved_credits === 0 ? true : undefined,
  );
  const ledger = await penora.transactions({ user_id: user, limit: 100 });
  assert.equal(ledger.transactions.filter((t) => t.kind === "refund" && t.project_code === second.project_code).length, 1);
  assert.equal((await penora.userInfo(user)).credits, 45);
});

test("a 402 is thrown at once as a PenoraError with the guide's words, and moves nothing", async () => {
  let attempts = 0;
  const penora = client({
    fetch: (input, init) => {
      attempts += 1;
      return fetch(input, init);
    },
  });
  const user = newUser("poor");
  await penora.addCredits({ user_id: user, amount: 3, reason: "bonus", reference: `bonus-${user}` });
  attempts = 0;
  const error = await penora
    .deductCredits({ user_id: user, amount: 5, app_name: "imagegene" })
    .then(() => assert.fail("a deduction past the balance succeeded"))
    .catch((e: unknown) => e);
  assert.ok(error instanceof PenoraError);
  assert.equal(error.status, 402);
  assert.equal(error.code, "insufficient_credits");
  assert.equal(error.error, "Insufficient credits or deduction failed");
  assert.equal(error.retryable, false);
  assert.equal(error.attempts, 1);
  assert.equal(attempts, 1, "a 402 is not retried");
  assert.match(error.requestId ?? "", /.+/);
  assert.match(error.idempotencyKey ?? "", /^[0-9a-f-]{36}$/);
  assert.equal((await penora.userInfo(user)).credits, 3);

  const missing = await penora.userInfo(newUser("nobody")).catch((e: unknown) => e);
  assert.ok(missing instanceof PenoraError);
  assert.deepEqual([missing.status, missing.code, missing.error], [404, "user_not_found", "User not found"]);
  const badKey = await client({ apiKey: "pnr_not_a_key" })
    .userInfo(newUser())
    .catch((e: unknown) => e);
  assert.ok(badKey instanceof PenoraError);
  assert.equal(badKey.code, "invalid_api_key");
  assert.equal(badKey.error, "Invalid or missing API key. Include X-API-Key header or api_key parameter.");
  assert.ok(!String(badKey.message).includes("pnr_not_a_key"), "the key is not in the error");
});

test("every route through the SDK answers what the OpenAPI document says", async () => {
  const penora = client();
  const user = newUser("routes");
  const seen: Array<[string, string, number, unknown]> = [];
  const record = <T extends { lastResponse: { status: number } }>(path: string, method: string, answer: T): T => {
    seen.push([path, method, answer.lastResponse.status, answer]);
    return answer;
  };
  const u = "/api/unified";

  const grant: R<S["Success_AddCreditsResponse"]> = record(`${u}/add-credits`, "post",
    await penora.addCredits({ user_id: user, amount: 100, reason: "purchase", reference: `buy-${user}`, category: "paid" }));
  // (The service's clock is this machine's.)
  const afterFirstGrant = new Date(Date.now() + 5).toISOString();
  await new Promise((r) => setTimeout(r, 20));
  record(`${u}/add-credits`, "post",
    await penora.addCredits({ user_id: user, amount: 20, reason: "promo", reference: `promo-${user}`, category: "promotional",
      expires_at: new Date(Date.now() + 86_400_000).toISOString() }));
  const info: R<S["Success_UserInfo"]> = record(`${u}/user-info`, "get", await penora.userInfo(user));
  assert.deepEqual(info.credits_breakdown, { paid: 100, promotional: 20 });
  const quote: R<S["Success_QuoteResponse"]> = record(`${u}/quote`, "get",
    await penora.quote({ width: 1024, height: 1024, quality: "high", variations: 2 }));
  assert.equal(quote.credits, 10);
  const d1: R<S["Success_DeductResponse"]> = record(`${u}/deduct-credits`, "post",
    await penora.deductCredits({ user_id: user, amount: 8, app_name: "imagegene" }));
  const partial: R<S["Success_RefundResponse"]> = record(`${u}/refund-credits`, "post",
    await penora.refundCredits({ user_id: user, project_code: d1.project_code, amount: 3, reason: "one variation failed" }));
  assert.equal(partial.reservation_status, "partially_refunded");
  assert.equal(partial.remaining_reserved, 5);
  const settle: R<S["Success_SettleReceipt"]> = record(`${u}/settle-credits`, "post",
    await penora.settleCredits({ user_id: user, project_code: d1.project_code, app_name: "imagegene", amount: 4 }));
  assert.equal(settle.credits_charged, 4);
  const d2 = await penora.deductCredits({ user_id: user, amount: 2, app_name: "imagegene" });
  const whole: R<S["Success_RefundResponse"]> = await penora.refundCredits({ user_id: user, project_code: d2.project_code });
  assert.equal(whole.lastResponse.idempotencyKey, null, "a whole refund is sent as the guide sends it");
  const again = await penora.refundCredits({ user_id: user, project_code: d2.project_code });
  assert.equal(again.lastResponse.replayed, true, "asking again answers the first refund");
  assert.equal(again.credits_refunded, 2);
  const tx: R<S["Success_TransactionsResponse"]> = record(`${u}/transactions`, "get", await penora.transactions({ user_id: user, limit: 3 }));
  assert.equal(tx.transactions.length, 3);
  assert.ok(tx.next_cursor);
  record(`${u}/transactions`, "get", await penora.transactions({ user_id: user, limit: 3, cursor: Number(tx.next_cursor) }));
  const lots: R<S["Success_LotsResponse"]> = record(`${u}/credit-lots`, "get", await penora.creditLots({ user_id: user }));
  assert.equal(lots.lots.length, 2);
  const promo = lots.lots.find((l) => l.category === "promotional");
  assert.ok(promo);
  const balance: R<S["Success_BalanceResponse"]> = record(`${u}/balance`, "get",
    await penora.balanceAt({ user_id: user, at: afterFirstGrant }));
  assert.equal(balance.credits, 100, "right after the first grant");
  const voided: R<S["Success_VoidReceipt"]> = record(`${u}/credit-lots/{lot_id}/void`, "post",
    await penora.voidLot(promo.lot_id, { user_id: user, reason: "promotion withdrawn" }));
  assert.equal(voided.status, "voided");

  const alerts: R<S["Success_AlertsResponse"]> = record(`${u}/alerts`, "put",
    await penora.setAlerts({ user_id: user, low_balance_threshold: 25 }));
  assert.equal(alerts.low_balance_threshold, 25);
  record(`${u}/alerts`, "get", await penora.alerts(user));
  const limit: R<S["Success_LimitsResponse"]> = record(`${u}/limits`, "put",
    await penora.setLimit({ user_id: user, period: "day", max_credits: 50 }));
  assert.ok(limit);
  const limits: R<S["Success_LimitsResponse"]> = record(`${u}/limits`, "get", await penora.limits(user));
  assert.equal(limits.limits[0]?.max_credits, 50);
  record(`${u}/limits`, "delete", await penora.deleteLimit({ user_id: user, period: "day" }));
  const allowance: R<S["Success_SetReceipt"]> = record(`${u}/allowances`, "put",
    await penora.setAllowance({ user_id: user, allowance_id: "pro-monthly", amount: 30, period: "month" }));
  assert.ok(allowance);
  const allowances: R<S["Success_AllowanceList"]> = record(`${u}/allowances`, "get", await penora.allowances(user));
  assert.equal(allowances.allowances[0]?.allowance_id, "pro-monthly");
  record(`${u}/allowances`, "delete", await penora.deleteAllowance({ user_id: user, allowance_id: "pro-monthly" }));

  const story = await penora.saveProject({
    user_id: user, app_source: "penora", project_type: "story", title: "Chapter one",
    content: Buffer.from("# Chapter one\n\nIt was a dark and stormy night.").toString("base64"),
  });
  record(`${u}/save-project`, "post", story);
  const projects: R<S["Success_ProjectsResponse"]> = record(`${u}/projects`, "get", await penora.projects({ user_id: user }));
  assert.equal(projects.total_count, 1);
  const deleted: R<S["Success_DeleteProjectResponse"]> = record(`${u}/projects/{project_id}`, "delete",
    await penora.deleteProject(story.project_id, user));
  assert.equal(deleted.project_id, story.project_id);

  const hook: R<S["Success_Registered"]> = record(`${u}/webhooks`, "post",
    await penora.createWebhook({ url: "http://127.0.0.1:9/never", events: ["balance.low"], description: "routes test" }));
  assert.match(hook.secret, /^whsec_/);
  const hooks: R<S["Success_WebhookList"]> = record(`${u}/webhooks`, "get", await penora.webhooks());
  assert.ok(hooks.webhooks.some((w) => w.id === hook.id));
  const sent: R<S["Success_TestSent"]> = record(`${u}/webhooks/{id}/test`, "post", await penora.testWebhook(hook.id));
  assert.match(sent.event_id, /^evt_/);
  record(`${u}/webhooks/{id}`, "delete", await penora.deleteWebhook(hook.id));
  const health: R<S["Health"]> = record("/health", "get", await penora.health());
  assert.equal(health.database, "ok");
  assert.equal(grant.user_id, user);

  const failures: string[] = [];
  for (const [path, method, status, body] of seen) {
    for (const e of await schemaErrors(path, method, status, body)) failures.push(`${method.toUpperCase()} ${path} ${status}: ${e}`);
  }
  assert.deepEqual(failures, []);
  // The check sees a drift: a field gone, a field of another type, a field the document does not name.
  const drifted = { ...d1, new_balance: "45", surprise: true } as Record<string, unknown>;
  delete drifted.project_code;
  const found = await schemaErrors(`${u}/deduct-credits`, "post", 200, drifted);
  assert.deepEqual(found.sort(), [
    "$.new_balance: string, the document says integer",
    "$.project_code: required, missing",
    "$.surprise: not in the document",
  ]);
  // Every route of the document was called, but the image routes (read as
  // bytes in the guide's test) and the probes and metrics of orchestrators.
  const doc = (await import("./support.js")).openapiDocument;
  const paths = Object.entries(((await doc()).paths ?? {}) as Record<string, Record<string, unknown>>).flatMap(
    ([path, item]) => Object.keys(item).filter((m) => ["get", "post", "put", "delete"].includes(m)).map((m) => `${m} ${path}`),
  );
  const called = new Set(seen.map(([path, method]) => `${method} ${path}`));
  const notForClients = new Set([
    `get ${u}/projects/{project_id}/content`,
    `get ${u}/projects/{project_id}/thumbnail`,
    "get /metrics",
    "get /health/live",
    "get /ready",
  ]);
  assert.deepEqual(paths.filter((p) => !called.has(p) && !notForClients.has(p)), []);
});

test("a base URL with a path (an API behind a gateway's prefix) keeps it", async () => {
  // A gateway that serves the API under /credits: it strips the prefix and forwards.
  const seen: string[] = [];
  const gateway: typeof fetch = (input, init) => {
    const url = new URL(String(input));
    seen.push(url.pathname);
    assert.ok(url.pathname.startsWith("/credits/"), `the prefix was kept: ${url.pathname}`);
    return fetch(`${env.baseUrl}${url.pathname.slice("/credits".length)}${url.search}`, init);
  };
  const penora = client({ baseUrl: `${env.baseUrl}/credits/`, fetch: gateway });
  const quote = await penora.quote({ width: 512, height: 512 });
  assert.equal(quote.credits, 2);
  assert.deepEqual(seen, ["/credits/api/unified/quote"]);
});
