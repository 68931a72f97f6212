//! Tests against the cluster that `scripts/cluster.sh up` starts (3 RabbitMQ
//! nodes, a PostgreSQL primary with a synchronous standby, 2 APIs and 2
//! workers). `scripts/cluster.sh chaos` runs them; `scripts/test.sh` leaves
//! them out, since they need the cluster. Without one they fail and say how
//! to start it.
//!
//! Each test works on names of its own: a queue prefix for the broker test,
//! users of its own for the failover test (the APIs serve the cluster's one
//! database).

use std::{
    collections::{BTreeMap, HashSet},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use lapin::{
    BasicProperties,
    options::{BasicAckOptions, BasicGetOptions},
};
use penora_config::Broker;
use penora_domain::messages::{JOBS_EXCHANGE, SAVE_PROJECT};
use penora_platform::broker::{self, Outgoing, Publisher, Topology};

/// The running cluster: its environment file and its script.
struct Cluster {
    env: BTreeMap<String, String>,
}

impl Cluster {
    fn find() -> Self {
        let dir =
            std::env::var("PENORA_CLUSTER_DIR").unwrap_or_else(|_| "/tmp/penora-cluster".into());
        let Ok(text) = std::fs::read_to_string(format!("{dir}/env")) else {
            panic!(
                "no cluster in {dir}: these tests need the cluster of scripts/cluster.sh; \
                 start it with `scripts/cluster.sh up` (or run `scripts/cluster.sh chaos`, which runs them)"
            );
        };
        let env = text
            .lines()
            .filter_map(|l| l.strip_prefix("export "))
            .flat_map(str::split_whitespace)
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.trim_matches('\'').to_owned()))
            .collect();
        Self { env }
    }

    fn var(&self, name: &str) -> String {
        self.env.get(name).cloned().unwrap_or_default()
    }

    /// `scripts/cluster.sh fault ARGS…`, its output.
    fn fault(&self, args: &[&str]) -> String {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/cluster.sh");
        let out = std::process::Command::new(script)
            .arg("fault")
            .args(args)
            .output()
            .expect("run scripts/cluster.sh");
        assert!(
            out.status.success(),
            "scripts/cluster.sh fault {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    fn apis(&self) -> Vec<String> {
        vec![
            "http://127.0.0.1:5801".into(),
            "http://127.0.0.1:5802".into(),
        ]
    }
}

