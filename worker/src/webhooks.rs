//! What the worker keeps for webhook delivery: the client, the secrets' key,
//! and one gate per endpoint (its concurrency slots and circuit breaker).
//!
//! Rules: at most `WEBHOOK_ENDPOINT_CONCURRENCY` deliveries to one endpoint
//! run at once in this worker (all endpoints together are bounded by the
//! webhooks channel's prefetch, `WEBHOOK_CONCURRENCY`); a delivery that
//! finds its endpoint's slots taken, or its circuit open, is not an attempt
//! and is deferred through a delay queue, so a slow or dead endpoint holds
//! at most its own slots and never a healthy endpoint's deliveries. After
//! `WEBHOOK_CIRCUIT_FAILURES` consecutive failures the circuit opens for
//! `WEBHOOK_CIRCUIT_COOLDOWN_MS`; then one delivery tries (half-open): a
//! success closes it, a failure opens it again. The gates live in the
//! process (each worker judges the endpoints by what it saw itself).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use penora_config::Webhooks;
use penora_platform::webhooks::{
    client::{Client, Resolve},
    secret::SecretBox,
};
use tokio::time::Instant;

/// How long a delivery waits when its endpoint's slots are all taken.
const BUSY_DEFER: Duration = Duration::from_millis(500);

/// The worker's webhook machinery.
pub struct Runtime {
    /// Calls endpoints (checked addresses only).
    pub client: Client,
    /// Opens the endpoints' secrets; `None` without `WEBHOOK_SECRET_KEY`.
    pub secrets: Option<SecretBox>,
    /// The settings.
    pub settings: Webhooks,
    /// One gate per endpoint seen.
    pub gates: Arc<Gates>,
}

impl Runtime {
    /// The machinery of `settings`, resolving names through `resolver`.
    pub fn new(settings: &Webhooks, resolver: Arc<dyn Resolve>) -> Result<Self, String> {
        Ok(Self {
            client: Client::new(resolver, settings.allow_private, settings.timeout)?,
            secrets: SecretBox::from_settings(settings)?,
            settings: settings.clone(),
            gates: Arc::new(Gates::new(settings)),
        })
    }
}

#[derive(Debug, Default)]
struct Gate {
    in_flight: usize,
    failures: u32,
    open_until: Option<Instant>,
    probing: bool,
}

/// The endpoints' gates.
#[derive(Debug)]
pub struct Gates {
    gates: Mutex<HashMap<String, Gate>>,
    per_endpoint: usize,
    failures: u32,
    cooldown: Duration,
    longest_defer: Duration,
}

/// Leave to call an endpoint; gives its slot back when dropped.
#[derive(Debug)]
pub struct Pass {
    gates: Arc<Gates>,
    endpoint: String,
    probe: bool,
    outcome: Option<bool>,
}

impl Pass {
    /// Records whether the call delivered (closes or opens the circuit).
    pub fn record(&mut self, delivered: bool) {
        self.outcome = Some(delivered);
    }
}

impl Drop for Pass {
    fn drop(&mut self) {
        self.gates.release(&self.endpoint, self.probe, self.outcome);
    }
}

impl Gates {
    /// Gates with the settings' bounds.
    pub fn new(settings: &Webhooks) -> Self {
        Self {
            gates: Mutex::new(HashMap::new()),
            per_endpoint: settings.endpoint_concurrency,
            failures: settings.circuit_failures,
            cooldown: settings.circuit_cooldown,
            longest_defer: settings.retry_base,
        }
    }

