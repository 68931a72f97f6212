// How a receiver verifies a Penora webhook (Standard Webhooks), with
// Node's own crypto: the README's "Receiving events" shows this function.
// Run as a script, it checks the specification's published test vector,
// then the delivery described by its environment (WEBHOOK_SECRET,
// WEBHOOK_ID, WEBHOOK_TIMESTAMP, WEBHOOK_SIGNATURE, WEBHOOK_BODY_FILE), and
// prints "valid" (exit 0) or "invalid" (exit 1).
import crypto from "node:crypto";
import { readFileSync } from "node:fs";

// secret: the "whsec_…" from POST /webhooks; headers: the request's
// (lower-case names); body: the raw body, as received (before JSON.parse).
export function verifyPenoraWebhook(secret, headers, body, now = Date.now() / 1000) {
  const id = headers["webhook-id"];
  const timestamp = headers["webhook-timestamp"];
  const signatures = headers["webhook-signature"];
  if (!id || !timestamp || !signatures) return false;
  // Refuse old (replayed) or future deliveries: 5 minutes either way.
  if (Math.abs(now - Number(timestamp)) > 300) return false;
  const key = Buffer.from(secret.replace(/^whsec_/, ""), "base64");
  const expected = crypto
    .createHmac("sha256", key)
    .update(`${id}.${timestamp}.`)
    .update(body)
    .digest();
  return signatures.split(" ").some((s) => {
    const [version, b64] = s.split(",");
    const given = Buffer.from(b64 ?? "", "base64");
    return version === "v1" && given.length === expected.length && crypto.timingSafeEqual(given, expected);
  });
}

if (import.meta.url === `file://${process.argv[1]}`) {
  const vector = verifyPenoraWebhook(
    "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
    {
      "webhook-id": "msg_p5jXN8AQM9LWM0D4loKWxJek",
      "webhook-timestamp": "1614265330",
      "webhook-signature": "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
    },
    '{"test": 2432232314}',
    1614265330,
  );
  if (!vector) {
    console.log("the published test vector does not verify");
    process.exit(2);
  }
  const env = process.env;
  const ok = verifyPenoraWebhook(
    env.WEBHOOK_SECRET,
    {
      "webhook-id": env.WEBHOOK_ID,
      "webhook-timestamp": env.WEBHOOK_TIMESTAMP,
      "webhook-signature": env.WEBHOOK_SIGNATURE,
    },
    readFileSync(env.WEBHOOK_BODY_FILE),
  );
  console.log(ok ? "valid" : "invalid");
  process.exit(ok ? 0 : 1);
}
