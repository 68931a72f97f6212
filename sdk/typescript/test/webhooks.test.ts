// verifyWebhook: the Standard Webhooks specification's published vector,
// the specification's reference library (the npm package standardwebhooks)
// signing and verifying beside ours, refusals, and real deliveries from the
// running worker to a receiver on this machine.
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { test } from "node:test";

import { Webhook } from "standardwebhooks";

import {
  EVENT_TYPES,
  type PenoraEvent,
  WebhookVerificationError,
  verifyWebhook,
} from "../src/index.js";
import { client, eventually, newUser, webhookReceiver } from "./support.js";

// The specification's example (spec/standard-webhooks.md, "Signature scheme").
const VECTOR = {
  secret: "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
  id: "msg_p5jXN8AQM9LWM0D4loKWxJek",
  timestamp: 1614265330,
  body: '{"test": 2432232314}',
  signature: "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
};

const headersOf = (id: string, timestamp: number, signature: string) => ({
  "webhook-id": id,
  "webhook-timestamp": String(timestamp),
  "webhook-signature": signature,
});

function refusal(f: () => unknown): string {
  try {
    f();
  } catch (e) {
    assert.ok(e instanceof WebhookVerificationError, `threw ${String(e)}`);
    return e.reason;
  }
  return "accepted";
}

test("the specification's published vector verifies; tampering with any part of it does not", () => {
  const { secret, id, timestamp, body, signature } = VECTOR;
  const now = timestamp + 10;
  const event = verifyWebhook(secret, headersOf(id, timestamp, signature), body, { now });
  assert.deepEqual(event, JSON.parse(body));
  // The same with Fetch API headers, bytes for the body, several signatures (key rotation) and upper-case names.
  assert.ok(verifyWebhook(secret, new Headers(headersOf(id, timestamp, signature)), Buffer.from(body), { now }));
  assert.ok(verifyWebhook(secret, headersOf(id, timestamp, `v1,bm90IGl0 ${signature}`), body, { now }));
  assert.ok(verifyWebhook(secret, { "Webhook-Id": id, "Webhook-Timestamp": String(timestamp), "Webhook-Signature": signature }, body, { now }));

  assert.equal(refusal(() => verifyWebhook(secret, headersOf(id, timestamp, signature), '{"test": 2432232315}', { now })), "bad_signature");
  assert.equal(refusal(() => verifyWebhook(secret, headersOf(id, timestamp, signature), `${body} `, { now })), "bad_signature");
  assert.equal(refusal(() => verifyWebhook(secret, headersOf("msg_other", timestamp, signature), body, { now })), "bad_signature");
  assert.equal(refusal(() => verifyWebhook(secret, headersOf(id, timestamp + 1, signature), body, { now })), "bad_signature");
  assert.equal(refusal(() => verifyWebhook("whsec_" + randomBytes(24).toString("base64"), headersOf(id, timestamp, signature), body, { now })), "bad_signature");
  assert.equal(refusal(() => verifyWebhook(secret, headersOf(id, timestamp, signature.replace("v1,", "v2,")), body, { now })), "bad_signature");
  assert.equal(refusal(() => verifyWebhook(secret, headersOf(id, timestamp, "v1,"), body, { now })), "bad_signature");
  // Stale and future timestamps: 5 minutes either way by default.
  assert.equal(refusal(() => verifyWebhook(secret, headersOf(id, timestamp, signature), body, { now: timestamp + 301 })), "timestamp_too_old");
  assert.equal(refusal(() => verifyWebhook(secret, headersOf(id, timestamp, signature), body, { now: timestamp - 301 })), "timestamp_too_new");
  assert.equal(refusal(() => verifyWebhook(secret, headersOf(id, timestamp, signature), body)), "timestamp_too_old");
  assert.ok(verifyWebhook(secret, headersOf(id, timestamp, signature), body, { now: timestamp + 3000, toleranceSecs: 3600 }));
  assert.equal(refusal(() => verifyWebhook(secret, { "webhook-id": id, "webhook-signature": signature }, body, { now })), "missing_header");
  assert.equal(refusal(() => verifyWebhook(secret, headersOf(id, timestamp, signature), JSON.parse(body) as string, { now })), "bad_body");
  assert.equal(refusal(() => verifyWebhook("whsec_not base64!", headersOf(id, timestamp, signature), body, { now })), "bad_secret");
});

