//! `penora-ops allowances`: a user's recurring allowances (contract §16),
//! with the ledger's rules (the fields checked by
//! `penora_ledger::allowances::AllowanceRequest`, as `PUT /allowances`
//! checks them), and a summary of how many users have each kind.

use clap::Subcommand;
use penora_config::Ledger;
use penora_domain::timefmt::rfc3339_millis;
use penora_domain::{AppName, PENORA, UserId};
use penora_ledger::allowances::{self, AllowanceRequest};

use crate::output::{self, Align};

#[derive(Subcommand)]
pub enum AllowancesCommand {
    /// List a user's allowances, with when each next grants.
    List {
        /// The user.
        #[arg(long)]
        user: String,
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Set an allowance (made, or changed from its next period); its
    /// current period is granted at once if it has started and is not yet.
    Set {
        /// The user (the account is made if new).
        #[arg(long)]
        user: String,
        /// The allowance's name (1–64 characters of `[A-Za-z0-9_.-]`).
        #[arg(long)]
        id: String,
        /// Credits each period.
        #[arg(long)]
        amount: i64,
        /// `day`, `week` or `month` (UTC calendar).
        #[arg(long)]
        period: String,
        /// `promotional` (the default) or `paid`.
        #[arg(long)]
        category: Option<String>,
        /// At most this many unspent credits carry into the next period (default 0).
        #[arg(long)]
        max_rollover: Option<i64>,
        /// When the first period starts (RFC 3339; default now).
        #[arg(long)]
        starts_at: Option<String>,
        /// The app the grants are written for.
        #[arg(long, default_value = PENORA)]
        app: String,
    },
    /// Delete an allowance: no more grants; the lots granted stay.
    Delete {
        /// The user.
        #[arg(long)]
        user: String,
        /// The allowance.
        #[arg(long)]
        id: String,
    },
    /// How many users (and allowances) have each period and category.
    Summary {
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(
    ledger_settings: &Ledger,
    client: &mut deadpool_postgres::Client,
    command: AllowancesCommand,
) -> anyhow::Result<()> {
    match command {
        AllowancesCommand::List { user, json } => {
            let user = UserId::parse(&user)?;
            let list = allowances::list(&*client, &user).await?;
            if json {
                return output::json(&list);
            }
            let rows: Vec<Vec<String>> = list
                .iter()
                .map(|a| {
                    vec![
                        a.allowance_id.clone(),
                        a.amount.to_string(),
                        a.period.as_str().to_owned(),
                        a.category.as_str().to_owned(),
                        a.max_rollover.to_string(),
                        a.app_name.clone(),
                        output::cell(a.period_start.map(rfc3339_millis)),
                        rfc3339_millis(a.next_grant_at),
                    ]
                })
                .collect();
            output::table(
                &[
                    ("allowance", Align::Left),
                    ("amount", Align::Right),
                    ("period", Align::Left),
                    ("category", Align::Left),
                    ("rollover", Align::Right),
                    ("app", Align::Left),
                    ("period_start", Align::Left),
                    ("next_grant_at", Align::Left),
                ],
                &rows,
            );
            println!("{} allowances", list.len());
        }
        AllowancesCommand::Set {
            user,
            id,
            amount,
            period,
            category,
            max_rollover,
            starts_at,
            app,
        } => {
            let user_id = UserId::parse(&user)?;
            let app_name = AppName::parse("app", &app)?;
            let (amount, max_rollover) = (
                serde_json::Value::from(amount),
                max_rollover.map(serde_json::Value::from),
            );
            let a = AllowanceRequest {
                user_id: &user_id,
                app_name: &app_name,
                allowance_id: Some(&id),
                amount: Some(&amount),
                period: Some(&period),
                category: category.as_deref(),
                max_rollover: max_rollover.as_ref(),
                starts_at: starts_at.as_deref(),
            }
            .validate(ledger_settings.max_deduct_amount)?;
            let r = allowances::set(client, &a, None, None, None).await?;
            let what = match (r.created, r.changed) {
                (true, _) => "made",
                (false, true) => "changed (from its next period)",
                (false, false) => "unchanged",
            };
            println!(
                "allowance {} of {} {what}: {} {} credits a {}, rollover up to {}; next grant {}",
                output::text(&r.allowance.allowance_id),
                r.allowance.user_id,
                r.allowance.amount,
                r.allowance.category.as_str(),
                r.allowance.period.as_str(),
                r.allowance.max_rollover,
                rfc3339_millis(r.allowance.next_grant_at)
            );
            if let Some(g) = r.current_grant {
                let how = if g.replayed {
                    "granted before"
                } else {
                    "granted now"
                };
                println!(
                    "current period {} to {}: lot {} of {} credits ({} carried), {how}",
                    rfc3339_millis(g.period_start),
                    rfc3339_millis(g.period_end),
                    g.lot_id,
                    g.credits_added,
                    g.carried
                );
            }
        }
        AllowancesCommand::Delete { user, id } => {
            let user = UserId::parse(&user)?;
            match allowances::delete(client, &user, &id, None).await? {
                Some(a) => println!(
                    "allowance {} of {} deleted; its lots stay as granted",
                    output::text(&a.allowance_id),
                    a.user_id
                ),
                None => anyhow::bail!("no allowance {} for {user}", output::text(&id)),
            }
        }
        AllowancesCommand::Summary { json } => {
            let rows = allowances::summary(&*client).await?;
            if json {
                return output::json(&rows);
            }
            let cells: Vec<Vec<String>> = rows
                .iter()
                .map(|r| {
                    vec![
                        r.period.as_str().to_owned(),
                        r.category.as_str().to_owned(),
                        r.users.to_string(),
                        r.allowances.to_string(),
                    ]
                })
                .collect();
            output::table(
                &[
                    ("period", Align::Left),
                    ("category", Align::Left),
                    ("users", Align::Right),
                    ("allowances", Align::Right),
                ],
                &cells,
            );
        }
    }
    Ok(())
}
