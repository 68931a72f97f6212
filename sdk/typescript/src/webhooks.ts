import { createHmac, timingSafeEqual } from "node:crypto";

import type { PenoraEvent } from "./events.js";

/** Why a delivery was refused by {@link verifyWebhook}. */
export type WebhookFailure =
  | "missing_header"
  | "bad_timestamp"
  | "timestamp_too_old"
  | "timestamp_too_new"
  | "bad_secret"
  | "bad_signature"
  | "bad_body";

/** A delivery that is not from Penora, or not as it was sent: answer it 400 and do not act on it. */
export class WebhookVerificationError extends Error {
  override readonly name = "WebhookVerificationError";
  constructor(
    readonly reason: WebhookFailure,
    message: string,
  ) {
    super(message);
  }
}

/** Request headers as Node (`req.headers`), the Fetch API (`Headers`) or a plain object gives them. */
export type WebhookHeaders =
  | { get(name: string): string | null }
  | Record<string, string | string[] | undefined>;

export interface VerifyOptions {
  /** How far `webhook-timestamp` may be from now, either way, in seconds (default 300). */
  toleranceSecs?: number;
  /** Now, in Unix seconds (tests). */
  now?: number;
}

/** The webhook headers' names, as the Standard Webhooks specification gives them. */
export const WEBHOOK_HEADERS = {
  id: "webhook-id",
  timestamp: "webhook-timestamp",
  signature: "webhook-signature",
} as const;

function header(headers: WebhookHeaders, name: string): string | null {
  if (typeof (headers as { get?: unknown }).get === "function") {
    return (headers as { get(name: string): string | null }).get(name);
  }
  const record = headers as Record<string, string | string[] | undefined>;
  let value = record[name];
  if (value === undefined) {
    const key = Object.keys(record).find((k) => k.toLowerCase() === name);
    value = key === undefined ? undefined : record[key];
  }
  if (Array.isArray(value)) return value.join(" ");
  return value ?? null;
}

function secretKey(secret: string): Buffer {
  const encoded = secret.startsWith("whsec_") ? secret.slice("whsec_".length) : secret;
  const key = Buffer.from(encoded, "base64");
  if (key.length === 0 || key.toString("base64").replace(/=+$/, "") !== encoded.replace(/=+$/, "")) {
    throw new WebhookVerificationError("bad_secret", "The secret is not a whsec_ secret (base64 after the prefix)");
  }
  return key;
}

/**
 * Checks a webhook delivery as the Standard Webhooks specification says,
 * and gives back its event.
 *
 * `secret` is the `whsec_…` shown when the endpoint was registered;
 * `headers` the request's; `rawBody` the body exactly as received (a string
 * or the bytes: parse it only after it verified, since re-serialized JSON
 * does not match the signature). Throws {@link WebhookVerificationError}
 * when a header is missing, the timestamp is more than `toleranceSecs` away
 * from now (a replayed or delayed delivery), or no `v1` signature matches
 * (compared in constant time).
 *
 * Deliveries are at least once: deduplicate on the event's `id` (also the
 * `webhook-id` header), which stays the same on every retry.
 */
export function verifyWebhook(
  secret: string,
  headers: WebhookHeaders,
  rawBody: string | Uint8Array,
  options: VerifyOptions = {},
): PenoraEvent {
  const id = header(headers, WEBHOOK_HEADERS.id);
  const timestamp = header(headers, WEBHOOK_HEADERS.timestamp);
  const signatures = header(headers, WEBHOOK_HEADERS.signature);
  if (!id || !timestamp || !signatures) {
    throw new WebhookVerificationError(
      "missing_header",
      "A webhook-id, webhook-timestamp or webhook-signature header is missing",
    );
  }
  if (typeof rawBody !== "string" && !(rawBody instanceof Uint8Array)) {
    throw new WebhookVerificationError(
      "bad_body",
      "Pass the raw body (a string or the bytes as received), not the parsed JSON",
    );
  }
  if (!/^\d{1,12}$/.test(timestamp)) {
    throw new WebhookVerificationError("bad_timestamp", "webhook-timestamp is not Unix seconds");
  }
  const now = options.now ?? Math.floor(Date.now() / 1000);
  const tolerance = options.toleranceSecs ?? 300;
  const sent = Number(timestamp);
  if (now - sent > tolerance) {
    throw new WebhookVerificationError("timestamp_too_old", "The delivery's timestamp is too old");
  }
  if (sent - now > tolerance) {
    throw new WebhookVerificationError("timestamp_too_new", "The delivery's timestamp is in the future");
  }
  const expected = createHmac("sha256", secretKey(secret))
    .update(`${id}.${timestamp}.`)
    .update(rawBody)
    .digest();
  const matched = signatures.split(" ").some((entry) => {
    const comma = entry.indexOf(",");
    if (comma < 0 || entry.slice(0, comma) !== "v1") return false;
    const given = Buffer.from(entry.slice(comma + 1), "base64");
    return given.length === expected.length && timingSafeEqual(given, expected);
  });
  if (!matched) {
    throw new WebhookVerificationError("bad_signature", "No signature matches the body and the secret");
  }
  const text = typeof rawBody === "string" ? rawBody : Buffer.from(rawBody).toString("utf8");
  try {
    return JSON.parse(text) as PenoraEvent;
  } catch {
    throw new WebhookVerificationError("bad_body", "The signed body is not JSON");
  }
}
