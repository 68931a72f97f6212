import { randomUUID } from "node:crypto";

import { type ErrorBody, PenoraError } from "./errors.js";
import type { components, paths } from "./openapi.js";
import { backoffMs, retryAfterMs, retryableStatus } from "./retry.js";

/** The service's schemas, by name (`Schemas["DeductRequest"]`). */
export type Schemas = components["schemas"];

type Method = "get" | "put" | "post" | "delete";
type Operation<P extends keyof paths, M extends Method> = NonNullable<paths[P][M]>;
/** The JSON body an operation takes. */
export type RequestBody<P extends keyof paths, M extends Method> =
  Operation<P, M> extends { requestBody: { content: { "application/json": infer B } } }
    ? B
    : Operation<P, M> extends { requestBody?: { content: { "application/json": infer B } } }
      ? NonNullable<B>
      : never;
/** The query an operation takes. */
export type Query<P extends keyof paths, M extends Method> =
  Operation<P, M> extends { parameters: { query?: infer Q } } ? NonNullable<Q> : never;
/** The JSON of an operation's successful answer (200, 201 or 202). */
export type Answer<P extends keyof paths, M extends Method> =
  Operation<P, M> extends { responses: infer R }
    ? R extends { 200: { content: { "application/json": infer J } } }
      ? J
      : R extends { 201: { content: { "application/json": infer J } } }
        ? J
        : R extends { 202: { content: { "application/json": infer J } } }
          ? J
          : never
    : never;

/** What came with an answer, besides its body. */
export interface ResponseInfo {
  /** The HTTP status. */
  status: number;
  /** The answer's headers. */
  headers: Headers;
  /** `X-Request-Id`: quote it to support. */
  requestId: string | null;
  /** `Idempotent-Replayed: true`: an earlier attempt or call with the same key did it; this answers that. */
  replayed: boolean;
  /** The `Idempotency-Key` sent (POSTs), the same on every attempt. */
  idempotencyKey: string | null;
  /** Attempts made, 1 when the first one answered. */
  attempts: number;
}

/** An answer's body, with `lastResponse` (not enumerable: it stays out of `JSON.stringify`). */
export type WithResponse<T> = T & { readonly lastResponse: ResponseInfo };

/** A stored project's bytes. */
export interface Content {
  /** The media type (`image/webp`, `image/png`, `text/markdown`, …). */
  contentType: string;
  bytes: Uint8Array;
  etag: string | null;
}

export interface PenoraClientOptions {
  /** Where the API is (`https://credits.penora.example`), without `/api/unified`. */
  baseUrl: string;
  /** The API key, sent as `X-API-Key` (never in a URL). */
  apiKey: string;
  /** How long one attempt may take, in milliseconds (default 30,000). */
  timeoutMs?: number;
  /** Retries after the first attempt, for network errors, `429` and `503` (default 2). */
  maxRetries?: number;
  /** The first retry's backoff ceiling in milliseconds when no `Retry-After` came (default 500; doubles per retry). */
  retryBaseMs?: number;
  /** The backoff's cap in milliseconds (default 8,000). */
  retryCapMs?: number;
  /** A `Retry-After` longer than this (milliseconds) is not waited for: the error is thrown (default 60,000). */
  maxRetryAfterMs?: number;
  /** The fetch to use (default the global one). */
  fetch?: typeof fetch;
}

/** Options of one call. */
export interface CallOptions {
  /**
   * The `Idempotency-Key` (POSTs). Default: the body's own key when it has
   * one (`project_code`, `reference`), else a new UUID per call. Give your
   * own (an order id) to make a call you may send again — after a crash,
   * from another process — move credits once.
   */
  idempotencyKey?: string;
  /** Cancels the call, retries included. */
  signal?: AbortSignal;
}

type QueryValue = string | number | boolean | null | undefined;

interface Call {
  method: "GET" | "POST" | "PUT" | "DELETE";
  path: string;
  query?: Record<string, QueryValue> | undefined;
  body?: unknown;
  idempotencyKey?: string | null;
  signal?: AbortSignal | undefined;
  bytes?: boolean;
}

