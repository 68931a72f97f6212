// What the SDK's tests share: the running service's addresses (from
// scripts/sdk.sh), users of their own, the operator CLI, a photo-like
// artwork, and a check of answers against the service's OpenAPI document.
import { execFile } from "node:child_process";
import { randomUUID } from "node:crypto";
import http from "node:http";
import type { AddressInfo } from "node:net";
import { promisify } from "node:util";
import { deflateSync } from "node:zlib";

import { PenoraClient, type PenoraClientOptions } from "../src/index.js";

function required(name: string): string {
  const value = process.env[name];
  if (!value) {
    throw new Error(
      `${name} is not set: these tests run against the real service; run them with scripts/sdk.sh, ` +
        "which starts PostgreSQL, RabbitMQ, penora-api and penora-worker and sets it",
    );
  }
  return value;
}

export const env = {
  baseUrl: required("PENORA_BASE_URL"),
  constrainedUrl: required("PENORA_CONSTRAINED_URL"),
  apiKey: required("PENORA_API_KEY"),
  amqpUrl: required("AMQP_URL"),
  amqpPrefix: process.env.AMQP_PREFIX ?? "",
  ops: required("PENORA_OPS"),
};

/** A client of the main API with the bootstrap key (every scope), fast backoff for tests. */
export function client(options: Partial<PenoraClientOptions> = {}): PenoraClient {
  return new PenoraClient({ baseUrl: env.baseUrl, apiKey: env.apiKey, retryBaseMs: 50, ...options });
}

const run = randomUUID().slice(0, 8);
let users = 0;
/** A user id no other test uses. */
export function newUser(name = "user"): string {
  users += 1;
  return `sdk-${run}-${name}-${users}`;
}

/** Runs penora-ops with the services' environment; resolves with its output. */
export async function ops(...args: string[]): Promise<string> {
  const { stdout } = await promisify(execFile)(env.ops, args, { env: process.env });
  return stdout;
}

/** A key of its own (printed once by `penora-ops keys create`). */
export async function createKey(app: string, scopes: string): Promise<string> {
  const out = await ops("keys", "create", "--app", app, "--scopes", scopes, "--name", `sdk-test-${run}`);
  const key = /pnr_[A-Za-z0-9_]+/.exec(out)?.[0];
  if (!key) throw new Error(`penora-ops keys create printed no key: ${out}`);
  return key;
}

