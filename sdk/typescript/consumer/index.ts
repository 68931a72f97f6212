// An app that installed the packed tarball (`npm install penora-credits-0.1.0.tgz`)
// and not amqplib: scripts/sdk.sh type-checks it in strict mode against the
// package's declarations and runs it against the running API.
import {
  PenoraClient,
  PenoraError,
  type PenoraEvent,
  publishGenerationEvent,
  verifyWebhook,
} from "@penora/credits";

const penora = new PenoraClient({
  baseUrl: process.env.PENORA_BASE_URL ?? "",
  apiKey: process.env.PENORA_API_KEY ?? "",
});
const quote = await penora.quote({ width: 512, height: 512 });
const credits: number = quote.credits;
if (credits !== 2) throw new Error(`a 512² image costs 2, the quote said ${credits}`);

const missing = await penora.userInfo("consumer-nobody").catch((e: unknown) => e);
if (!(missing instanceof PenoraError) || missing.code !== "user_not_found") throw new Error("expected user_not_found");

const event: PenoraEvent = verifyWebhook(
  "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
  {
    "webhook-id": "msg_p5jXN8AQM9LWM0D4loKWxJek",
    "webhook-timestamp": "1614265330",
    "webhook-signature": "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
  },
  '{"test": 2432232314}',
  { now: 1614265330 },
);
if (!event) throw new Error("the vector did not verify");

const published = await publishGenerationEvent("amqp://127.0.0.1:1", {
  type: "generation.failed",
  userId: "u",
  projectCode: "p",
}).then(
  () => "published",
  (e: unknown) => (e instanceof Error ? e.message : String(e)),
);
if (!published.includes("npm install amqplib")) throw new Error(`without amqplib: ${published}`);
console.log("consumer: the packed package installs, type-checks and works without amqplib");