const VERSION = "0.1.0";
const NETWORK_CODES = new Set([
  "ECONNRESET",
  "ECONNREFUSED",
  "EPIPE",
  "ETIMEDOUT",
  "EAI_AGAIN",
  "ENOTFOUND",
  "EHOSTUNREACH",
  "ENETUNREACH",
  "UND_ERR_SOCKET",
  "UND_ERR_CLOSED",
  "UND_ERR_CONNECT_TIMEOUT",
  "UND_ERR_HEADERS_TIMEOUT",
  "UND_ERR_BODY_TIMEOUT",
]);

function causeCode(error: unknown): string | undefined {
  let e: unknown = error;
  for (let depth = 0; depth < 4 && e && typeof e === "object"; depth++) {
    const code = (e as { code?: unknown }).code;
    if (typeof code === "string") return code;
    e = (e as { cause?: unknown }).cause;
  }
  return undefined;
}

function withResponse<T extends object>(body: T, info: ResponseInfo): WithResponse<T> {
  Object.defineProperty(body, "lastResponse", { value: info, enumerable: false });
  return body as WithResponse<T>;
}

const sleep = (ms: number, signal?: AbortSignal) =>
  new Promise<void>((resolve, reject) => {
    if (signal?.aborted) return reject(signal.reason);
    const timer = setTimeout(() => {
      signal?.removeEventListener("abort", onAbort);
      resolve();
    }, ms);
    const onAbort = () => {
      clearTimeout(timer);
      reject(signal?.reason);
    };
    signal?.addEventListener("abort", onAbort, { once: true });
  });

/**
 * The Penora Credits API, every route, typed from the service's own OpenAPI
 * document.
 *
 * Every POST carries an `Idempotency-Key` and is retried with the same key
 * on a network error, a `503` or a `429` (waiting what `Retry-After` says,
 * else a jittered exponential backoff), at most `maxRetries` times: a
 * deduction whose answer was lost is answered by the retry, and charged
 * once. Any other error is thrown at once as a {@link PenoraError}.
 *
 * ```ts
 * const penora = new PenoraClient({ baseUrl: "http://127.0.0.1:5000", apiKey: process.env.PENORA_API_KEY! });
 * const { credits } = await penora.userInfo("u-42");
 * ```
 */
export class PenoraClient {
  readonly baseUrl: string;
  private readonly apiKey: string;
  private readonly timeoutMs: number;
  private readonly maxRetries: number;
  private readonly retryBaseMs: number;
  private readonly retryCapMs: number;
  private readonly maxRetryAfterMs: number;
  private readonly fetchImpl: typeof fetch;

  constructor(options: PenoraClientOptions) {
    if (!options.baseUrl) throw new TypeError("baseUrl: is required");
    if (!options.apiKey) throw new TypeError("apiKey: is required");
    this.baseUrl = options.baseUrl.replace(/\/+$/, "");
    this.apiKey = options.apiKey;
    this.timeoutMs = options.timeoutMs ?? 30_000;
    this.maxRetries = Math.max(0, options.maxRetries ?? 2);
    this.retryBaseMs = options.retryBaseMs ?? 500;
    this.retryCapMs = options.retryCapMs ?? 8_000;
    this.maxRetryAfterMs = options.maxRetryAfterMs ?? 60_000;
    this.fetchImpl = options.fetch ?? globalThis.fetch;
  }

  // ---- credits ----

  /** `GET /user-info`: the balance and storage (the guide's shape, plus reserved credits, categories and limits). */
  userInfo(userId: string, options: CallOptions = {}) {
    return this.json<Answer<"/api/unified/user-info", "get">>({
      method: "GET",
      path: "/api/unified/user-info",
      query: { user_id: userId },
      signal: options.signal,
    });
  }

  /**
   * `POST /deduct-credits`: takes the credits now and holds them in a
   * reservation keyed by `project_code` (made from the idempotency key when
   * the body has none). Throws `402 insufficient_credits`,
   * `403 spend_limit_exceeded`, … at once.
   */
  deductCredits(body: RequestBody<"/api/unified/deduct-credits", "post">, options: CallOptions = {}) {
    return this.post<Answer<"/api/unified/deduct-credits", "post">>(
      "/api/unified/deduct-credits",
      body,
      options,
      body.project_code ?? undefined,
    );
  }

