//! The raw baselines: the work of each service operation done straight
//! against PostgreSQL (hand-written transactions, prepared statements, one
//! transaction per operation) or RabbitMQ (publish with confirms, consume
//! with acks), with none of the service around it.

use std::time::{Duration, Instant};

use anyhow::bail;
use deadpool_postgres::Pool;
use futures_util::StreamExt;
use lapin::{
    BasicProperties,
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions,
        QueueDeclareOptions, QueueDeleteOptions,
    },
    types::FieldTable,
};
use serde_json::json;

use crate::{
    measure::{Stats, run_tag},
    services::Services,
};

/// The raw baseline of a deduction: a hand-written transaction doing the same
/// work as the service (a guarded debit, one reservation, one ledger row, one
/// outbox row, and the lot it draws from: its guarded update in burn-down
/// order and its movement row), one statement each.
pub const RAW_DEBIT_SQL: &str = "UPDATE accounts SET balance = balance - $2, updated_at = now() \
     WHERE user_id = $1 AND balance >= $2 RETURNING balance";

pub const RAW_CLAIM_SQL: &str = "INSERT INTO reservations \
       (app_name, project_code, user_id, amount, description, balance_after_deduct, refundable_until) \
     VALUES ($1, $2, $3, $4, $5, $6, now() + make_interval(secs => $7)) \
     ON CONFLICT (user_id, app_name, project_code) DO NOTHING \
     RETURNING created_at, refundable_until";

pub const RAW_ENTRY_SQL: &str = "INSERT INTO ledger_entries \
       (user_id, kind, amount, balance_after, app_name, description, project_code, reference) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING id, created_at";

/// Draws `$2` credits from the user's first spendable lot in burn-down order.
pub const RAW_DRAW_SQL: &str = "UPDATE credit_lots l SET remaining = l.remaining - $2 \
     FROM (SELECT lot_id FROM credit_lots WHERE user_id = $1 AND status = 'active' AND remaining >= $2 \
             AND (expires_at IS NULL OR expires_at > now()) \
           ORDER BY priority, expires_at NULLS LAST, (category = 'paid'), created_at, lot_id LIMIT 1) s \
     WHERE l.user_id = $1 AND l.lot_id = s.lot_id RETURNING l.lot_id";

/// The deduction's movement of that lot.
pub const RAW_MOVE_SQL: &str = "INSERT INTO lot_movements \
       (user_id, lot_id, entry_id, kind, amount, app_name, project_code) \
     VALUES ($1, $2, $3, 'deduct', $4, $5, $6)";

/// One raw deduction (see [`RAW_DEBIT_SQL`]).
pub async fn raw_deduct(pool: &Pool, user: &str, code: &str) -> bool {
    let Ok(mut client) = pool.get().await else {
        return false;
    };
    let result: Result<bool, tokio_postgres::Error> = async {
        let tx = client.transaction().await?;
        let debit = tx
            .prepare_cached(RAW_DEBIT_SQL)
            .await?;
        let Some(row) = tx.query_opt(&debit, &[&user, &1i64]).await? else { return Ok(false) };
        let balance: i64 = row.get(0);
        let draw = tx.prepare_cached(RAW_DRAW_SQL).await?;
        let Some(lot) = tx.query_opt(&draw, &[&user, &1i64]).await? else { return Ok(false) };
        let lot_id: i64 = lot.get(0);
        let claim = tx
            .prepare_cached(RAW_CLAIM_SQL)
            .await?;
        let desc: Option<&str> = None;
        if tx
            .query_opt(&claim, &[&"benchraw", &code, &user, &1i64, &desc, &balance, &3600f64])
            .await?
            .is_none()
        {
            return Ok(false);
        }
        let entry = tx
            .prepare_cached(RAW_ENTRY_SQL)
            .await?;
            let reference: Option<&str> = None;
        let id: i64 = tx
            .query_one(&entry, &[&user, &"deduct", &-1i64, &balance, &"benchraw", &desc, &code, &reference])
            .await?
            .get(0);
        let movement = tx.prepare_cached(RAW_MOVE_SQL).await?;
        tx.execute(&movement, &[&user, &lot_id, &id, &-1i64, &"benchraw", &code]).await?;
        let outbox = tx
            .prepare_cached(penora_store::outbox::INSERT_SQL)
            .await?;
        let payload = json!({"entry_id": id, "user_id": user, "kind": "deduct", "amount": -1, "balance_after": balance});
        let corr: Option<&str> = None;
        tx.execute(
            &outbox,
            &[&user, &"penora.jobs", &"penora.ledger-audit", &uuid::Uuid::now_v7(), &corr, &payload],
        )
        .await?;
        tx.commit().await?;
        Ok(true)
    }
    .await;
    result.unwrap_or(false)
}

/// The raw minimal deduction: the least a service could do and still keep a
/// user's money right, a guarded debit and one ledger row (what a pgbench
/// script of a deduction would run). It runs on accounts of its own
/// (`benchmin_*`, without lots), so the service's users keep balances equal
/// to their lots.
pub const RAW_MINIMAL_ENTRY_SQL: &str = "INSERT INTO ledger_entries \
       (user_id, kind, amount, balance_after, app_name, description, project_code) \
     VALUES ($1, 'deduct', $2, $3, 'benchmin', 'benchmark minimal', $4)";