/** Polls `check` until it returns something other than undefined (at most `ms`). */
export async function eventually<T>(what: string, check: () => Promise<T | undefined>, ms = 30_000): Promise<T> {
  const deadline = Date.now() + ms;
  for (;;) {
    const value = await check();
    if (value !== undefined) return value;
    if (Date.now() > deadline) throw new Error(`${what}: not within ${ms} ms`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

/** A webhook delivery as a receiver got it: the headers and the raw body. */
export interface Delivery {
  headers: http.IncomingHttpHeaders;
  body: Buffer;
}

/**
 * An HTTP receiver on 127.0.0.1 that answers every POST 204 and keeps what
 * came; `close` it when done.
 */
export async function webhookReceiver() {
  const deliveries: Delivery[] = [];
  const server = http.createServer((req, res) => {
    const chunks: Buffer[] = [];
    req.on("data", (c: Buffer) => chunks.push(c));
    req.on("end", () => {
      deliveries.push({ headers: req.headers, body: Buffer.concat(chunks) });
      res.writeHead(204).end();
    });
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address() as AddressInfo;
  return {
    url: `http://127.0.0.1:${port}/penora-events`,
    deliveries,
    close: () => new Promise<void>((resolve) => server.close(() => resolve())),
  };
}

// ---- a photo-like artwork, as a PNG ----

const CRC_TABLE = Array.from({ length: 256 }, (_, n) => {
  let c = n;
  for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
  return c >>> 0;
});
function crc32(bytes: Uint8Array): number {
  let c = 0xffffffff;
  for (const b of bytes) c = (CRC_TABLE[(c ^ b) & 0xff] as number) ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}
function chunk(kind: string, data: Uint8Array): Buffer {
  const body = Buffer.concat([Buffer.from(kind, "ascii"), data]);
  const out = Buffer.alloc(body.length + 8);
  out.writeUInt32BE(data.length, 0);
  body.copy(out, 4);
  out.writeUInt32BE(crc32(body), body.length + 4);
  return out;
}

/**
 * A photo-like RGB PNG (the Rust tests' `photo_like`): a sky and hills, a
 * sun, texture, value-noise foliage and film grain, which compresses like a
 * photo or a generated artwork does (about 2 MB at 1024²).
 */
export function photoLikePng(width: number, height: number, seed: number): Buffer {
  let state = (seed * 2654435761) >>> 0 || 1;
  const next = () => {
    state ^= state << 13;
    state >>>= 0;
    state ^= state >>> 17;
    state ^= state << 5;
    state >>>= 0;
    return state;
  };
  const phase = (next() % 1000) / 159;
  const cell = 3;
  const gw = Math.floor(width / cell) + 2;
  const gh = Math.floor(height / cell) + 2;
  const lattice = Float32Array.from({ length: gw * gh }, () => (next() % 1000) / 1000);
  const at = (i: number, j: number) => lattice[j * gw + i] as number;
  const sun = { x: width * 0.7, y: height * 0.35, r: Math.min(width, height) * 0.08 };
  const raw = Buffer.alloc((width * 3 + 1) * height);
  let o = 0;
  for (let y = 0; y < height; y++) {
    raw[o++] = 0; // filter: none
    const v = y / height;
    for (let x = 0; x < width; x++) {
      const u = x / width;
      const horizon = 0.55 + 0.05 * Math.sin(u * 9 + phase);
      let base: [number, number, number];
      if (v < horizon) {
        const t = v / horizon;
        base = [40 + 200 * t, 90 + 90 * t, 200 - 120 * t];
      } else {
        const t = (v - horizon) / (1 - horizon);
        const hills = Math.sin(u * 23 + phase) * Math.cos(v * 31);
        base = [60 + 50 * t + 30 * hills, 110 - 40 * t + 25 * hills, 50 + 20 * t];
      }
      const dx = x - sun.x;
      const dy = y - sun.y;
      const glow = Math.exp(-(dx * dx + dy * dy) / (2 * sun.r * sun.r));
      const texture = 22 * Math.sin(u * 260) * Math.sin(v * 170 + phase) + 10 * Math.sin((u * 37 + v * 53) * 13);
      const gx = Math.floor(x / cell);
      const gy = Math.floor(y / cell);
      const fx = (x % cell) / cell;
      const fy = (y % cell) / cell;
      const top = at(gx, gy) * (1 - fx) + at(gx + 1, gy) * fx;
      const bottom = at(gx, gy + 1) * (1 - fx) + at(gx + 1, gy + 1) * fx;
      const foliage = (v < horizon ? 10 : 60) * (top * (1 - fy) + bottom * fy - 0.5);
      for (let c = 0; c < 3; c++) {
        const grain = (next() % 9) - 4;
        const value = (base[c] as number) + 180 * glow + texture + foliage + grain;
        raw[o++] = Math.max(0, Math.min(255, Math.round(value)));
      }
    }
  }
  const ihdr = Buffer.alloc(13);
  ihdr.writeUInt32BE(width, 0);
  ihdr.writeUInt32BE(height, 4);
  ihdr[8] = 8; // bit depth
  ihdr[9] = 2; // RGB
  return Buffer.concat([
    Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]),
    chunk("IHDR", ihdr),
    chunk("IDAT", deflateSync(raw, { level: 6 })),
    chunk("IEND", new Uint8Array()),
  ]);
}

/** Width and height of a PNG, WebP or JPEG, read from its header. */
export function imageSize(bytes: Uint8Array): { format: string; width: number; height: number } {
  const b = Buffer.from(bytes);
  if (b.subarray(1, 4).toString("ascii") === "PNG") {
    return { format: "png", width: b.readUInt32BE(16), height: b.readUInt32BE(20) };
  }
  if (b.subarray(0, 4).toString("ascii") === "RIFF" && b.subarray(8, 12).toString("ascii") === "WEBP") {
    const kind = b.subarray(12, 16).toString("ascii");
    if (kind === "VP8X") return { format: "webp", width: b.readUIntLE(24, 3) + 1, height: b.readUIntLE(27, 3) + 1 };
    if (kind === "VP8L") {
      const bits = b.readUInt32LE(21);
      return { format: "webp", width: (bits & 0x3fff) + 1, height: ((bits >> 14) & 0x3fff) + 1 };
    }
    return { format: "webp", width: b.readUInt16LE(26) & 0x3fff, height: b.readUInt16LE(28) & 0x3fff };
  }
  if (b[0] === 0xff && b[1] === 0xd8) {
    let i = 2;
    while (i < b.length) {
      const marker = b[i + 1] as number;
      const length = b.readUInt16BE(i + 2);
      if (marker >= 0xc0 && marker <= 0xc3) {
        return { format: "jpeg", width: b.readUInt16BE(i + 7), height: b.readUInt16BE(i + 5) };
      }
      i += 2 + length;
    }
  }
  throw new Error("not a PNG, WebP or JPEG");
}

// ---- answers against the OpenAPI document ----

type Schema = Record<string, unknown>;
let documentCache: Promise<Schema> | undefined;

/** The running API's OpenAPI document. */
export function openapiDocument(): Promise<Schema> {
  documentCache ??= fetch(`${env.baseUrl}/api/unified/openapi.json`).then((r) => r.json() as Promise<Schema>);
  return documentCache;
}

/**
 * Where `value` breaks the document's schema of `operation`'s answer with
 * `status` (`path` `method`): missing required fields, wrong types, values
 * out of the schema's bounds, and fields the document does not name (the
 * generated types would not know them). Empty when it conforms.
 */
export async function schemaErrors(
  path: string,
  method: string,
  status: number,
  value: unknown,
): Promise<string[]> {
  const doc = await openapiDocument();
  const op = ((doc.paths as Schema)[path] as Schema | undefined)?.[method] as Schema | undefined;
  if (!op) return [`the document has no ${method.toUpperCase()} ${path}`];
  const response = (op.responses as Schema)[String(status)] as Schema | undefined;
  const schema = ((response?.content as Schema | undefined)?.["application/json"] as Schema | undefined)?.schema as
    | Schema
    | undefined;
  if (!schema) return [`the document has no JSON answer ${status} for ${method.toUpperCase()} ${path}`];
  const errors: string[] = [];
  check(doc, schema, value, "$", errors, true);
  return errors;
}

function resolve(doc: Schema, schema: Schema): Schema {
  let s = schema;
  while (typeof s.$ref === "string") {
    const name = s.$ref.replace("#/components/schemas/", "");
    s = ((doc.components as Schema).schemas as Schema)[name] as Schema;
  }
  return s;
}

/** Property names a schema allows (its own and those of allOf parts). */
function declared(doc: Schema, schema: Schema): Set<string> | null {
  const s = resolve(doc, schema);
  if (s.additionalProperties !== undefined && s.additionalProperties !== false) return null;
  const names = new Set(Object.keys((s.properties as Schema | undefined) ?? {}));
  for (const part of (s.allOf as Schema[] | undefined) ?? []) {
    const inner = declared(doc, part);
    if (inner === null) return null;
    for (const n of inner) names.add(n);
  }
  for (const part of [...((s.oneOf as Schema[] | undefined) ?? []), ...((s.anyOf as Schema[] | undefined) ?? [])]) {
    const inner = declared(doc, part);
    if (inner === null) return null;
    for (const n of inner) names.add(n);
  }
  return names;
}

function typeOf(value: unknown): string {
  if (value === null) return "null";
  if (Array.isArray(value)) return "array";
  if (typeof value === "number") return Number.isInteger(value) ? "integer" : "number";
  return typeof value;
}

function check(doc: Schema, raw: Schema, value: unknown, at: string, errors: string[], strict: boolean): void {
  const s = resolve(doc, raw);
  if (s.allOf) for (const part of s.allOf as Schema[]) check(doc, part, value, at, errors, false);
  for (const key of ["oneOf", "anyOf"] as const) {
    const parts = s[key] as Schema[] | undefined;
    if (!parts) continue;
    const passing = parts.filter((p) => {
      const e: string[] = [];
      check(doc, p, value, at, e, false);
      return e.length === 0;
    });
    if (passing.length === 0 || (key === "oneOf" && passing.length > 1)) {
      errors.push(`${at}: ${JSON.stringify(value)?.slice(0, 80)} matches ${passing.length} of ${key}`);
    }
  }
  if (s.type !== undefined) {
    const types = Array.isArray(s.type) ? (s.type as string[]) : [s.type as string];
    const actual = typeOf(value);
    if (!types.includes(actual) && !(actual === "integer" && types.includes("number"))) {
      errors.push(`${at}: ${actual}, the document says ${types.join(" or ")}`);
      return;
    }
  }
  if (s.enum && !(s.enum as unknown[]).includes(value)) errors.push(`${at}: ${String(value)} is not one of ${String(s.enum)}`);
  if (typeof value === "number") {
    if (typeof s.minimum === "number" && value < s.minimum) errors.push(`${at}: ${value} < minimum ${s.minimum}`);
    if (typeof s.maximum === "number" && value > s.maximum) errors.push(`${at}: ${value} > maximum ${s.maximum}`);
  }
  if (typeof value === "string") {
    if (typeof s.pattern === "string" && !new RegExp(s.pattern, "u").test(value)) {
      errors.push(`${at}: ${JSON.stringify(value)} does not match ${s.pattern}`);
    }
    if (typeof s.maxLength === "number" && [...value].length > s.maxLength) errors.push(`${at}: longer than ${s.maxLength}`);
  }
  if (Array.isArray(value) && s.items) {
    value.forEach((item, i) => check(doc, s.items as Schema, item, `${at}[${i}]`, errors, true));
  }
  if (value !== null && typeof value === "object" && !Array.isArray(value)) {
    const object = value as Record<string, unknown>;
    for (const name of (s.required as string[] | undefined) ?? []) {
      if (!(name in object)) errors.push(`${at}.${name}: required, missing`);
    }
    const properties = (s.properties as Record<string, Schema> | undefined) ?? {};
    for (const [name, v] of Object.entries(object)) {
      const p = properties[name];
      if (p) check(doc, p, v, `${at}.${name}`, errors, true);
      else if (s.additionalProperties && typeof s.additionalProperties === "object") {
        check(doc, s.additionalProperties as Schema, v, `${at}.${name}`, errors, true);
      }
    }
    if (strict) {
      const names = declared(doc, raw);
      if (names !== null) {
        for (const name of Object.keys(object)) {
          if (!names.has(name)) errors.push(`${at}.${name}: not in the document`);
        }
      }
    }
  }
}