  /**
   * `POST /refund-credits`: gives a reservation's credits back, all or
   * `amount` of them. The idempotency key is the refund's `reference`.
   *
   * A whole refund (no `amount`) without a `reference` or `idempotencyKey`
   * is sent without a key, as the guide sends it: it is idempotent by the
   * reservation itself (asking again answers the first refund, retries
   * included), where a new key per call would make a second call a new
   * refund of nothing left (`409 not_refundable`).
   */
  refundCredits(body: RequestBody<"/api/unified/refund-credits", "post">, options: CallOptions = {}) {
    const whole = body.amount === undefined || body.amount === null;
    return this.post<Answer<"/api/unified/refund-credits", "post">>(
      "/api/unified/refund-credits",
      body,
      options,
      body.reference ?? (whole ? null : undefined),
    );
  }

  /** `POST /settle-credits`: ends a reservation now, for `amount` or all of it (the rest is refunded). */
  settleCredits(body: RequestBody<"/api/unified/settle-credits", "post">, options: CallOptions = {}) {
    return this.post<Answer<"/api/unified/settle-credits", "post">>(
      "/api/unified/settle-credits",
      body,
      options,
      body.reference ?? undefined,
    );
  }

  /** `POST /add-credits` (admin): grants credits, once per `reference`. */
  addCredits(body: RequestBody<"/api/unified/add-credits", "post">, options: CallOptions = {}) {
    return this.post<Answer<"/api/unified/add-credits", "post">>(
      "/api/unified/add-credits",
      body,
      options,
      body.reference ?? undefined,
    );
  }

  /** `GET /transactions`: the ledger, newest first, a page at a time (`next_cursor`). */
  transactions(query: Query<"/api/unified/transactions", "get">, options: CallOptions = {}) {
    return this.get<Answer<"/api/unified/transactions", "get">>("/api/unified/transactions", query, options);
  }

  /** `GET /quote`: what an image costs. */
  quote(query: Query<"/api/unified/quote", "get">, options: CallOptions = {}) {
    return this.get<Answer<"/api/unified/quote", "get">>("/api/unified/quote", query, options);
  }

  /** `GET /credit-lots`: the user's lots (paid and promotional credits, with expiry). */
  creditLots(query: Query<"/api/unified/credit-lots", "get">, options: CallOptions = {}) {
    return this.get<Answer<"/api/unified/credit-lots", "get">>("/api/unified/credit-lots", query, options);
  }

  /** `POST /credit-lots/{lot_id}/void` (admin): removes a lot's remaining credits. */
  voidLot(lotId: number, body: RequestBody<"/api/unified/credit-lots/{lot_id}/void", "post">, options: CallOptions = {}) {
    return this.post<Answer<"/api/unified/credit-lots/{lot_id}/void", "post">>(
      `/api/unified/credit-lots/${encodeURIComponent(String(lotId))}/void`,
      body,
      options,
      undefined,
    );
  }

  /** `GET /balance`: what the user could spend at an instant (`at`, default now). */
  balanceAt(query: Query<"/api/unified/balance", "get">, options: CallOptions = {}) {
    return this.get<Answer<"/api/unified/balance", "get">>("/api/unified/balance", query, options);
  }

  // ---- projects ----

  /**
   * `POST /save-project`: stores a project (an artwork as base64) in the
   * user's workspace; answers `202` with `status: "queued"`, the worker
   * finishes it. Naming the deduction's `project_code` settles it once stored.
   */
  saveProject(body: RequestBody<"/api/unified/save-project", "post">, options: CallOptions = {}) {
    return this.post<Answer<"/api/unified/save-project", "post">>(
      "/api/unified/save-project",
      body,
      options,
      body.project_code ?? undefined,
    );
  }

  /** `GET /projects`: the user's projects of both apps. */
  projects(query: Query<"/api/unified/projects", "get">, options: CallOptions = {}) {
    return this.get<Answer<"/api/unified/projects", "get">>("/api/unified/projects", query, options);
  }