/// One raw minimal deduction (see [`RAW_MINIMAL_ENTRY_SQL`]).
pub async fn raw_minimal_deduct(pool: &Pool, user: &str, code: &str) -> bool {
    let Ok(mut client) = pool.get().await else {
        return false;
    };
    let result: Result<bool, tokio_postgres::Error> = async {
        let tx = client.transaction().await?;
        let debit = tx.prepare_cached(RAW_DEBIT_SQL).await?;
        let Some(row) = tx.query_opt(&debit, &[&user, &1i64]).await? else {
            return Ok(false);
        };
        let balance: i64 = row.get(0);
        let entry = tx.prepare_cached(RAW_MINIMAL_ENTRY_SQL).await?;
        tx.execute(&entry, &[&user, &-1i64, &balance, &code])
            .await?;
        tx.commit().await?;
        Ok(true)
    }
    .await;
    result.unwrap_or(false)
}

/// The statements of `user-info`: the ledger's part
/// (`ledger::account_summary`) and the workspace's (`projects::usage`), sent
/// together on one connection, as the API does.
pub async fn raw_user_info(pool: &Pool, user: &str) -> bool {
    let Ok(client) = pool.get().await else {
        return false;
    };
    let statements = tokio::try_join!(
        client.prepare_cached(&penora_ledger::ACCOUNT_SUMMARY_SQL),
        client.prepare_cached(&penora_workspace::projects::USAGE_SQL),
    );
    let Ok((credits, workspace)) = statements else {
        return false;
    };
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&user];
    tokio::try_join!(
        client.query_opt(&credits, &params),
        client.query_opt(&workspace, &params),
    )
    .is_ok_and(|(credits, workspace)| credits.is_some() && workspace.is_some())
}

/// The statements of `projects::save` (quota update, project, content, outbox).
pub async fn raw_save(pool: &Pool, user: &str, data: &[u8]) -> bool {
    let Ok(mut client) = pool.get().await else {
        return false;
    };
    let result: Result<bool, tokio_postgres::Error> = async {
        let tx = client.transaction().await?;
        let size = data.len() as i64;
        // The title `bench` counts its 5 bytes, as `projects::meta_bytes` says.
        let meta = penora_workspace::projects::meta_bytes("bench", &json!({}));
        let counted = size + meta;
        let reserve = tx
            .prepare_cached(penora_workspace::projects::RESERVE_STORAGE_SQL)
            .await?;
        if tx.query_opt(&reserve, &[&user, &counted, &1_048_576i64]).await?.is_none() {
            return Ok(false);
        }
        let id = uuid::Uuid::now_v7();
        let code: Option<&str> = None;
        let insert = tx
            .prepare_cached(penora_workspace::projects::INSERT_PROJECT_SQL)
            .await?;
        tx.query_opt(&insert, &[&user, &id, &"benchraw", &"ai_artwork", &"bench", &size, &json!({}), &code, &size, &meta])
            .await?;
        let content = tx
            .prepare_cached(penora_workspace::projects::INSERT_CONTENT_SQL)
            .await?;
        let url: Option<&str> = None;
        let info = penora_workspace::imaging::probe(data).ok();
        let etag = penora_workspace::projects::etag_of(data);
        tx.execute(
            &content,
            &[
                &user,
                &id,
                &data,
                &url,
                &info.map(|i| i.media_type),
                &info.map(|i| i.width as i32),
                &info.map(|i| i.height as i32),
                &etag,
            ],
        )
        .await?;
        let outbox = tx
            .prepare_cached(penora_store::outbox::INSERT_SQL)
            .await?;
        let corr: Option<&str> = None;
        let payload = json!({"user_id": user, "project_id": id, "app_source": "benchraw", "project_code": null});
        tx.execute(&outbox, &[&user, &"penora.jobs", &"penora.save-project", &uuid::Uuid::now_v7(), &corr, &payload])
            .await?;
        tx.commit().await?;
        Ok(true)
    }
    .await;
    result.unwrap_or(false)
}

/// Raw RabbitMQ: N messages of the events' size published with confirms to a
/// queue of our own and consumed with acks.
pub async fn raw_broker(services: &Services, n: usize) -> anyhow::Result<Stats> {
    let conn = penora_platform::broker::connect(&services.amqp_url, "penora-bench-raw").await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let queue = format!("{}bench-raw-{}", services.prefix, run_tag());
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        lapin::types::AMQPValue::LongString("quorum".into()),
    );
    ch.queue_declare(
        queue.clone().into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await?;
    let body = json!({"event_id": "ev0000000000_0000", "user_id": "bench_12345", "project_code": "rf000000000_0000",
                      "reason": "bench", "occurred_at": "2026-11-24T06:00:00.000Z"})
    .to_string();
    let consumer_ch = conn.create_channel().await?;
    consumer_ch.basic_qos(64, Default::default()).await?;
    let mut consumer = consumer_ch
        .basic_consume(
            queue.clone().into(),
            "bench".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let started = Instant::now();
    let mut confirms = Vec::with_capacity(n);
    for _ in 0..n {
        confirms.push(
            ch.basic_publish(
                "".into(),
                queue.clone().into(),
                BasicPublishOptions::default(),
                body.as_bytes(),
                BasicProperties::default().with_delivery_mode(2),
            )
            .await?,
        );
    }
    for c in confirms {
        c.await?;
    }
    let mut got = 0;
    while got < n {
        match tokio::time::timeout(Duration::from_secs(30), consumer.next()).await {
            Ok(Some(Ok(d))) => {
                d.ack(BasicAckOptions::default()).await?;
                got += 1;
            }
            _ => bail!("raw consumer stalled at {got} of {n}"),
        }
    }
    let elapsed = started.elapsed();
    let _ = ch
        .queue_delete(queue.into(), QueueDeleteOptions::default())
        .await;
    let _ = conn.close(200, "bye".into()).await;
    Ok(Stats {
        ops: n as u64,
        per_sec: n as f64 / elapsed.as_secs_f64(),
        ..Stats::default()
    })
}
