//! `penora-ops limits`: one user's spend limits with their spending (list),
//! set and delete them as `PUT`/`DELETE /limits` do (the same ledger
//! functions, the same lock), and a summary of how many users have each
//! kind.

use clap::Subcommand;
use deadpool_postgres::Client;
use penora_domain::{AppName, UserId, period::Period, timefmt::rfc3339_millis};
use penora_ledger::limits::{self, Limit, LimitView, Scope};

use crate::output::{self, Align};

#[derive(Subcommand)]
pub enum LimitsCommand {
    /// A user's limits, each with what was spent in its period.
    List {
        /// The user.
        user_id: String,
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Set a user's limit of one app (or all apps) and period.
    Set {
        /// The user (the account must exist).
        user_id: String,
        /// `day`, `week` or `month` (UTC calendar periods).
        #[arg(long)]
        period: String,
        /// Most credits spendable per period (0 stops spending).
        #[arg(long)]
        max_credits: i64,
        /// The app it holds; absent: every app.
        #[arg(long)]
        app: Option<String>,
    },
    /// Remove a user's limit of one app (or all apps) and period.
    Delete {
        /// The user.
        user_id: String,
        /// `day`, `week` or `month`.
        #[arg(long)]
        period: String,
        /// The app of the limit; absent: the all-apps one.
        #[arg(long)]
        app: Option<String>,
    },
    /// How many limits there are by period and scope, and how many users
    /// have one.
    Summary {
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
}

fn scope(app: Option<&str>) -> anyhow::Result<Scope> {
    Ok(Scope::of(
        app.map(|a| AppName::parse("app", a)).transpose()?,
    ))
}

fn print(views: &[LimitView]) {
    let rows: Vec<Vec<String>> = views
        .iter()
        .map(|v| {
            vec![
                output::text(v.app_name.as_deref().unwrap_or("*")),
                v.period.to_string(),
                v.max_credits.to_string(),
                v.spent.to_string(),
                v.remaining.to_string(),
                rfc3339_millis(v.resets_at),
            ]
        })
        .collect();
    output::table(
        &[
            ("APP", Align::Left),
            ("PERIOD", Align::Left),
            ("MAX", Align::Right),
            ("SPENT", Align::Right),
            ("REMAINING", Align::Right),
            ("RESETS AT", Align::Left),
        ],
        &rows,
    );
}

pub async fn run(client: &mut Client, command: LimitsCommand) -> anyhow::Result<()> {
    match command {
        LimitsCommand::List { user_id, json } => {
            let user = UserId::parse(&user_id)?;
            let views = limits::limits_of(&*client, &user).await?;
            if json {
                return output::json(&views);
            }
            print(&views);
        }
        LimitsCommand::Set {
            user_id,
            period,
            max_credits,
            app,
        } => {
            let user = UserId::parse(&user_id)?;
            let limit = Limit {
                scope: scope(app.as_deref())?,
                period: Period::parse(&period)?,
                max_credits,
            };
            print(&limits::set_limit(client, &user, &limit).await?);
        }
        LimitsCommand::Delete {
            user_id,
            period,
            app,
        } => {
            let user = UserId::parse(&user_id)?;
            let views = limits::delete_limit(
                client,
                &user,
                &scope(app.as_deref())?,
                Period::parse(&period)?,
            )
            .await?;
            print(&views);
        }
        LimitsCommand::Summary { json } => {
            let (kinds, users) = penora_ledger::tables::limits::summary(&*client).await?;
            if json {
                let kinds: Vec<serde_json::Value> = kinds
                    .iter()
                    .map(|(period, scope, n)| serde_json::json!({"period": period, "scope": scope, "limits": n}))
                    .collect();
                return output::json(
                    &serde_json::json!({"users_with_limits": users, "limits": kinds}),
                );
            }
            let rows: Vec<Vec<String>> = kinds
                .iter()
                .map(|(period, scope, n)| vec![period.clone(), scope.clone(), n.to_string()])
                .collect();
            output::table(
                &[
                    ("PERIOD", Align::Left),
                    ("SCOPE", Align::Left),
                    ("LIMITS", Align::Right),
                ],
                &rows,
            );
            println!("{users} user(s) with a limit");
        }
    }
    Ok(())
}