  /** `GET /projects/{id}/content`: the stored bytes. */
  projectContent(projectId: string, userId: string, options: CallOptions = {}) {
    return this.content(`/api/unified/projects/${encodeURIComponent(projectId)}/content`, userId, options);
  }

  /** `GET /projects/{id}/thumbnail`: the artwork's thumbnail. */
  projectThumbnail(projectId: string, userId: string, options: CallOptions = {}) {
    return this.content(`/api/unified/projects/${encodeURIComponent(projectId)}/thumbnail`, userId, options);
  }

  /** `DELETE /projects/{id}`: deletes a project and gives its bytes back to the quota. */
  deleteProject(projectId: string, userId: string, options: CallOptions = {}) {
    return this.json<Answer<"/api/unified/projects/{project_id}", "delete">>({
      method: "DELETE",
      path: `/api/unified/projects/${encodeURIComponent(projectId)}`,
      query: { user_id: userId },
      signal: options.signal,
    });
  }

  // ---- alerts, limits, allowances ----

  /** `GET /alerts`: the user's low-balance threshold. */
  alerts(userId: string, options: CallOptions = {}) {
    return this.get<Answer<"/api/unified/alerts", "get">>("/api/unified/alerts", { user_id: userId }, options);
  }

  /** `PUT /alerts` (admin): sets the user's low-balance threshold (`null`: the default). */
  setAlerts(body: RequestBody<"/api/unified/alerts", "put">, options: CallOptions = {}) {
    return this.put<Answer<"/api/unified/alerts", "put">>("/api/unified/alerts", body, options);
  }

  /** `GET /limits`: the user's spend limits, with what is spent and when each resets. */
  limits(userId: string, options: CallOptions = {}) {
    return this.get<Answer<"/api/unified/limits", "get">>("/api/unified/limits", { user_id: userId }, options);
  }

  /** `PUT /limits` (admin): sets one spend limit per user, app (or all) and period. */
  setLimit(body: RequestBody<"/api/unified/limits", "put">, options: CallOptions = {}) {
    return this.put<Answer<"/api/unified/limits", "put">>("/api/unified/limits", body, options);
  }

  /** `DELETE /limits` (admin): removes one. */
  deleteLimit(query: Query<"/api/unified/limits", "delete">, options: CallOptions = {}) {
    return this.json<Answer<"/api/unified/limits", "delete">>({
      method: "DELETE",
      path: "/api/unified/limits",
      query,
      signal: options.signal,
    });
  }

  /** `GET /allowances`: the user's recurring allowances. */
  allowances(userId: string, options: CallOptions = {}) {
    return this.get<Answer<"/api/unified/allowances", "get">>("/api/unified/allowances", { user_id: userId }, options);
  }

  /** `PUT /allowances` (admin): sets a recurring allowance (its first period is granted at once). */
  setAllowance(body: RequestBody<"/api/unified/allowances", "put">, options: CallOptions = {}) {
    return this.put<Answer<"/api/unified/allowances", "put">>("/api/unified/allowances", body, options);
  }

  /** `DELETE /allowances` (admin): ends one (its lots stay as granted). */
  deleteAllowance(query: Query<"/api/unified/allowances", "delete">, options: CallOptions = {}) {
    return this.json<Answer<"/api/unified/allowances", "delete">>({
      method: "DELETE",
      path: "/api/unified/allowances",
      query,
      signal: options.signal,
    });
  }

  // ---- webhooks ----

  /**
   * `POST /webhooks` (admin): registers an endpoint; keep the answer's
   * `secret` (`whsec_…`): it is not listed. A retry with the same key
   * answers the endpoint it made, secret included.
   */
  createWebhook(body: RequestBody<"/api/unified/webhooks", "post">, options: CallOptions = {}) {
    return this.post<Answer<"/api/unified/webhooks", "post">>("/api/unified/webhooks", body, options, undefined);
  }

  /** `GET /webhooks` (admin): the endpoints (never their secrets). */
  webhooks(options: CallOptions = {}) {
    return this.get<Answer<"/api/unified/webhooks", "get">>("/api/unified/webhooks", undefined, options);
  }

