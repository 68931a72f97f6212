import { randomUUID } from "node:crypto";

import type { ChannelModel, ConfirmChannel } from "amqplib";

/** What ImageGene reports about a generation it started after a deduction. */
export interface GenerationEvent {
  /** `generation.failed` gives the reservation's credits back; `generation.succeeded` settles it. */
  type: "generation.failed" | "generation.succeeded";
  userId: string;
  /** The deduction's `project_code`. */
  projectCode: string;
  /** Why it failed (shown in the user's ledger). */
  reason?: string;
  /** When it happened (default: now). Penora judges the refund window at this time, within bounds. */
  occurredAt?: Date | string;
  /**
   * Part of it: on `generation.failed` the credits to give back (a partial
   * refund), on `generation.succeeded` the credits to charge (the rest is
   * given back). Absent: all of it.
   */
  amount?: number;
  /** The event's id, which makes it idempotent (default: `evt_` and a new UUID). Reuse it to resend the same event. */
  eventId?: string;
}

export interface PublishOptions {
  /** The exchange ImageGene publishes to (default `imagegene.events`). */
  exchange?: string;
  /** `AMQP_PREFIX` of the Penora deployment, put in front of the exchange's name (default none). */
  prefix?: string;
}

/** What was published. */
export interface Published {
  eventId: string;
  /** The message's body, as sent. */
  body: Record<string, unknown>;
}

/** The message body Penora's worker reads (`docs/pipeline.md`). */
function messageBody(event: GenerationEvent, eventId: string): Record<string, unknown> {
  if (event.type !== "generation.failed" && event.type !== "generation.succeeded") {
    throw new TypeError(`type: must be generation.failed or generation.succeeded, not ${String(event.type)}`);
  }
  if (!event.userId) throw new TypeError("userId: is required");
  if (!event.projectCode) throw new TypeError("projectCode: is required");
  if (event.amount !== undefined && !(Number.isSafeInteger(event.amount) && event.amount >= 1)) {
    throw new TypeError("amount: must be a whole number of credits, 1 or more");
  }
  const at = event.occurredAt === undefined ? new Date() : new Date(event.occurredAt);
  if (Number.isNaN(at.getTime())) throw new TypeError("occurredAt: is not a date");
  const body: Record<string, unknown> = {
    event_id: eventId,
    user_id: event.userId,
    project_code: event.projectCode,
    occurred_at: at.toISOString(),
  };
  if (event.reason !== undefined) body.reason = event.reason;
  if (event.amount !== undefined) body.amount = event.amount;
  return body;
}

type Amqplib = typeof import("amqplib");

async function loadAmqplib(): Promise<Amqplib> {
  try {
    const module = (await import("amqplib")) as Amqplib & { default?: Amqplib };
    return module.default ?? module;
  } catch (cause) {
    throw new Error("Publishing generation events needs the amqplib package: npm install amqplib", {
      cause,
    });
  }
}

/**
 * A connection that publishes ImageGene's generation events to Penora, each
 * persistent and mandatory, waiting for the broker's confirm: when
 * `publish` resolves, the event is safely queued for Penora's worker; when
 * it rejects, it may not be, and publishing it again with the same
 * `eventId` is safe (Penora handles each event id once).
 *
 * Keep one per process; {@link publishGenerationEvent} opens one for a
 * single event.
 */
export class GenerationEventPublisher {
  private constructor(
    private readonly connection: ChannelModel,
    private readonly channel: ConfirmChannel,
    private readonly exchange: string,
  ) {}

  /** Connects to `amqpUrl` (`amqp://user:password@host:5672/vhost`). */
  static async connect(amqpUrl: string, options: PublishOptions = {}): Promise<GenerationEventPublisher> {
    const amqp = await loadAmqplib();
    const connection = await amqp.connect(amqpUrl);
    try {
      const channel = await connection.createConfirmChannel();
      // A channel error (an exchange that does not exist) is reported by the
      // failed publish; without a listener it would also be thrown.
      channel.on("error", () => {});
      connection.on("error", () => {});
      const exchange = `${options.prefix ?? ""}${options.exchange ?? "imagegene.events"}`;
      return new GenerationEventPublisher(connection, channel, exchange);
    } catch (error) {
      await connection.close().catch(() => {});
      throw error;
    }
  }

  /** Publishes `event` and waits until the broker has it. */
  async publish(event: GenerationEvent): Promise<Published> {
    const eventId = event.eventId ?? `evt_${randomUUID().replaceAll("-", "")}`;
    const body = messageBody(event, eventId);
    let returned = false;
    const onReturn = (message: { properties: { messageId?: string } }) => {
      if (message.properties.messageId === eventId) returned = true;
    };
    this.channel.on("return", onReturn);
    try {
      await new Promise<void>((resolve, reject) => {
        this.channel.publish(
          this.exchange,
          event.type,
          Buffer.from(JSON.stringify(body)),
          {
            persistent: true,
            mandatory: true,
            contentType: "application/json",
            messageId: eventId,
            timestamp: Math.floor(Date.now() / 1000),
          },
          (error: unknown) => (error ? reject(error instanceof Error ? error : new Error(`The broker refused the event (nack): ${String(error)}`)) : resolve()),
        );
      });
    } finally {
      this.channel.off("return", onReturn);
    }
    if (returned) {
      throw new Error(
        `No queue takes ${event.type} on exchange ${this.exchange}: is Penora's worker running against this broker?`,
      );
    }
    return { eventId, body };
  }

  /** Closes the channel and the connection. */
  async close(): Promise<void> {
    await this.channel.close().catch(() => {});
    await this.connection.close().catch(() => {});
  }
}

/**
 * Publishes one generation event over a connection of its own, waiting for
 * the broker's confirm (see {@link GenerationEventPublisher}).
 *
 * ```ts
 * await publishGenerationEvent(process.env.AMQP_URL!, {
 *   type: "generation.failed", userId, projectCode, reason: "GPU out of memory",
 * });
 * ```
 */
export async function publishGenerationEvent(
  amqpUrl: string,
  event: GenerationEvent,
  options: PublishOptions = {},
): Promise<Published> {
  const publisher = await GenerationEventPublisher.connect(amqpUrl, options);
  try {
    return await publisher.publish(event);
  } finally {
    await publisher.close();
  }
}
