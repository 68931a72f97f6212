/** When to try again: the HTTP statuses a retry may fix. */
export function retryableStatus(status: number): boolean {
  return status === 429 || status === 503;
}

/**
 * Milliseconds a `Retry-After` header asks to wait (delta-seconds or an
 * HTTP date), or null when there is none or it cannot be read.
 */
export function retryAfterMs(value: string | null, now: number = Date.now()): number | null {
  if (value === null) return null;
  const trimmed = value.trim();
  if (/^\d+$/.test(trimmed)) return Number(trimmed) * 1000;
  const at = Date.parse(trimmed);
  if (Number.isNaN(at)) return null;
  return Math.max(0, at - now);
}

/**
 * The wait before retry number `retry` (1 = the first retry): what
 * `Retry-After` asks plus up to 10 % more, so that clients told the same
 * second do not all come back at once; without it, exponential backoff
 * with "equal jitter": between half and all of `baseMs × 2^(retry-1)`,
 * capped at `capMs`.
 */
export function backoffMs(
  retry: number,
  retryAfter: number | null,
  { baseMs, capMs }: { baseMs: number; capMs: number },
  random: () => number = Math.random,
): number {
  if (retryAfter !== null) return retryAfter + Math.floor(random() * retryAfter * 0.1);
  const ceiling = Math.min(capMs, baseMs * 2 ** (retry - 1));
  return Math.floor(ceiling / 2 + random() * (ceiling / 2));
}
