//! `penora-ops projects`: an operator deletes a project; its content goes and
//! its bytes are freed in one transaction, logged as `operator`.

use clap::Subcommand;
use penora_domain::UserId;
use penora_workspace::projects::{self, Cause};

#[derive(Subcommand)]
pub enum ProjectsCommand {
    /// Delete USER's project PROJECT_ID: its content goes and its bytes are
    /// freed in one transaction (logged in project_log as `operator`).
    Delete {
        /// The user.
        user: String,
        /// The project's id.
        project_id: uuid::Uuid,
    },
}

pub async fn run(
    client: &mut deadpool_postgres::Client,
    command: ProjectsCommand,
) -> anyhow::Result<()> {
    let ProjectsCommand::Delete { user, project_id } = command;
    let user = UserId::parse(&user)?;
    let deleted = projects::delete(
        client,
        user.as_str(),
        project_id,
        None,
        Cause::Operator,
        Some("penora-ops"),
    )
    .await?;
    println!(
        "deleted project {project_id} of {user}: {} bytes freed; {} bytes in use",
        deleted.freed_bytes, deleted.storage_used_bytes
    );
    Ok(())
}
