//! Prometheus metrics (prometheus-client, OpenMetrics text); `server::admin` serves them.
//!
//! Label values come from the config (route paths) or from fixed sets (rejection reasons,
//! directions, close-code classes); never from client input, so the series count is bounded.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, PoisonError, RwLock};

use crate::protocol::deflate::Tally;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// permessage-deflate byte counts: a route, a direction and which side of the compressor.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct DeflateLabels {
    pub route: String,
    /// `from_client` or `to_client`.
    pub direction: String,
    /// `uncompressed` (message bytes) or `compressed` (bytes on the wire).
    pub form: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RouteLabel {
    pub route: String,
}

/// A session's route and the HTTP version its handshake came over (`1.1` or `2`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct SessionLabels {
    pub route: String,
    pub http_version: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RejectionLabels {
    /// The route path, or "none" when no route matched.
    pub route: String,
    /// A fixed label such as `no_route`, `origin`, `backend_unreachable`.
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct DirectionLabels {
    pub route: String,
    /// `from_client` or `to_client`.
    pub direction: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct CloseLabels {
    pub route: String,
    /// `sent` or `received`.
    pub side: String,
    /// The code for registered codes (1000-1015), `3xxx`/`4xxx` for application ranges,
    /// `none` when no close frame was exchanged.
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct BackendLabels {
    pub(crate) route: String,
    /// The backend as written in the config.
    pub(crate) backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ReasonLabel {
    /// A fixed label (`missing`, `malformed`, `too_long`, `truncated`, `timeout`).
    pub(crate) reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct KindLabel {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ResultLabel {
    pub result: String,
}

/// A token lookup: the route and how it went (`found`, `unknown`, `invalid`, `error`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct LookupLabels {
    pub route: String,
    pub result: &'static str,
}

#[derive(Clone)]
pub(crate) struct Buckets(fn() -> Histogram);

impl MetricConstructor<Histogram> for Buckets {
    fn new_metric(&self) -> Histogram {
        (self.0)()
    }
}

fn seconds_buckets() -> Histogram {
    // 0.5 ms … ~4.7 h, doubling.
    Histogram::new(exponential_buckets(0.0005, 2.0, 25))
}

/// Every metric wsgate exports.
pub(crate) struct Metrics {
    registry: Registry,
    /// The registered families' names (without the prefix).
    names: Vec<&'static str>,
    /// Accepted client connections now open (handshaking and upgraded).
    pub connections: Gauge,
    pub sessions_open: Family<SessionLabels, Gauge>,
    pub sessions_total: Family<SessionLabels, Counter>,
    pub rejections: Family<RejectionLabels, Counter>,
    pub bytes: Family<DirectionLabels, Counter>,
    pub messages: Family<DirectionLabels, Counter>,
    pub deflate_bytes: Family<DeflateLabels, Counter>,
    pub close_codes: Family<CloseLabels, Counter>,
    pub backend_connect_seconds: Family<RouteLabel, Histogram, Buckets>,
    pub session_seconds: Family<SessionLabels, Histogram, Buckets>,
    pub handshake_timeouts: Counter,
    pub send_timeouts: Counter,
    pub tls_failures: Counter,
    /// Per backend of a route: failed connects, ejections, open sessions.
    pub backend_failures: Family<BackendLabels, Counter>,
    pub backend_ejections: Family<BackendLabels, Counter>,
    pub backend_sessions_open: Family<BackendLabels, Gauge>,
    /// Connections on `proxy_protocol` listeners closed for a bad or missing PROXY header.
    pub proxy_header_failures: Family<ReasonLabel, Counter>,
    /// Bytes held as whole messages by all sessions (the echo's buffers), set when scraped.
    pub message_buffer_bytes: Gauge,
    pub reloads: Family<ResultLabel, Counter>,
    pub token_lookups: Family<LookupLabels, Counter>,
    pub token_lookup_seconds: Family<RouteLabel, Histogram, Buckets>,
    pub last_reload_success: Gauge,
    /// HTTP/2 connections accepted, open now, and their streams (requests and WebSockets).
    pub h2_connections: Counter,
    pub h2_connections_open: Gauge,
    pub h2_streams: Family<KindLabel, Counter>,
    /// Each route's session metrics, found by its path and HTTP version (see
    /// [`RouteMetrics`]).
    by_route: RwLock<HashMap<(String, &'static str), Arc<RouteMetrics>>>,
}

/// One route's session metrics, found once per session (one map lookup) instead of once per
/// metric: a label built, hashed and looked up for each, nine per session, which came to a
/// twentieth of a new connection's instructions (callgrind, 400 sessions).
pub(crate) struct RouteMetrics {
    pub sessions_total: Counter,
    pub sessions_open: Gauge,
    pub session_seconds: Histogram,
    pub backend_connect_seconds: Histogram,
    /// Bytes and messages each way (a session adds its deflate tallies when it has them).
    pub counters: SessionCounters,
    /// The close-code counters, each found in its family on its route's first use of it.
    close_codes: [[OnceLock<Counter>; CLOSE_CODE_LABELS]; 2],
}

/// The values the close-code label takes: the code for registered codes (1000-1015),
/// `3xxx`/`4xxx` for the application ranges, `none` when no close frame was exchanged, in
/// the order of [`close_code_slot`].
const CLOSE_CODE_LABEL_TEXT: [&str; CLOSE_CODE_LABELS] = [
    "none", "1000", "1001", "1002", "1003", "1004", "1005", "1006", "1007", "1008", "1009", "1010",
    "1011", "1012", "1013", "1014", "1015", "3xxx", "4xxx", "other",
];

/// How many values the close-code label takes.
const CLOSE_CODE_LABELS: usize = 20;

/// The slot of `code`'s label in [`CLOSE_CODE_LABEL_TEXT`].
fn close_code_slot(code: Option<u16>) -> usize {
    match code {
        None => 0,
        Some(c @ 1000..=1015) => usize::from(c - 999),
        Some(3000..=3999) => 17,
        Some(4000..=4999) => 18,
        Some(_) => 19,
    }
}

impl RouteMetrics {
    /// Counts a session's close code: `sent` by wsgate to the client, or else received from
    /// it. The label set is made and looked up once per route and code, not per session.
    pub(crate) fn count_close(&self, m: &Metrics, route: &str, sent: bool, code: Option<u16>) {
        let (side, name) = if sent { (0, "sent") } else { (1, "received") };
        self.close_codes[side][close_code_slot(code)]
            .get_or_init(|| {
                m.close_codes
                    .get_or_create(&Metrics::close(route, name, code))
                    .clone()
            })
            .inc();
    }
}

/// Registers `metric` as `wsgate_NAME` and notes the name.
fn register(
    registry: &mut Registry,
    names: &mut Vec<&'static str>,
    name: &'static str,
    help: &str,
    metric: impl prometheus_client::registry::Metric,
) {
    names.push(name);
    registry.register(name, help, metric);
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub(crate) fn new() -> Metrics {
        let mut registry = Registry::with_prefix("wsgate");
        let mut names = Vec::new();
        let m = Metrics {
            registry: Registry::default(),
            names: Vec::new(),
            connections: Gauge::default(),
            sessions_open: Family::default(),
            sessions_total: Family::default(),
            rejections: Family::default(),
            bytes: Family::default(),
            messages: Family::default(),
            deflate_bytes: Family::default(),
            close_codes: Family::default(),
            backend_connect_seconds: Family::new_with_constructor(Buckets(seconds_buckets)),
            session_seconds: Family::new_with_constructor(Buckets(seconds_buckets)),
            handshake_timeouts: Counter::default(),
            send_timeouts: Counter::default(),
            tls_failures: Counter::default(),
            proxy_header_failures: Family::default(),
            backend_failures: Family::default(),
            backend_ejections: Family::default(),
            backend_sessions_open: Family::default(),
            message_buffer_bytes: Gauge::default(),
            reloads: Family::default(),
            token_lookups: Family::default(),
            token_lookup_seconds: Family::new_with_constructor(Buckets(seconds_buckets)),
            last_reload_success: Gauge::default(),
            h2_connections: Counter::default(),
            h2_connections_open: Gauge::default(),
            h2_streams: Family::default(),
            by_route: RwLock::default(),
        };
        register(
            &mut registry,
            &mut names,
            "client_connections",
            "Accepted client connections now open, handshaking ones included",
            m.connections.clone(),
        );
        register(
            &mut registry,
            &mut names,
            "sessions_open",
            "Upgraded sessions now open, per route and HTTP version",
            m.sessions_open.clone(),
        );
        register(
            &mut registry,
            &mut names,
            "sessions",
            "Upgraded sessions, per route and HTTP version",
            m.sessions_total.clone(),
        );
        register(
            &mut registry,
            &mut names,
            "handshake_rejections",
            "Requests refused before the upgrade, per route and reason",
            m.rejections.clone(),
        );
        register(
            &mut registry,
            &mut names,
            "payload_bytes",
            "WebSocket payload bytes, per route and direction",
            m.bytes.clone(),
        );
        register(
            &mut registry,
            &mut names,
            "messages",
            "WebSocket messages, per route and direction",
            m.messages.clone(),
        );
        register(
            &mut registry,
            &mut names,
            "deflate_bytes",
            "Data of permessage-deflate sessions before (uncompressed) and on the wire \
             (compressed), per route and direction",
            m.deflate_bytes.clone(),
        );
        register(
            &mut registry,
            &mut names,
            "close_codes",
            "Close codes sent and received, per route",
            m.close_codes.clone(),
        );
        register(
            &mut registry,
            &mut names,
            "backend_connect_seconds",
            "Time to connect to the backend, per route",
            m.backend_connect_seconds.clone(),
        );
        register(
            &mut registry,
            &mut names,
            "session_duration_seconds",
            "Session duration, per route and HTTP version",
            m.session_seconds.clone(),
        );
        register(
            &mut registry,
            &mut names,
            "http2_connections",
            "HTTP/2 client connections accepted",
            m.h2_connections.clone(),
        );
        register(
            &mut registry,
            &mut names,
            "http2_connections_open",
            "HTTP/2 client connections now open",
            m.h2_connections_open.clone(),
        );
        register(
            &mut registry,
            &mut names,
            "http2_streams",
            "HTTP/2 streams opened by clients, by kind (websocket: extended CONNECT; request: anything else)",
            m.h2_streams.clone(),
        );
        register(
            &mut registry,
            &mut names,
            "handshake_timeouts",
            "Connections closed because the request did not arrive within handshake_timeout",
            m.handshake_timeouts.clone(),
        );
        register(
            &mut registry,
            &mut names,
            "send_timeouts",
            "Connections closed because a request body or a response made no progress within send_timeout, or a body came slower than 1 KiB/s",
            m.send_timeouts.clone(),
        );
        register(
            &mut registry,
            &mut names,
            "tls_handshake_failures",
            "TLS handshakes that failed or timed out on wss:// listeners",
            m.tls_failures.clone(),
        );
        register(
            &mut registry,
            &mut names,
            "backend_connect_failures",
            "Failed connects (refused, timeout, TLS, a ws app not answering 101) per backend",
            m.backend_failures.clone(),
        );
        register(
            &mut registry,
            &mut names,
            "backend_ejections",
            "Times a backend was skipped for eject_for after eject_after failures in a row",
            m.backend_ejections.clone(),
        );
        register(
            &mut registry,
            &mut names,
            "backend_sessions_open",
            "Sessions now open per backend",
            m.backend_sessions_open.clone(),
        );
        register(
            &mut registry,
            &mut names,
            "proxy_protocol_failures",
            "Connections closed on proxy_protocol listeners for a missing, bad or slow PROXY header",
            m.proxy_header_failures.clone(),
        );
        register(
            &mut registry,
            &mut names,
            "message_buffer_bytes",
            "Bytes held as whole messages by all sessions (bounded by limits.message_buffer_budget)",
            m.message_buffer_bytes.clone(),
        );
        register(
            &mut registry,
            &mut names,
            "token_lookups",
            "Token lookups on token-file, token-redis and token-jwt routes, by route and result",
            m.token_lookups.clone(),
        );
        register(
            &mut registry,
            &mut names,
            "token_lookup_seconds",
            "Time a token lookup took, per route",
            m.token_lookup_seconds.clone(),
        );
        register(
            &mut registry,
            &mut names,
            "config_reloads",
            "Config reloads, by result",
            m.reloads.clone(),
        );
        register(
            &mut registry,
            &mut names,
            "config_last_reload_success",
            "1 if the last reload succeeded (or none was tried), 0 if it failed",
            m.last_reload_success.clone(),
        );
        m.last_reload_success.set(1);
        Metrics {
            registry,
            names,
            ..m
        }
    }

    /// Every metric family's name as exported (`wsgate_…`; counters without `_total`), with
    /// samples or not yet.
    pub(crate) fn names(&self) -> Vec<String> {
        self.names.iter().map(|n| format!("wsgate_{n}")).collect()
    }

    /// Counts one token lookup on `route` and the time it took.
    pub(crate) fn token_lookup(
        &self,
        route: &str,
        result: &'static str,
        took: std::time::Duration,
    ) {
        self.token_lookups
            .get_or_create(&LookupLabels {
                route: route.to_owned(),
                result,
            })
            .inc();
        self.token_lookup_seconds
            .get_or_create(&RouteLabel {
                route: route.to_owned(),
            })
            .observe(took.as_secs_f64());
    }

    /// The OpenMetrics text exposition.
    pub(crate) fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    /// The session metrics of the route at `path` for sessions over `http_version` (`1.1`
    /// or `2`), made on its first such session.
    pub(crate) fn for_route(&self, path: &str, http_version: &'static str) -> Arc<RouteMetrics> {
        let key = (path.to_owned(), http_version);
        let known = self.by_route.read().unwrap_or_else(PoisonError::into_inner);
        if let Some(found) = known.get(&key) {
            return found.clone();
        }
        drop(known);
        let label = Metrics::route(path);
        let session = SessionLabels {
            route: path.to_owned(),
            http_version,
        };
        // One statement per lookup: `get_or_create` holds the family's lock until its guard
        // is dropped, and a second lookup that inserts would wait for it forever.
        let sessions_total = self.sessions_total.get_or_create(&session).clone();
        let sessions_open = self.sessions_open.get_or_create(&session).clone();
        let session_seconds = self.session_seconds.get_or_create(&session).clone();
        let backend_connect_seconds = self.backend_connect_seconds.get_or_create(&label).clone();
        let made = Arc::new(RouteMetrics {
            sessions_total,
            sessions_open,
            session_seconds,
            backend_connect_seconds,
            counters: SessionCounters::for_route(self, path),
            close_codes: Default::default(),
        });
        let mut known = self
            .by_route
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        known.entry(key).or_insert(made).clone()
    }

    pub(crate) fn route(route: &str) -> RouteLabel {
        RouteLabel {
            route: route.to_owned(),
        }
    }

    pub(crate) fn direction(route: &str, direction: &str) -> DirectionLabels {
        DirectionLabels {
            route: route.to_owned(),
            direction: direction.to_owned(),
        }
    }

    pub(crate) fn close(route: &str, side: &str, code: Option<u16>) -> CloseLabels {
        CloseLabels {
            route: route.to_owned(),
            side: side.to_owned(),
            code: close_code_label(code),
        }
    }
}

/// A bounded label for a close code.
pub(crate) fn close_code_label(code: Option<u16>) -> String {
    CLOSE_CODE_LABEL_TEXT[close_code_slot(code)].to_owned()
}

/// The per-session handles the bridge and the splice count into as it goes.
#[derive(Clone, Default)]
pub(crate) struct SessionCounters {
    pub bytes_from_client: Counter,
    pub bytes_to_client: Counter,
    pub messages_from_client: Counter,
    pub messages_to_client: Counter,
    /// permessage-deflate sessions: bytes through the compressor and the decompressor.
    pub deflate_to_client: Tally,
    pub deflate_from_client: Tally,
}

impl SessionCounters {
    fn for_route(m: &Metrics, route: &str) -> SessionCounters {
        // One statement per lookup: `get_or_create` holds the family's lock until its guard
        // is dropped, and a second lookup that inserts would wait for it forever.
        let bytes_from_client = m
            .bytes
            .get_or_create(&Metrics::direction(route, "from_client"))
            .clone();
        let bytes_to_client = m
            .bytes
            .get_or_create(&Metrics::direction(route, "to_client"))
            .clone();
        let messages_from_client = m
            .messages
            .get_or_create(&Metrics::direction(route, "from_client"))
            .clone();
        let messages_to_client = m
            .messages
            .get_or_create(&Metrics::direction(route, "to_client"))
            .clone();
        SessionCounters {
            bytes_from_client,
            bytes_to_client,
            messages_from_client,
            messages_to_client,
            deflate_to_client: Tally::default(),
            deflate_from_client: Tally::default(),
        }
    }

    /// Counts this session's compression too (once it agreed on permessage-deflate).
    pub(crate) fn with_deflate(mut self, m: &Metrics, route: &str) -> SessionCounters {
        let counter = |direction: &str, form: &str| {
            m.deflate_bytes
                .get_or_create(&DeflateLabels {
                    route: route.to_owned(),
                    direction: direction.to_owned(),
                    form: form.to_owned(),
                })
                .clone()
        };
        self.deflate_to_client = Tally {
            uncompressed: counter("to_client", "uncompressed"),
            compressed: counter("to_client", "compressed"),
        };
        self.deflate_from_client = Tally {
            uncompressed: counter("from_client", "uncompressed"),
            compressed: counter("from_client", "compressed"),
        };
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression: two inserting lookups in one statement deadlocked the first session.
    #[test]
    fn session_counters_for_a_new_route_do_not_deadlock() {
        let m = Metrics::new();
        let c = SessionCounters::for_route(&m, "/new");
        c.bytes_to_client.inc_by(5);
        assert!(m
            .encode()
            .contains("wsgate_payload_bytes_total{route=\"/new\",direction=\"to_client\"} 5"));
    }

    /// A close code's label is its number for the registered codes, its range for the
    /// application ranges, `none` or `other`; each label has a slot of its own and every slot
    /// is used; a count lands on its label.
    #[test]
    fn close_code_slots_match_their_labels() {
        let expected = |code: Option<u16>| match code {
            None => "none".to_owned(),
            Some(c @ 1000..=1015) => c.to_string(),
            Some(3000..=3999) => "3xxx".to_owned(),
            Some(4000..=4999) => "4xxx".to_owned(),
            Some(_) => "other".to_owned(),
        };
        let mut codes: Vec<Option<u16>> = vec![None];
        codes.extend((0..=u16::MAX).step_by(7).map(Some));
        codes.extend(
            (990..=1020)
                .chain(2990..=3010)
                .chain(3990..=4010)
                .chain(4990..=5010)
                .map(Some),
        );
        let mut slot_of_label = HashMap::new();
        for code in codes {
            let (slot, label) = (close_code_slot(code), close_code_label(code));
            assert_eq!(label, expected(code), "{code:?}");
            assert_eq!(
                slot_of_label.entry(label).or_insert(slot),
                &slot,
                "{code:?}"
            );
        }
        assert_eq!(slot_of_label.len(), CLOSE_CODE_LABELS);
        let m = Metrics::new();
        let route = m.for_route("/r", "2");
        for code in [Some(1000), Some(1000), Some(4001), None] {
            route.count_close(&m, "/r", true, code);
        }
        route.count_close(&m, "/r", false, Some(1006));
        let text = m.encode();
        for line in [
            r#"wsgate_close_codes_total{route="/r",side="sent",code="1000"} 2"#,
            r#"wsgate_close_codes_total{route="/r",side="sent",code="4xxx"} 1"#,
            r#"wsgate_close_codes_total{route="/r",side="sent",code="none"} 1"#,
            r#"wsgate_close_codes_total{route="/r",side="received",code="1006"} 1"#,
        ] {
            assert!(text.contains(line), "{line} not in\n{text}");
        }
    }

    #[test]
    fn exposition_has_the_metrics_and_bounded_labels() {
        let m = Metrics::new();
        m.for_route("/echo", "2").sessions_total.inc();
        m.close_codes
            .get_or_create(&Metrics::close("/echo", "received", Some(4321)))
            .inc();
        let text = m.encode();
        assert!(
            text.contains("wsgate_sessions_total{route=\"/echo\",http_version=\"2\"} 1"),
            "{text}"
        );
        assert!(text.contains("code=\"4xxx\""), "{text}");
        assert!(
            text.contains("wsgate_config_last_reload_success 1"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"));
    }
}