  /** `DELETE /webhooks/{id}` (admin). */
  deleteWebhook(id: string, options: CallOptions = {}) {
    return this.json<Answer<"/api/unified/webhooks/{id}", "delete">>({
      method: "DELETE",
      path: `/api/unified/webhooks/${encodeURIComponent(id)}`,
      signal: options.signal,
    });
  }

  /**
   * `POST /webhooks/{id}/test` (admin): sends a `webhook.test` event to that
   * endpoint. (A retry after a lost answer may send a second test event.)
   */
  testWebhook(id: string, options: CallOptions = {}) {
    return this.post<Answer<"/api/unified/webhooks/{id}/test", "post">>(
      `/api/unified/webhooks/${encodeURIComponent(id)}/test`,
      undefined,
      options,
      undefined,
    );
  }

  // ---- system ----

  /** `GET /health`: `{status, database, broker, outbox_pending, version}` (a `503` is thrown as a PenoraError). */
  health(options: CallOptions = {}) {
    return this.get<Answer<"/health", "get">>("/health", undefined, options);
  }

  // ---- the machinery ----

  private get<T extends object>(path: string, query: object | undefined, options: CallOptions) {
    return this.json<T>({
      method: "GET",
      path,
      query: query as Record<string, QueryValue> | undefined,
      signal: options.signal,
    });
  }

  private put<T extends object>(path: string, body: unknown, options: CallOptions) {
    return this.json<T>({ method: "PUT", path, body, signal: options.signal });
  }

  /**
   * A POST with its `Idempotency-Key`: the caller's, else `bodyKey` (the
   * body's own key), else a new UUID; `bodyKey` null (not undefined) sends
   * none.
   */
  private post<T extends object>(
    path: string,
    body: unknown,
    options: CallOptions,
    bodyKey: string | null | undefined,
  ) {
    return this.json<T>({
      method: "POST",
      path,
      body,
      idempotencyKey: options.idempotencyKey ?? (bodyKey === undefined ? randomUUID() : bodyKey),
      signal: options.signal,
    });
  }

  private async json<T extends object>(call: Call): Promise<WithResponse<T>> {
    const { text, info } = await this.send(call);
    let body: T;
    try {
      body = JSON.parse(text) as T;
    } catch {
      throw new PenoraError({
        status: info.status,
        code: "unexpected_response",
        error: "Unexpected answer: not JSON",
        requestId: info.requestId,
        retryable: false,
        idempotencyKey: info.idempotencyKey,
        attempts: info.attempts,
      });
    }
    return withResponse(body, info);
  }

  private async content(path: string, userId: string, options: CallOptions): Promise<WithResponse<Content>> {
    const { response, info } = await this.send({
      method: "GET",
      path,
      query: { user_id: userId },
      signal: options.signal,
      bytes: true,
    });
    let answer = response;
    if (response.status === 303) {
      // Stored elsewhere: fetched from there without the API key.
      const location = response.headers.get("location");
      if (!location) throw this.unexpected(response, info, "a redirect without Location");
      answer = await this.fetchImpl(new URL(location, this.baseUrl), { signal: options.signal ?? null });
      if (!answer.ok) throw this.unexpected(answer, info, `the stored content answered ${answer.status}`);
    }
    const bytes = new Uint8Array(await answer.arrayBuffer());
    return withResponse(
      {
        contentType: answer.headers.get("content-type") ?? "application/octet-stream",
        bytes,
        etag: answer.headers.get("etag"),
      },
      info,
    );
  }

  private unexpected(response: Response, info: ResponseInfo, what: string): PenoraError {
    return new PenoraError({
      status: response.status,
      code: "unexpected_response",
      error: `Unexpected answer: ${what}`,
      requestId: info.requestId,
      retryable: false,
      idempotencyKey: info.idempotencyKey,
      attempts: info.attempts,
    });
  }

