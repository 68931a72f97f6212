use std::{collections::HashMap, time::Duration};

use super::*;

/// Every section at once, as no binary loads them: the checks of each
/// section's variables.
#[derive(Debug)]
struct All {
    log: Log,
    db: Db,
    http: Http,
    broker: Broker,
    worker: Worker,
    images: Images,
    ledger: Ledger,
    workspace: Workspace,
    audit: Audit,
}

fn lookup(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> + use<> {
    let map: HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    move |k| map.get(k).cloned()
}

fn load(vars: &[(&str, &str)]) -> Result<All, ConfigError> {
    let get = lookup(vars);
    Ok(All {
        log: Log::from_lookup(&get)?,
        db: Db::from_lookup(&get)?,
        http: Http::from_lookup(&get)?,
        broker: Broker::from_lookup(&get)?,
        worker: Worker::from_lookup(&get)?,
        images: Images::from_lookup(&get)?,
        ledger: Ledger::from_lookup(&get)?,
        workspace: Workspace::from_lookup(&get)?,
        audit: Audit::from_lookup(&get)?,
    })
}

#[test]
fn cors_origins_must_be_exact_origins() {
    let ok = load(&[(
        "CORS_ALLOWED_ORIGINS",
        " https://a.example ,http://localhost:3000,",
    )])
    .expect("valid");
    assert_eq!(
        ok.http.cors_allowed_origins,
        ["https://a.example", "http://localhost:3000"]
    );
    for bad in ["*", "https://a.example/path", "a.example", "https://"] {
        let err = load(&[("CORS_ALLOWED_ORIGINS", bad)])
            .expect_err(bad)
            .to_string();
        assert!(err.contains("CORS_ALLOWED_ORIGINS"), "{bad}: {err}");
    }
    assert!(
        load(&[])
            .expect("default")
            .http
            .cors_allowed_origins
            .is_empty()
    );
}

#[test]
fn defaults_match_the_contract() {
    let s = load(&[]).expect("defaults load");
    assert_eq!(s.http.bind_addr.to_string(), "127.0.0.1:5000");
    assert_eq!(s.workspace.storage_quota_bytes, 1_048_576);
    assert_eq!(s.ledger.refund_window, Duration::from_secs(3600));
    assert_eq!(s.ledger.max_deduct_amount, 1_000_000);
    assert_eq!(
        (s.http.rate_limit_per_sec, s.http.rate_limit_burst),
        (100, 200)
    );
    assert_eq!(s.log.format, LogFormat::Json);
    assert!(s.http.bootstrap_api_key.is_none());
    assert_eq!(s.http.max_body_bytes, 12 * 1024 * 1024);
    assert_eq!(s.images.max_concurrent_saves, 8);
    assert_eq!(s.images.max_pixels, 4096 * 4096);
    assert_eq!(s.images.quality, 85);
    assert_eq!(s.images.storage_format, ImageStorageFormat::Webp);
    assert_eq!(s.worker.project_retention, None);
    assert_eq!(s.worker.max_event_lateness, s.ledger.refund_window);
    assert!(s.broker.management_url.is_none());
    assert!(s.db.migrate_on_start);
    assert_eq!(s.ledger.low_balance_threshold, 10);
    assert_eq!(s.worker.low_balance_threshold, 10);
    assert_eq!(s.worker.expiry_notice, Duration::from_secs(259_200));
    let s = load(&[("LOW_BALANCE_THRESHOLD", "0")]).expect("loads");
    assert_eq!(s.ledger.low_balance_threshold, 0);
    let s = load(&[("REFUND_WINDOW_SECS", "600")]).expect("loads");
    assert_eq!(s.worker.max_event_lateness, Duration::from_secs(600));
    let s = load(&[("MAX_EVENT_LATENESS_SECS", "0")]).expect("loads");
    assert_eq!(s.worker.max_event_lateness, Duration::ZERO);
    let s = load(&[("PROJECT_RETENTION_DAYS", "30")]).expect("loads");
    assert_eq!(
        s.worker.project_retention,
        Some(Duration::from_secs(30 * 86_400))
    );
}

#[test]
fn a_bad_value_names_its_variable() {
    for (var, val) in [
        ("BIND_ADDR", "nowhere"),
        ("STORAGE_QUOTA_BYTES", "-1"),
        ("REFUND_WINDOW_SECS", "soon"),
        ("RATE_LIMIT_BURST", "0"),
        ("LOG_FORMAT", "xml"),
        ("PRICE_TABLE", "small=x"),
        ("DATABASE_URL", "postgres://[::1"),
        ("AMQP_QUEUE_TYPE", "fast"),
        ("RETRY_BASE_MS", "120000"),
        ("AMQP_PREFIX", "a b"),
        ("IMAGE_QUALITY", "0"),
        ("IMAGE_QUALITY", "101"),
        ("IMAGE_STORAGE_FORMAT", "avif"),
        ("MAX_CONCURRENT_SAVES", "0"),
        ("PROJECT_RETENTION_DAYS", "0"),
        ("MAX_IMAGE_PIXELS", "lots"),
        ("IMAGE_CPU_CGROUP", "/nonexistent/penora-images"),
        ("MAX_EVENT_LATENESS_SECS", "-5"),
        ("HTTP_BODY_TIMEOUT_SECS", "0"),
        ("RABBITMQ_MANAGEMENT_URL", "amqps://broker:5671"),
        ("RABBITMQ_MANAGEMENT_URL", "broker:15672"),
        ("DB_MIGRATE_ON_START", "maybe"),
        ("AUDIT_HMAC_KEY", "short"),
        ("MAX_PROJECTS_PER_USER", "0"),
        ("LOW_BALANCE_THRESHOLD", "-1"),
        ("LOW_BALANCE_THRESHOLD", "ten"),
        ("EXPIRY_NOTICE_SECS", "-1"),
    ] {
        let err = load(&[(var, val)]).unwrap_err();
        assert_eq!(err.variable, var);
        assert!(err.to_string().contains(var));
    }
}

#[test]
fn secrets_do_not_print() {
    let s = load(&[("PENORA_API_KEY", "super-secret-key-value-0123456789abcdef")]).expect("loads");
    assert!(!format!("{s:?}").contains("super-secret"));
}

#[test]
fn a_weak_bootstrap_key_is_refused_unless_allowed() {
    let err = load(&[("PENORA_API_KEY", "short-key")]).unwrap_err();
    assert_eq!(err.variable, "PENORA_API_KEY");
    assert!(err.to_string().contains("at least 32"), "{err}");
    assert!(
        !err.to_string().contains("short-key"),
        "the key is not echoed"
    );
    let s = load(&[
        ("PENORA_API_KEY", "short-key"),
        ("ALLOW_WEAK_API_KEY", "true"),
    ])
    .expect("allowed");
    assert!(s.http.bootstrap_api_key.is_some());
    assert!(load(&[("PENORA_API_KEY", &"k".repeat(32))]).is_ok());
    let err = load(&[("ALLOW_WEAK_API_KEY", "yes")]).unwrap_err();
    assert_eq!(err.variable, "ALLOW_WEAK_API_KEY");
}

/// Which binary refuses a bad value of each variable: exactly those that
/// load its section (api, worker, ops), and every variable is read by one.
#[test]
fn each_binary_refuses_only_the_bad_values_of_its_own_sections() {
    let cases: &[(&str, &str, [bool; 3])] = &[
        ("LOG_FORMAT", "xml", [true, true, false]),
        ("DATABASE_URL", "postgres://[::1", [true, true, true]),
        ("DB_POOL_SIZE", "0", [true, true, true]),
        ("DB_MIGRATE_ON_START", "maybe", [true, true, true]),
        ("BIND_ADDR", "nowhere", [true, false, false]),
        ("HTTP_IDLE_TIMEOUT_SECS", "nonsense", [true, false, false]),
        ("CORS_ALLOWED_ORIGINS", "*", [true, false, false]),
        ("PENORA_API_KEY", "short-key", [true, false, false]),
        ("AMQP_PREFIX", "a b", [true, true, true]),
        ("RETRY_MAX_ATTEMPTS", "0", [true, true, true]),
        (
            "RABBITMQ_MANAGEMENT_URL",
            "broker:15672",
            [true, true, true],
        ),
        ("WORKER_METRICS_ADDR", "nowhere", [false, true, false]),
        // Each service owns its shutdown deadline; the CLI has none.
        ("SHUTDOWN_DEADLINE_SECS", "0", [true, true, false]),
        ("RETRY_BASE_MS", "120000", [false, true, false]),
        ("MAX_EVENT_LATENESS_SECS", "-5", [false, true, false]),
        ("IMAGE_QUALITY", "0", [true, true, false]),
        ("MAX_IMAGE_PIXELS", "lots", [true, true, false]),
        (
            "IMAGE_CPU_CGROUP",
            "/nonexistent/penora-images",
            [true, true, false],
        ),
        ("MAX_CONCURRENT_SAVES", "0", [true, true, false]),
        // The worker reads the refund window only as its lateness default.
        ("REFUND_WINDOW_SECS", "soon", [true, true, true]),
        ("MAX_DEDUCT_AMOUNT", "0", [true, false, true]),
        ("PRICE_TABLE", "small=x", [true, false, true]),
        ("STORAGE_QUOTA_BYTES", "-1", [true, false, true]),
        ("MAX_PROJECTS_PER_USER", "0", [true, false, true]),
        ("AUDIT_HMAC_KEY", "short", [false, true, true]),
        // Every binary that moves credits judges the threshold.
        ("LOW_BALANCE_THRESHOLD", "-1", [true, true, true]),
        ("EXPIRY_NOTICE_SECS", "soon", [false, true, false]),
    ];
    for &(var, val, [api, worker, ops]) in cases {
        let get = lookup(&[(var, val)]);
        let named = |r: Result<(), ConfigError>| match r {
            Ok(()) => false,
            Err(e) => {
                assert_eq!(e.variable, var, "{e}");
                true
            }
        };
        assert_eq!(
            named(ApiSettings::from_lookup(&get).map(drop)),
            api,
            "api, {var}"
        );
        assert_eq!(
            named(WorkerSettings::from_lookup(&get).map(drop)),
            worker,
            "worker, {var}"
        );
        assert_eq!(
            named(OpsSettings::from_lookup(&get).map(drop)),
            ops,
            "ops, {var}"
        );
    }
}

#[test]
fn penora_ops_runs_whatever_the_image_and_http_settings_say() {
    let get = lookup(&[
        ("IMAGE_QUALITY", "0"),
        ("HTTP_IDLE_TIMEOUT_SECS", "nonsense"),
        ("WORKER_METRICS_ADDR", "nowhere"),
        ("LOG_FORMAT", "xml"),
    ]);
    assert!(OpsSettings::from_lookup(&get).is_ok());
    let err = ApiSettings::from_lookup(lookup(&[("IMAGE_QUALITY", "0")])).unwrap_err();
    assert_eq!(err.variable, "IMAGE_QUALITY");
}

#[test]
fn the_audit_key_is_optional_and_does_not_print() {
    assert!(load(&[]).expect("defaults").audit.hmac_key.is_none());
    let key = "audit-key-0123456789abcdef0123456789";
    let s = load(&[("AUDIT_HMAC_KEY", key)]).expect("loads");
    assert_eq!(s.audit.hmac_key.as_ref().map(Secret::expose), Some(key));
    assert!(!format!("{s:?}").contains(key));
}

#[test]
fn the_log_filter_is_read_with_the_format() {
    assert_eq!(load(&[]).expect("defaults").log.filter, None);
    let s = load(&[("RUST_LOG", "penora_api=debug,warn")]).expect("loads");
    assert_eq!(s.log.filter.as_deref(), Some("penora_api=debug,warn"));
}

#[test]
fn webhook_settings_default_to_the_contract_and_refuse_bad_values_by_name() {
    let w = Webhooks::from_lookup(lookup(&[])).expect("defaults");
    assert!(w.secret_key.is_none());
    assert!(!w.allow_private);
    assert_eq!(w.retry_window, Duration::from_secs(24 * 3600));
    assert_eq!(w.timeout, Duration::from_secs(10));
    let key = "ab".repeat(32);
    let w = Webhooks::from_lookup(lookup(&[
        ("WEBHOOK_SECRET_KEY", &key),
        ("WEBHOOK_RETRY_HOURS", "2"),
        ("WEBHOOK_ALLOW_PRIVATE", "true"),
    ]))
    .expect("set");
    assert_eq!(w.retry_window, Duration::from_secs(7200));
    assert!(w.allow_private);
    assert_eq!(format!("{:?}", w.secret_key), "Some([redacted])");
    let w = Webhooks::from_lookup(lookup(&[
        ("WEBHOOK_RETRY_SECS", "3"),
        ("WEBHOOK_RETRY_HOURS", "2"),
    ]))
    .expect("seconds win");
    assert_eq!(w.retry_window, Duration::from_secs(3));
    for (variable, value) in [
        ("WEBHOOK_SECRET_KEY", "short"),
        ("WEBHOOK_SECRET_KEY", &"zz".repeat(32)),
        ("WEBHOOK_TIMEOUT_MS", "10001"),
        ("WEBHOOK_RETRY_HOURS", "0"),
        ("WEBHOOK_ALLOW_PRIVATE", "yes"),
        ("WEBHOOK_ENDPOINT_CONCURRENCY", "0"),
    ] {
        let e = Webhooks::from_lookup(lookup(&[(variable, value)])).expect_err(variable);
        assert_eq!(e.variable, variable);
    }
}