test("ours and the specification's reference library agree on 200 random deliveries, valid and tampered", () => {
  for (let i = 0; i < 200; i++) {
    const secret = `whsec_${randomBytes(32).toString("base64")}`;
    const reference = new Webhook(secret);
    const id = `evt_${randomBytes(16).toString("hex")}`;
    const at = new Date();
    const body = JSON.stringify({ id, type: "balance.low", n: i, text: randomBytes(i).toString("base64") });
    const signature = reference.sign(id, at, body);
    const headers = headersOf(id, Math.floor(at.getTime() / 1000), signature);
    assert.deepEqual(verifyWebhook(secret, headers, body), JSON.parse(body));
    const tampered = body.replace(`"n":${i}`, `"n":${i + 1}`);
    assert.equal(refusal(() => verifyWebhook(secret, headers, tampered)), "bad_signature");
    assert.throws(() => reference.verify(tampered, headers));
    const otherSecret = `whsec_${randomBytes(32).toString("base64")}`;
    assert.equal(refusal(() => verifyWebhook(otherSecret, headers, body)), "bad_signature");
  }
});

test("real deliveries from the worker verify, and give typed events", async (t) => {
  const receiver = await webhookReceiver();
  t.after(() => receiver.close());
  const { deliveries } = receiver;

  const penora = client();
  const endpoint = await penora.createWebhook({
    url: receiver.url,
    events: ["credits.granted", "balance.low", "credits.refunded", "reservation.settled"],
    description: "SDK test receiver",
  });
  t.after(() => penora.deleteWebhook(endpoint.id).then(() => undefined));
  const { secret } = endpoint;

  const user = newUser("hooked");
  await penora.addCredits({ user_id: user, amount: 12, reason: "purchase", reference: `buy-${user}` });
  const d = await penora.deductCredits({ user_id: user, amount: 5, app_name: "imagegene" });
  await penora.refundCredits({ user_id: user, project_code: d.project_code, amount: 2, reference: `part-${user}`, reason: "one failed" });
  await penora.settleCredits({ user_id: user, project_code: d.project_code, app_name: "imagegene" });
  const sent = await penora.testWebhook(endpoint.id);

  const mine = (e: PenoraEvent) => e.data.user_id === user || (e.type === "webhook.test" && e.id === sent.event_id);
  const events = await eventually("five deliveries", async () => {
    const verified = deliveries.map((d) => verifyWebhook(secret, d.headers, d.body)).filter(mine);
    return verified.length >= 5 ? verified : undefined;
  });
  const byType = new Map(events.map((e) => [e.type, e]));
  assert.deepEqual([...byType.keys()].sort(), ["balance.low", "credits.granted", "credits.refunded", "reservation.settled", "webhook.test"]);
  for (const e of events) {
    assert.match(e.id, /^evt_/);
    assert.ok(EVENT_TYPES.includes(e.type));
    switch (e.type) {
      case "credits.granted":
        assert.deepEqual([e.data.amount, e.data.balance, e.data.category, e.data.reference], [12, 12, "paid", `buy-${user}`]);
        break;
      case "balance.low":
        assert.deepEqual([e.data.balance, e.data.threshold], [7, 10]);
        break;
      case "credits.refunded":
        assert.deepEqual([e.data.amount, e.data.balance, e.data.project_code, e.data.reference], [2, 9, d.project_code, `part-${user}`]);
        break;
      case "reservation.settled":
        assert.deepEqual([e.data.amount, e.data.returned, e.data.settled_by], [3, 0, "final"]);
        break;
      case "webhook.test":
        assert.equal(e.data.endpoint_id, endpoint.id);
        break;
      default:
        assert.fail(`unexpected ${e.type}`);
    }
  }
  // Each delivery also verifies with the reference library, and not with another secret.
  const delivered = deliveries.filter((d) => events.some((e) => e.id === d.headers["webhook-id"]));
  for (const d of delivered) {
    const headers = {
      "webhook-id": String(d.headers["webhook-id"]),
      "webhook-timestamp": String(d.headers["webhook-timestamp"]),
      "webhook-signature": String(d.headers["webhook-signature"]),
    };
    assert.deepEqual(new Webhook(secret).verify(d.body.toString("utf8"), headers), JSON.parse(d.body.toString("utf8")));
    assert.equal(refusal(() => verifyWebhook(`whsec_${randomBytes(32).toString("base64")}`, d.headers, d.body)), "bad_signature");
  }
});
