//! `penora-ops credits`: grants, with the ledger's rules (a grant's fields
//! checked by `penora_ledger::grant_rules`, as `add-credits` checks them;
//! once per reference; a repeat moves nothing and says so), and a user's
//! lots.

use crate::output;
use clap::Subcommand;
use penora_config::Ledger;
use penora_domain::timefmt::rfc3339_millis;
use penora_domain::{AppName, PENORA, UserId};
use penora_ledger as ledger;
use penora_ledger::grant_rules::GrantRequest;
use time::OffsetDateTime;

#[derive(Subcommand)]
pub enum CreditsCommand {
    /// Grant AMOUNT credits to USER, once per REFERENCE: one lot.
    Grant {
        /// The user.
        user: String,
        /// Whole credits.
        amount: i64,
        /// Why (a purchase, a bonus).
        #[arg(long)]
        reason: String,
        /// Idempotency reference (e.g. the payment id).
        #[arg(long)]
        reference: String,
        /// The app granting.
        #[arg(long, default_value = PENORA)]
        app: String,
        /// `paid` (the default) or `promotional`.
        #[arg(long)]
        category: Option<String>,
        /// 0–100, lower spent first (default 10 for promotional, 50 for paid).
        #[arg(long)]
        priority: Option<i64>,
        /// When the credits expire (RFC 3339, in the future); never when absent.
        #[arg(long)]
        expires_at: Option<String>,
    },
    /// List USER's lots, newest first.
    Lots {
        /// The user.
        user: String,
        /// Only lots in this status: active, depleted, expired or voided.
        #[arg(long)]
        status: Option<String>,
    },
    /// Void lot LOT_ID of USER: its remaining credits are removed.
    Void {
        /// The user.
        user: String,
        /// The lot.
        lot_id: i64,
        /// Why.
        #[arg(long)]
        reason: String,
    },
}

pub async fn run(
    ledger_settings: &Ledger,
    client: &mut deadpool_postgres::Client,
    command: CreditsCommand,
) -> anyhow::Result<()> {
    match command {
        CreditsCommand::Grant {
            user,
            amount,
            reason,
            reference,
            app,
            category,
            priority,
            expires_at,
        } => {
            let user_id = UserId::parse(&user)?;
            let app_name = AppName::parse("app", &app)?;
            let (amount, priority) = (
                serde_json::Value::from(amount),
                priority.map(serde_json::Value::from),
            );
            let grant = GrantRequest {
                user_id: &user_id,
                app_name: &app_name,
                amount: Some(&amount),
                reason: Some(&reason),
                reference: Some(&reference),
                category: category.as_deref(),
                priority: priority.as_ref(),
                expires_at: expires_at.as_deref(),
            }
            .validate(ledger_settings.max_deduct_amount, OffsetDateTime::now_utc())?;
            let outcome = ledger::grant(client, &grant, None).await?;
            let r = outcome.value;
            let replay = if outcome.replayed {
                " (already granted: nothing moved)"
            } else {
                ""
            };
            let expiry = r
                .expires_at
                .map(|at| format!(", expires {}", rfc3339_millis(at)))
                .unwrap_or_default();
            println!(
                "granted {} {} credits to {} (reference {}, lot {}, priority {}{expiry}); balance {}{replay}",
                r.credits_added,
                r.category.as_str(),
                r.user_id,
                output::text(&r.reference),
                r.lot_id,
                r.priority,
                r.new_balance
            );
        }
        CreditsCommand::Lots { user, status } => {
            let user = UserId::parse(&user)?;
            if let Some(s) = status.as_deref() {
                anyhow::ensure!(
                    ledger::LOT_STATUSES.contains(&s),
                    "--status must be active, depleted, expired or voided"
                );
            }
            let lots = ledger::lots(&*client, &user, status.as_deref(), i64::MAX, None).await?;
            println!(
                "{:>8}  {:<11}  {:>3}  {:>10}  {:>10}  {:<24}  {:<8}  reference",
                "lot", "category", "pri", "granted", "remaining", "expires_at", "status"
            );
            for l in &lots {
                println!(
                    "{:>8}  {:<11}  {:>3}  {:>10}  {:>10}  {:<24}  {:<8}  {}",
                    l.lot_id,
                    l.category,
                    l.priority,
                    l.granted,
                    l.remaining,
                    l.expires_at
                        .map(rfc3339_millis)
                        .unwrap_or_else(|| "never".into()),
                    l.status,
                    output::text(l.reference.as_deref().unwrap_or("(balance before lots)"))
                );
            }
            println!("{} lots", lots.len());
        }
        CreditsCommand::Void {
            user,
            lot_id,
            reason,
        } => {
            let user = UserId::parse(&user)?;
            let outcome = ledger::void_lot(client, &user, lot_id, (&reason, None), None).await?;
            let r = outcome.value;
            let replay = if outcome.replayed {
                " (nothing moved)"
            } else {
                ""
            };
            println!(
                "lot {} of {} is {}: {} credits voided; spendable balance {}{replay}",
                r.lot_id, r.user_id, r.status, r.credits_voided, r.new_balance
            );
        }
    }
    Ok(())
}