  /**
   * Sends `call`, retrying as the class says; resolves with a successful
   * answer: its body read as text, or unread for `bytes` calls.
   */
  private async send(call: Call): Promise<{ response: Response; text: string; info: ResponseInfo }> {
    // Appended, not resolved: a base URL with a path (an API behind a
    // gateway's prefix) keeps it.
    const url = new URL(`${this.baseUrl}${call.path}`);
    for (const [name, value] of Object.entries(call.query ?? {})) {
      if (value !== undefined && value !== null) url.searchParams.set(name, String(value));
    }
    const headers: Record<string, string> = {
      "X-API-Key": this.apiKey,
      Accept: call.bytes ? "*/*" : "application/json",
      "User-Agent": `penora-credits-node/${VERSION}`,
    };
    const key = call.idempotencyKey ?? null;
    if (key !== null) headers["Idempotency-Key"] = key;
    let payload: string | undefined;
    if (call.body !== undefined) {
      headers["Content-Type"] = "application/json";
      payload = JSON.stringify(call.body);
    }
    for (let attempt = 1; ; attempt++) {
      const timeout = new AbortController();
      const timer = setTimeout(
        () => timeout.abort(new PenoraTimeout(this.timeoutMs)),
        this.timeoutMs,
      );
      const onAbort = () => timeout.abort(call.signal?.reason);
      call.signal?.addEventListener("abort", onAbort, { once: true });
      let failure: PenoraError;
      let waitMs: number | null = null;
      try {
        if (call.signal?.aborted) throw call.signal.reason;
        const init: RequestInit = {
          method: call.method,
          headers,
          signal: timeout.signal,
          redirect: "manual",
        };
        if (payload !== undefined) init.body = payload;
        const response = await this.fetchImpl(url, init);
        const info: ResponseInfo = {
          status: response.status,
          headers: response.headers,
          requestId: response.headers.get("x-request-id"),
          replayed: response.headers.get("idempotent-replayed") === "true",
          idempotencyKey: key,
          attempts: attempt,
        };
        if (response.ok || (call.bytes && response.status === 303)) {
          // Read the body inside the attempt, so that a connection cut
          // while it arrives is retried like any other network error.
          const text = call.bytes ? "" : await response.text();
          return { response, text, info };
        }
        const text = await response.text();
        let body: ErrorBody | null = null;
        try {
          const parsed: unknown = JSON.parse(text);
          if (parsed && typeof parsed === "object" && typeof (parsed as ErrorBody).code === "string") {
            body = parsed as ErrorBody;
          }
        } catch {
          // not JSON: a proxy's page
        }
        const code = body?.code ?? `http_${response.status}`;
        const retryable = retryableStatus(response.status);
        failure = new PenoraError({
          status: response.status,
          code,
          error: body?.error ?? (text.slice(0, 200) || response.statusText),
          requestId: info.requestId,
          retryable,
          idempotencyKey: key,
          attempts: attempt,
          body,
        });
        if (!retryable) throw failure;
        waitMs = retryAfterMs(response.headers.get("retry-after"));
      } catch (error) {
        if (error instanceof PenoraError) throw error;
        if (call.signal?.aborted) throw call.signal.reason;
        const timedOut = timeout.signal.aborted && timeout.signal.reason instanceof PenoraTimeout;
        const code = causeCode(error);
        // undici's network failures: "fetch failed" (connecting, sending),
        // "terminated" (the answer cut off), with the socket's code as cause.
        const network =
          (code !== undefined && NETWORK_CODES.has(code)) ||
          (error instanceof TypeError && ["fetch failed", "terminated"].includes(error.message));
        if (!timedOut && !network) throw error;
        failure = new PenoraError({
          status: 0,
          code: timedOut ? "timeout" : "network_error",
          error: timedOut
            ? `No answer within ${this.timeoutMs} ms`
            : `The connection failed (${code ?? (error as Error).message})`,
          retryable: true,
          idempotencyKey: key,
          attempts: attempt,
          cause: error,
        });
      } finally {
        clearTimeout(timer);
        call.signal?.removeEventListener("abort", onAbort);
      }
      if (attempt > this.maxRetries) throw failure;
      if (waitMs !== null && waitMs > this.maxRetryAfterMs) throw failure;
      await sleep(
        backoffMs(attempt, waitMs, { baseMs: this.retryBaseMs, capMs: this.retryCapMs }),
        call.signal,
      );
    }
  }
}

/** The reason an attempt is aborted when it ran out of time. */
class PenoraTimeout extends Error {
  constructor(ms: number) {
    super(`No answer within ${ms} ms`);
  }
}
