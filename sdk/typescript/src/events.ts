/**
 * The events Penora sends out (contract §14): as webhook deliveries, and
 * published to the AMQP exchange `penora.events` with the type as routing
 * key. Each is an envelope; `data` depends on `type`.
 */
interface Envelope<T extends string, D> {
  /** `evt_…`, the same on every delivery of the event (and its `webhook-id`): deduplicate on it. */
  id: string;
  type: T;
  /** When the change it reports was committed (RFC 3339, UTC, milliseconds). */
  created_at: string;
  data: D & {
    user_id: string;
    /** The app of the ledger entry (the granting app, the reservation's app, the lot's app). */
    app: string;
  };
}

/** A grant made a lot: `add-credits`, an operator's grant, or a recurring allowance's period. */
export type CreditsGranted = Envelope<
  "credits.granted",
  {
    amount: number;
    balance: number;
    lot_id: number;
    category: "paid" | "promotional";
    /** null: never expires. */
    expires_at: string | null;
    reference: string | null;
    /** Set when the grant is a recurring allowance's period (`amount` includes what rolled over). */
    allowance_id?: string;
  }
>;

/** Credits of a reservation came back (a refund, a `generation.failed` event, the rest of a settlement for less). */
export type CreditsRefunded = Envelope<
  "credits.refunded",
  {
    project_code: string | null;
    amount: number;
    balance: number;
    reason: string | null;
    /** null for a whole refund sent without one. */
    reference: string | null;
  }
>;

/** A reservation ended settled. */
export type ReservationSettled = Envelope<
  "reservation.settled",
  {
    project_code: string;
    /** Credits kept. */
    amount: number;
    /** Credits given back by this settlement (0 if none). */
    returned: number;
    /** `final`: settled by a call or an event; `window`: its refund window passed. */
    settled_by: "final" | "window";
  }
>;

/** Credits expired (the lots' timer, or a movement that met a lot past its expiry). */
export type CreditsExpired = Envelope<
  "credits.expired",
  { amount: number; balance: number; lot_ids: number[] }
>;

/** A lot with credits left expires soon (within `EXPIRY_NOTICE_SECS`); once per lot. */
export type CreditsExpiring = Envelope<
  "credits.expiring",
  {
    lot_id: number;
    /** Credits left in the lot. */
    amount: number;
    category: "paid" | "promotional";
    expires_at: string;
  }
>;

/** Spendable credits went from at or above the user's threshold to below it. */
export type BalanceLow = Envelope<
  "balance.low",
  {
    balance: number;
    threshold: number;
    /** A reference for an automatic top-up: `add-credits` with it grants once, however often it is sent. */
    topup_reference?: string;
  }
>;

/** Spendable credits reached 0. */
export type BalanceDepleted = Envelope<"balance.depleted", { balance: number }>;

/** The worker finished a queued save. */
export type ProjectSaved = Envelope<
  "project.saved",
  { project_id: string; project_code: string | null; title: string; size: number }
>;

/** The worker failed a queued save for good (its bytes are released). */
export type ProjectFailed = Envelope<
  "project.failed",
  { project_id: string; project_code: string | null; reason: string }
>;

/** A project was deleted. */
export type ProjectDeleted = Envelope<
  "project.deleted",
  { project_id: string; reason: "deleted" | "evicted" | "retention" | "operator" }
>;

/** Sent by `POST /webhooks/{id}/test` to that endpoint only. */
export interface WebhookTest {
  id: string;
  type: "webhook.test";
  created_at: string;
  data: { user_id: string; endpoint_id: string };
}

/** Every event Penora sends; narrow it on `type`. */
export type PenoraEvent =
  | CreditsGranted
  | CreditsRefunded
  | ReservationSettled
  | CreditsExpired
  | CreditsExpiring
  | BalanceLow
  | BalanceDepleted
  | ProjectSaved
  | ProjectFailed
  | ProjectDeleted
  | WebhookTest;

/** The `type` of every event. */
export type PenoraEventType = PenoraEvent["type"];

/** Every event type, as `POST /webhooks` takes them in `events`. */
export const EVENT_TYPES: readonly PenoraEventType[] = [
  "credits.granted",
  "credits.refunded",
  "reservation.settled",
  "credits.expired",
  "credits.expiring",
  "balance.low",
  "balance.depleted",
  "project.saved",
  "project.failed",
  "project.deleted",
  "webhook.test",
] as const;
