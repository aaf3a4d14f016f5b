//! Several backends per route: which one a new session tries first (`balance`), failing over
//! to the next before the client gets any answer, and passive health — a backend that failed
//! `eject_after` connects in a row is skipped for `eject_for`, then tried again.
//!
//! State is kept per route and backend *as written in the config*, so it survives reloads
//! that keep a backend, and a session's open count stays with the backend it started on.
//! It is found by the route's path and the backend itself, so a session's start formats and
//! allocates nothing once its backend has been seen; a session's end takes no lock at all.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use prometheus_client::metrics::gauge::Gauge;
use tokio::time::Instant;

use crate::metrics::{BackendLabels, Metrics};
use crate::route::{Backend, Balance, Route};

/// What the sessions on one backend share: their count, and its gauge.
#[derive(Debug)]
struct Open {
    sessions: AtomicUsize,
    gauge: Gauge,
}

#[derive(Debug)]
struct Health {
    failures_in_a_row: u32,
    ejected_until: Option<Instant>,
    open: Arc<Open>,
}

/// One route's state: whose turn it is (round robin), and its backends' health. (A route
/// whose backend comes from a token file has one entry, its token source: the targets its
/// tokens name are neither labels nor kept here, so neither grows with the file.)
#[derive(Debug, Default)]
struct RouteState {
    turn: usize,
    backends: HashMap<Backend, Health>,
}

impl RouteState {
    /// The backend's health, made on its first use (its gauge found once, here).
    fn entry(&mut self, route: &Route, index: usize, metrics: &Metrics) -> &mut Health {
        let backend = counted_as(route, index);
        // Looked up by reference first: the backend is copied only the first time.
        if !self.backends.contains_key(backend) {
            let gauge = metrics
                .backend_sessions_open
                .get_or_create(&labels(route, index))
                .clone();
            let open = Arc::new(Open {
                sessions: AtomicUsize::new(0),
                gauge,
            });
            let health = Health {
                failures_in_a_row: 0,
                ejected_until: None,
                open,
            };
            self.backends.insert(backend.clone(), health);
        }
        self.backends.get_mut(backend).expect("inserted above")
    }
}

#[derive(Default)]
pub(super) struct Balancer {
    routes: Mutex<HashMap<String, RouteState>>,
}

/// A session's place on its backend (its open count), given back when dropped.
pub(super) struct OnBackend {
    open: Arc<Open>,
}

impl Drop for OnBackend {
    fn drop(&mut self) {
        self.open.sessions.fetch_sub(1, Ordering::Relaxed);
        self.open.gauge.dec();
    }
}

impl Balancer {
    fn route_state<'a>(
        routes: &'a mut HashMap<String, RouteState>,
        route: &Route,
    ) -> &'a mut RouteState {
        // Looked up by `&str` first: the path is copied only the first time.
        if !routes.contains_key(&*route.path) {
            routes.insert(route.path.to_string(), RouteState::default());
        }
        routes.get_mut(&*route.path).expect("inserted above")
    }

    /// The order in which to try the route's backends: those not ejected, by the balance
    /// mode, then the ejected ones (better a late try than no answer).
    pub(super) fn order(&self, route: &Route) -> Vec<usize> {
        let n = route.backends.len();
        if n == 1 {
            return vec![0];
        }
        let now = Instant::now();
        let mut routes = self.routes.lock().unwrap();
        let state = Self::route_state(&mut routes, route);
        // Round robin: this session's turn, and the next session's.
        let start = state.turn % n;
        if route.balance == Balance::RoundRobin {
            state.turn = state.turn.wrapping_add(1);
        }
        let get = |i: usize| state.backends.get(counted_as(route, i));
        let ejected = |i: usize| {
            get(i)
                .and_then(|h| h.ejected_until)
                .is_some_and(|t| t > now)
        };
        let mut order: Vec<usize> = match route.balance {
            Balance::First => (0..n).collect(),
            Balance::RoundRobin => (0..n).map(|i| (start + i) % n).collect(),
            Balance::LeastConnections => {
                let mut v: Vec<usize> = (0..n).collect();
                v.sort_by_key(|&i| get(i).map_or(0, |h| h.open.sessions.load(Ordering::Relaxed)));
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
        let mut routes = self.routes.lock().unwrap();
        let h = Self::route_state(&mut routes, route).entry(route, index, metrics);
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
    pub(super) fn started(&self, route: &Route, index: usize, metrics: &Metrics) -> OnBackend {
        let open = {
            let mut routes = self.routes.lock().unwrap();
            let h = Self::route_state(&mut routes, route).entry(route, index, metrics);
            h.failures_in_a_row = 0;
            h.ejected_until = None;
            h.open.clone()
        };
        open.sessions.fetch_add(1, Ordering::Relaxed);
        open.gauge.inc();
        OnBackend { open }
    }
}

/// The backend a session is counted under: as the config names it (a token source, not the
/// target one of its tokens named).
fn counted_as(route: &Route, index: usize) -> &Backend {
    route
        .looked_up_from
        .as_ref()
        .unwrap_or(&route.backends[index])
}

fn labels(route: &Route, index: usize) -> BackendLabels {
    BackendLabels {
        route: route.path.to_string(),
        backend: counted_as(route, index).to_string(),
    }
}
