//! Several backends per route: which one a new session tries first (`balance`), failing over
//! to the next before the client gets any answer, and passive health — a backend that failed
//! `eject_after` connects in a row is skipped for `eject_for`, then tried again.
//!
//! State is kept per route and backend *as written in the config*, so it survives reloads
//! that keep a backend, and a session's open count stays with the backend it started on.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::time::Instant;

use crate::metrics::{BackendLabels, Metrics};
use crate::route::{Balance, Route};

#[derive(Debug, Default)]
struct Health {
    failures_in_a_row: u32,
    ejected_until: Option<Instant>,
    open: usize,
}

#[derive(Default)]
pub(super) struct Balancer {
    health: Mutex<HashMap<(String, String), Health>>,
    turns: Mutex<HashMap<String, usize>>,
}

/// A session's place on its backend (its open count), given back when dropped.
pub(super) struct OnBackend {
    balancer: Arc<Balancer>,
    key: (String, String),
    metrics_gauge: prometheus_client::metrics::gauge::Gauge,
}

impl Drop for OnBackend {
    fn drop(&mut self) {
        if let Some(h) = self.balancer.health.lock().unwrap().get_mut(&self.key) {
            h.open = h.open.saturating_sub(1);
        }
        self.metrics_gauge.dec();
    }
}

fn key(route: &Route, index: usize) -> (String, String) {
    (route.path.clone(), route.backends[index].to_string())
}

impl Balancer {
    /// The order in which to try the route's backends: those not ejected, by the balance
    /// mode, then the ejected ones (better a late try than no answer).
    pub(super) fn order(&self, route: &Route) -> Vec<usize> {
        let n = route.backends.len();
        if n == 1 {
            return vec![0];
        }
        let now = Instant::now();
        let health = self.health.lock().unwrap();
        let get = |i: usize| health.get(&key(route, i));
        let ejected = |i: usize| {
            get(i)
                .and_then(|h| h.ejected_until)
                .is_some_and(|t| t > now)
        };
        let mut order: Vec<usize> = match route.balance {
            Balance::First => (0..n).collect(),
            Balance::RoundRobin => {
                let mut turns = self.turns.lock().unwrap();
                let turn = turns.entry(route.path.clone()).or_insert(0);
                let start = *turn % n;
                *turn = turn.wrapping_add(1);
                (0..n).map(|i| (start + i) % n).collect()
            }
            Balance::LeastConnections => {
                let mut v: Vec<usize> = (0..n).collect();
                v.sort_by_key(|&i| get(i).map_or(0, |h| h.open));
                v
            }
        };
        // Stable: the healthy ones keep their order, the ejected ones go last.
        order.sort_by_key(|&i| ejected(i));
        order
    }

    /// A connect to backend `index` failed; true when that ejected it.
    pub(super) fn failed(&self, route: &Route, index: usize, metrics: &Metrics) -> bool {
        let labels = labels(route, index);
        metrics.backend_failures.get_or_create(&labels).inc();
        let mut health = self.health.lock().unwrap();
        let h = health.entry(key(route, index)).or_default();
        h.failures_in_a_row += 1;
        if h.failures_in_a_row >= route.eject_after {
            h.failures_in_a_row = 0;
            h.ejected_until = Some(Instant::now() + route.eject_for);
            metrics.backend_ejections.get_or_create(&labels).inc();
            return true;
        }
        false
    }

    /// A session started on backend `index`: it is healthy, and one more session is open.
    pub(super) fn started(
        self: &Arc<Self>,
        route: &Route,
        index: usize,
        metrics: &Metrics,
    ) -> OnBackend {
        let key = key(route, index);
        {
            let mut health = self.health.lock().unwrap();
            let h = health.entry(key.clone()).or_default();
            h.failures_in_a_row = 0;
            h.ejected_until = None;
            h.open += 1;
        }
        let gauge = metrics
            .backend_sessions_open
            .get_or_create(&labels(route, index))
            .clone();
        gauge.inc();
        OnBackend {
            balancer: self.clone(),
            key,
            metrics_gauge: gauge,
        }
    }
}

fn labels(route: &Route, index: usize) -> BackendLabels {
    BackendLabels {
        route: route.path.clone(),
        backend: route.backends[index].to_string(),
    }
}
