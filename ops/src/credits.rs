//! `penora-ops credits`: grants, with the ledger's rules (once per
//! reference; a repeat moves nothing and says so).

use clap::Subcommand;
use penora_common::{
    config::Settings,
    domain::{AppName, Credits, GrantReason, PENORA, Reference, UserId},
    ledger,
};

#[derive(Subcommand)]
pub enum CreditsCommand {
    /// Grant AMOUNT credits to USER, once per REFERENCE.
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
    },
}

pub async fn run(
    settings: &Settings,
    client: &mut deadpool_postgres::Client,
    command: CreditsCommand,
) -> anyhow::Result<()> {
    let CreditsCommand::Grant {
        user,
        amount,
        reason,
        reference,
        app,
    } = command;
    let grant = ledger::Grant {
        user_id: UserId::parse(&user)?,
        amount: Credits::new("amount", amount, settings.max_deduct_amount)?,
        app_name: AppName::parse("app", &app)?,
        reason: GrantReason::parse("reason", Some(&reason))?,
        reference: Reference::parse("reference", Some(&reference))?,
    };
    let outcome = ledger::grant(client, &grant, None).await?;
    let r = outcome.value;
    let replay = if outcome.replayed {
        " (already granted: nothing moved)"
    } else {
        ""
    };
    println!(
        "granted {} credits to {} (reference {}); balance {}{replay}",
        r.credits_added, r.user_id, r.reference, r.new_balance
    );
    Ok(())
}