fn unique(what: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{what}{}_{}", nanos % 1_000_000_000, std::process::id())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_confirmed_just_before_a_rabbitmq_node_dies_is_consumed_after_it() {
    let cluster = Cluster::find();
    let prefix = unique("clustertest");
    let amqp_url = cluster.var("AMQP_URL");
    assert!(
        broker::nodes(&amqp_url).len() == 3,
        "AMQP_URL names the cluster's 3 nodes"
    );
    let settings = Broker::from_lookup(|k| match k {
        "AMQP_URL" => Some(amqp_url.clone()),
        "AMQP_PREFIX" => Some(format!("{prefix}_")),
        "AMQP_QUEUE_TYPE" => Some("quorum".into()),
        _ => None,
    })
    .expect("settings");
    let topology = Topology::from_settings(&settings);
    let publisher = Publisher::new(settings.url.clone(), "cluster-test", topology.clone());
    let ids: Vec<String> = (0..200).map(|i| format!("{prefix}-m{i}")).collect();
    let messages = ids
        .iter()
        .map(|id| Outgoing {
            exchange: topology.exchange(JOBS_EXCHANGE),
            routing_key: SAVE_PROJECT.into(),
            payload: id.clone().into_bytes(),
            properties: BasicProperties::default(),
        })
        .collect();
    // Every one confirmed: a quorum of the queue's replicas has it.
    publisher
        .publish_all(messages)
        .await
        .expect("every message confirmed");
    drop(publisher);

    // The node leading the queue dies at once.
    let queue = topology.queue(SAVE_PROJECT);
    let leader = cluster.fault(&["queue-leader", &queue]);
    cluster.fault(&["rabbit-down", &leader]);

    // While it is down, a new connection (through the AMQP_URL list, past
    // the dead node) consumes every message from the other two.
    let mut got = HashSet::new();
    let consumed = async {
        let connection = broker::connect(&amqp_url, "cluster-test")
            .await
            .expect("a living node");
        let channel = connection.create_channel().await.expect("channel");
        let deadline = Instant::now() + Duration::from_secs(60);
        while got.len() < ids.len() && Instant::now() < deadline {
            match channel
                .basic_get(queue.as_str().into(), BasicGetOptions::default())
                .await
            {
                Ok(Some(message)) => {
                    got.insert(String::from_utf8_lossy(&message.delivery.data).into_owned());
                    message
                        .delivery
                        .ack(BasicAckOptions::default())
                        .await
                        .expect("ack");
                }
                // Empty, or no leader yet (a new one is being elected).
                Ok(None) | Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
        let _ = connection.close(200, "done".into()).await;
    };
    consumed.await;
    // The node comes back before anything is asserted: the cluster stays whole.
    cluster.fault(&["rabbit-up", &leader]);
    let connection = broker::connect(&amqp_url, "cluster-test-cleanup")
        .await
        .expect("connect");
    if let Ok(channel) = connection.create_channel().await {
        for q in topology.all_queues() {
            let _ = channel
                .queue_delete(q.as_str().into(), Default::default())
                .await;
        }
        for e in topology.all_exchanges() {
            let _ = channel
                .exchange_delete(e.as_str().into(), Default::default())
                .await;
        }
    }
    let missing: Vec<&String> = ids.iter().filter(|id| !got.contains(*id)).collect();
    assert!(
        missing.is_empty(),
        "{} of {} confirmed messages lost with node {leader}: {:?}",
        missing.len(),
        ids.len(),
        &missing[..missing.len().min(5)]
    );
    assert_eq!(got.len(), ids.len(), "each consumed once");
}

/// What one deduction saw: its key, amount, first answer and answers until 200.
struct Seen {
    code: String,
    amount: i64,
    answers: Vec<u16>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deduction_during_a_postgresql_failover_is_committed_once_or_answered_503_and_its_retry_charges_once()
 {
    let cluster = Cluster::find();
    let key = cluster.var("PENORA_API_KEY");
    let apis = cluster.apis();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .build()
        .expect("http");
    let user = unique("clustertest_failover_");
    let granted = 1_000_000i64;
    let grant = http
        .post(format!("{}/api/unified/add-credits", apis[0]))
        .header("X-API-Key", &key)
        .json(&serde_json::json!({"user_id": user, "amount": granted, "reason": "test", "reference": "seed"}))
        .send()
        .await
        .expect("grant");
    assert_eq!(grant.status().as_u16(), 200, "grant before the failover");

    // 8 clients deduct back to back over both APIs; each retries a 503 with
    // the same key until it gets its answer.
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for t in 0..8usize {
        let (http, key, apis, user, stop) = (
            http.clone(),
            key.clone(),
            apis.clone(),
            user.clone(),
            stop.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut n = 0usize;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let code = format!("f{t}_{n}");
                let amount = 1 + (n % 5) as i64;
                let body = serde_json::json!({"user_id": user, "amount": amount, "app_name": "imagegene", "project_code": code});
                let mut answers = Vec::new();
                let deadline = Instant::now() + Duration::from_secs(60);
                loop {
                    let api = &apis[(t + n + answers.len()) % apis.len()];
                    let status = match http
                        .post(format!("{api}/api/unified/deduct-credits"))
                        .header("X-API-Key", &key)
                        .json(&body)
                        .send()
                        .await
                    {
                        Ok(r) => r.status().as_u16(),
                        Err(_) => 0,
                    };
                    answers.push(status);
                    if status == 200 || Instant::now() > deadline {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                seen.push(Seen {
                    code,
                    amount,
                    answers,
                });
            }
            seen
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let switched = Instant::now();
    eprintln!("{}", cluster.fault(&["failover"]));
    let promoted_in = switched.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    eprintln!("{}", cluster.fault(&["rebuild-standby"]));
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("client"));
    }

    // Every answer is a 200 or a 503, and every deduction ends with a 200.
    let answered_503 = all.iter().filter(|s| s.answers.contains(&503)).count();
    for s in &all {
        assert!(
            s.answers.iter().all(|&a| a == 200 || a == 503),
            "deduct {}: answers {:?} (only 200 or 503 allowed)",
            s.code,
            s.answers
        );
        assert_eq!(
            s.answers.last(),
            Some(&200),
            "deduct {} never succeeded",
            s.code
        );
    }
    // Charged once each: the database (through the multi-host URL, now the
    // new primary) agrees with the client.
    let (db, connection) =
        tokio_postgres::connect(&cluster.var("DATABASE_URL"), tokio_postgres::NoTls)
            .await
            .expect("the new primary");
    tokio::spawn(connection);
    let balance: i64 = db
        .query_one("SELECT balance FROM accounts WHERE user_id = $1", &[&user])
        .await
        .expect("balance")
        .get(0);
    let spent: i64 = all.iter().map(|s| s.amount).sum();
    assert_eq!(
        balance,
        granted - spent,
        "balance = grant − each deduction once"
    );
    let rows = db
        .query(
            "SELECT project_code, count(*) FROM ledger_entries WHERE user_id = $1 AND kind = 'deduct' \
             GROUP BY project_code",
            &[&user],
        )
        .await
        .expect("ledger");
    let charged: HashSet<String> = rows
        .iter()
        .map(|r| {
            assert_eq!(r.get::<_, i64>(1), 1, "one deduct entry per key");
            r.get(0)
        })
        .collect();
    let codes: HashSet<String> = all.iter().map(|s| s.code.clone()).collect();
    assert_eq!(charged, codes, "every key charged, once");
    let in_recovery: bool = db
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .expect("role")
        .get(0);
    assert!(!in_recovery, "connected to the primary");
    eprintln!(
        "{} deductions, {} answered 503 at least once before their retry succeeded; promotion took {:?}",
        all.len(),
        answered_503,
        promoted_in
    );
}
