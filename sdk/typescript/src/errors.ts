/** What every Penora error answer holds (`{"success": false, "error", "code", …}`). */
export interface ErrorBody {
  success: false;
  /** A sentence for people. */
  error: string;
  /** A stable snake_case word for programs (`insufficient_credits`, `busy`, …). */
  code: string;
  /** Fields some errors add (`limit`, `spent`, `resets_at` for `spend_limit_exceeded`; `project_code` for `timeout`). */
  [field: string]: unknown;
}

/**
 * A call that did not succeed: the service answered an error, or no answer
 * came (then `status` is 0 and `code` is `network_error` or `timeout`).
 *
 * `retryable` says whether sending the same call again, with the same
 * idempotency key, may succeed: `true` for network errors, `429` and `503`,
 * which the client has already retried `maxRetries` times when it throws one.
 */
export class PenoraError extends Error {
  override readonly name = "PenoraError";
  /** The HTTP status, or 0 when no answer came. */
  readonly status: number;
  /** The error's code (`insufficient_credits`, `spend_limit_exceeded`, `network_error`, …). */
  readonly code: string;
  /** The service's sentence, word for word. */
  readonly error: string;
  /** The `X-Request-Id` of the last attempt's answer (quote it to support), if there was one. */
  readonly requestId: string | null;
  /** Whether the same call, with the same idempotency key, may succeed later. */
  readonly retryable: boolean;
  /** The `Idempotency-Key` the call was sent with (POSTs): retry with it to be charged once. */
  readonly idempotencyKey: string | null;
  /** How many attempts were made. */
  readonly attempts: number;
  /** The whole error body (extra fields included), or null when no answer came. */
  readonly body: ErrorBody | null;

  constructor(init: {
    status: number;
    code: string;
    error: string;
    requestId?: string | null;
    retryable: boolean;
    idempotencyKey?: string | null;
    attempts: number;
    body?: ErrorBody | null;
    cause?: unknown;
  }) {
    super(`${init.status === 0 ? "no answer" : init.status} ${init.code}: ${init.error}`, {
      cause: init.cause,
    });
    this.status = init.status;
    this.code = init.code;
    this.error = init.error;
    this.requestId = init.requestId ?? null;
    this.retryable = init.retryable;
    this.idempotencyKey = init.idempotencyKey ?? null;
    this.attempts = init.attempts;
    this.body = init.body ?? null;
  }
}
