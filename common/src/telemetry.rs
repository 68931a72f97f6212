//! Logging set-up: JSON lines in production, readable lines in development,
//! level from `RUST_LOG` (default `info`).

use tracing_subscriber::{EnvFilter, fmt, prelude::*};

use crate::config::LogFormat;

/// Installs the global subscriber; call once, first thing in `main`.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    let result = match format {
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_span_list(false),
            )
            .try_init(),
        LogFormat::Pretty => registry.with(fmt::layer().compact()).try_init(),
    };
    if let Err(e) = result {
        eprintln!("logging already initialised: {e}");
    }
}

/// The process-wide Prometheus recorder, installed on first use and shared by
/// everything in the process (API, worker, or both in tests).
pub fn metrics_handle() -> metrics_exporter_prometheus::PrometheusHandle {
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    static HANDLE: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle> =
        std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            const SECONDS: &[f64] = &[
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0,
            ];
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS)
                .map(PrometheusBuilder::build_recorder)
                .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder());
            let handle = recorder.handle();
            // Fails only if another recorder is installed; then ours stays unused.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// Apps that may appear as a metric's `app` label: the two apps of the
/// product, and every app that a stored key names (registered when the key
/// authenticates). Anything else is `other`, so a client sending new app
/// names cannot make the series explode.
static KNOWN_APPS: std::sync::LazyLock<std::sync::RwLock<std::collections::BTreeSet<String>>> =
    std::sync::LazyLock::new(|| {
        std::sync::RwLock::new(
            [crate::domain::PENORA, crate::domain::IMAGEGENE]
                .map(str::to_owned)
                .into(),
        )
    });

/// Registers `app`, named by a key, as a label value.
pub fn register_app(app: &str) {
    let known = KNOWN_APPS.read().is_ok_and(|k| k.contains(app));
    if !known && let Ok(mut k) = KNOWN_APPS.write() {
        k.insert(app.to_owned());
    }
}

/// The `app` label for `app`: itself when known, else `other`.
pub fn app_label(app: &str) -> String {
    if KNOWN_APPS.read().is_ok_and(|k| k.contains(app)) {
        app.to_owned()
    } else {
        "other".to_owned()
    }
}

/// The `method` label for an HTTP method: the methods the API serves, or
/// `other`.
pub fn method_label(method: &str) -> &'static str {
    match method {
        "GET" => "GET",
        "POST" => "POST",
        "DELETE" => "DELETE",
        "HEAD" => "HEAD",
        "OPTIONS" => "OPTIONS",
        "PUT" => "PUT",
        "PATCH" => "PATCH",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_bounded() {
        assert_eq!(app_label("imagegene"), "imagegene");
        assert_eq!(app_label("made-up-by-a-client"), "other");
        register_app("studio");
        assert_eq!(app_label("studio"), "studio");
        assert_eq!(method_label("POST"), "POST");
        assert_eq!(method_label("BREW"), "other");
    }
}
