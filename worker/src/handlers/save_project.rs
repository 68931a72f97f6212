//! `penora.save-project`: the stored content is checked (a full decode, on
//! the image threads) and its thumbnail made, the project marked `saved` (or
//! `failed`, releasing its bytes), then the reservation it names is settled.
//! A project deleted before its job ran is left deleted.

use penora_domain::messages::SaveProjectJob;
use penora_domain::{AppName, ProjectCode, UserId};
use penora_ledger as ledger;
use penora_ledger::{LedgerError, SettledBy};
use penora_store::DbError;
use penora_workspace::cpu_pool::PoolError;
use penora_workspace::imaging;
use penora_workspace::projects::{self, Finished, Pending};

use super::JobResult;
use crate::{Context, message::Message, retry::JobError};

pub async fn handle(ctx: &Context, m: &Message) -> JobResult {
    // Parse.
    let job: SaveProjectJob = m.decode()?;
    let not_found = || {
        JobError::Fatal(format!(
            "no project {} for user {}",
            job.project_id, job.user_id
        ))
    };
    let mut client = ctx.pool.get().await.map_err(DbError::from)?;
    // Decide: is the content a picture we can serve?
    let verdict = match projects::pending(&client, &job.user_id, job.project_id).await? {
        Pending::NotFound => return Err(not_found()),
        // Done before or deleted: finish_save below says which.
        Pending::Done | Pending::Queued(None) => Ok(None),
        Pending::Empty => Err("the project has no content".to_owned()),
        Pending::Queued(Some(bytes)) => {
            let max_pixels = ctx.settings.images.max_pixels;
            match ctx
                .images
                .run(move || imaging::thumbnail(&bytes, max_pixels))
                .await
            {
                Ok(checked) => checked.map(Some),
                // A decoder that panics on these bytes would panic again:
                // the project fails for good and frees its bytes.
                Err(PoolError::Panicked) => Err("the image could not be processed".to_owned()),
                Err(e @ PoolError::Stopped) => return Err(JobError::Retryable(e.to_string())),
            }
        }
    };
    // Commit: the project's status, then the reservation it names.
    let finished =
        projects::finish_save(&mut client, &job.user_id, job.project_id, verdict).await?;
    let (outcome, settle) = match finished {
        Finished::NotFound => return Err(not_found()),
        Finished::Failed(reason) => return Ok(format!("failed: {reason}")),
        Finished::Saved {
            app_source,
            project_code,
        } => ("saved".to_owned(), project_code.map(|c| (app_source, c))),
        Finished::AlreadyDone {
            status,
            app_source,
            project_code,
        } => {
            let settle = (status == "saved")
                .then_some(project_code.map(|c| (app_source, c)))
                .flatten();
            (format!("already {status}"), settle)
        }
    };
    if let Some((app, code)) = settle {
        let (Ok(user), Ok(app), Ok(code)) = (
            UserId::parse(&job.user_id),
            AppName::parse("app_source", &app),
            ProjectCode::parse(&code),
        ) else {
            return Ok(outcome);
        };
        match ledger::settle(
            &mut client,
            &user,
            &app,
            &code,
            (SettledBy::Final, "project saved"),
            m.correlation_id.as_deref(),
            None,
        )
        .await
        {
            Ok(_) | Err(LedgerError::NotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(outcome)
}
