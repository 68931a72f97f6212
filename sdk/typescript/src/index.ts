/**
 * @penora/credits: the client for Penora Credits.
 *
 * - {@link PenoraClient}: every route, typed from the service's OpenAPI
 *   document, with idempotency keys on every POST and safe retries.
 * - {@link PenoraError}: what a failed call throws.
 * - {@link verifyWebhook}: checks a webhook delivery (Standard Webhooks) and
 *   gives its {@link PenoraEvent}.
 * - {@link publishGenerationEvent}: ImageGene's `generation.failed` /
 *   `generation.succeeded` events over AMQP (needs the `amqplib` package).
 */
export {
  PenoraClient,
  type PenoraClientOptions,
  type CallOptions,
  type ResponseInfo,
  type WithResponse,
  type Content,
  type Schemas,
  type RequestBody,
  type Query,
  type Answer,
} from "./client.js";
export { PenoraError, type ErrorBody } from "./errors.js";
export {
  verifyWebhook,
  WebhookVerificationError,
  WEBHOOK_HEADERS,
  type WebhookFailure,
  type WebhookHeaders,
  type VerifyOptions,
} from "./webhooks.js";
export * from "./events.js";
export {
  publishGenerationEvent,
  GenerationEventPublisher,
  type GenerationEvent,
  type PublishOptions,
  type Published,
} from "./amqp.js";
export type { paths, components, operations } from "./openapi.js";