    /// A pass to call `endpoint` now, or how long to wait first.
    pub fn admit(self: &Arc<Self>, endpoint: &str) -> Result<Pass, Duration> {
        let now = Instant::now();
        let mut gates = self.gates.lock().unwrap_or_else(|p| p.into_inner());
        let gate = gates.entry(endpoint.to_owned()).or_default();
        let mut probe = false;
        if let Some(until) = gate.open_until {
            if now < until {
                return Err((until - now).clamp(Duration::from_millis(100), self.longest_defer));
            }
            // Half-open: one delivery tries; the others wait for its answer.
            if gate.probing {
                return Err(BUSY_DEFER);
            }
            gate.probing = true;
            probe = true;
        }
        if gate.in_flight >= self.per_endpoint {
            if probe {
                gate.probing = false;
            }
            return Err(BUSY_DEFER);
        }
        gate.in_flight += 1;
        Ok(Pass {
            gates: self.clone(),
            endpoint: endpoint.to_owned(),
            probe,
            outcome: None,
        })
    }

    fn release(&self, endpoint: &str, probe: bool, outcome: Option<bool>) {
        let now = Instant::now();
        let mut gates = self.gates.lock().unwrap_or_else(|p| p.into_inner());
        let Some(gate) = gates.get_mut(endpoint) else {
            return;
        };
        gate.in_flight = gate.in_flight.saturating_sub(1);
        if probe {
            gate.probing = false;
        }
        match outcome {
            Some(true) => {
                gate.failures = 0;
                gate.open_until = None;
            }
            Some(false) => {
                gate.failures = gate.failures.saturating_add(1);
                if probe || gate.failures >= self.failures {
                    if gate.open_until.is_none_or(|u| u <= now) {
                        tracing::warn!(
                            endpoint_id = endpoint,
                            failures = gate.failures,
                            cooldown_ms = self.cooldown.as_millis() as u64,
                            "webhook endpoint failing: circuit opened"
                        );
                    }
                    gate.open_until = Some(now + self.cooldown);
                }
            }
            None => {}
        }
        let open = gates
            .values()
            .filter(|g| g.open_until.is_some_and(|u| u > now))
            .count();
        metrics::gauge!("penora_webhook_circuits_open").set(open as f64);
    }

    /// Endpoints whose circuit is open now.
    pub fn open_circuits(&self) -> usize {
        let now = Instant::now();
        let gates = self.gates.lock().unwrap_or_else(|p| p.into_inner());
        gates
            .values()
            .filter(|g| g.open_until.is_some_and(|u| u > now))
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gates(per: usize, failures: u32, cooldown_ms: u64) -> Arc<Gates> {
        Arc::new(Gates {
            gates: Mutex::new(HashMap::new()),
            per_endpoint: per,
            failures,
            cooldown: Duration::from_millis(cooldown_ms),
            longest_defer: Duration::from_secs(1),
        })
    }

    #[test]
    fn an_endpoints_slots_bound_only_that_endpoint() {
        let g = gates(2, 5, 1000);
        let a1 = g.admit("we_a").expect("slot");
        let _a2 = g.admit("we_a").expect("slot");
        assert_eq!(g.admit("we_a").err(), Some(BUSY_DEFER));
        let _b = g.admit("we_b").expect("another endpoint is not held up");
        drop(a1);
        assert!(g.admit("we_a").is_ok(), "a slot given back is free again");
    }

    #[test]
    fn the_circuit_opens_after_consecutive_failures_then_lets_one_try() {
        // A 30 ms cooldown, waited out for real (no paused clock here).
        let g = gates(4, 3, 30);
        for _ in 0..3 {
            g.admit("we_a").expect("closed").record(false);
        }
        assert_eq!(g.open_circuits(), 1);
        assert!(g.admit("we_a").is_err(), "open: deferred");
        std::thread::sleep(Duration::from_millis(40));
        let mut probe = g.admit("we_a").expect("half-open: one try");
        assert!(g.admit("we_a").is_err(), "only one try while half-open");
        probe.record(false);
        drop(probe);
        assert!(g.admit("we_a").is_err(), "a failed try opens it again");
        std::thread::sleep(Duration::from_millis(40));
        g.admit("we_a").expect("half-open").record(true);
        assert_eq!(g.open_circuits(), 0);
        let _x = g.admit("we_a").expect("closed");
        let _y = g.admit("we_a").expect("closed: every slot usable");
    }
}
