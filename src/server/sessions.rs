//! Live sessions, for the admin listener: each session is registered when it starts (its id,
//! route, client, backend, start time and its [`SessionControl`]) and gone when it ends.
//! Listing takes the table's lock only to copy out the entries (an `Arc` each), so listing
//! 10,000 sessions never holds up a session's start or end for long, and the data path never
//! touches the table at all.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use super::listen::Peer;
use crate::config::quick::quote;
use crate::route::Backend;
use crate::session_end::SessionControl;

/// One live session as the admin listener shows it. Never a token or a credential: the
/// backend is the target the session connected to.
pub(super) struct Live {
    pub(super) id: u64,
    pub(super) route: Arc<str>,
    /// `ip:port`, or `unix:PATH` for a unix-socket client.
    pub(super) peer: Arc<str>,
    /// Formatted only when listed (a session's start formats nothing).
    pub(super) backend: Arc<Backend>,
    pub(super) started: SystemTime,
    pub(super) control: Arc<SessionControl>,
}

#[derive(Default)]
pub(super) struct Registry {
    next_id: AtomicU64,
    live: Mutex<HashMap<u64, Arc<Live>>>,
}

/// A session's entry, removed when dropped (however the session ends).
pub(super) struct Registered<'r> {
    registry: &'r Registry,
    id: u64,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.registry.table().remove(&self.id);
    }
}

impl Registry {
    /// The table, locked (a panic elsewhere while it was held leaves it usable: each change
    /// to it is one insert or remove).
    fn table(&self) -> MutexGuard<'_, HashMap<u64, Arc<Live>>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a starting session; it is listed until the returned guard is dropped.
    pub(super) fn register(
        &self,
        route: &Arc<str>,
        peer: &Peer,
        backend: Arc<Backend>,
        control: Arc<SessionControl>,
    ) -> Registered<'_> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let live = Arc::new(Live {
            id,
            route: route.clone(),
            peer: peer.shown(),
            backend,
            started: SystemTime::now(),
            control,
        });
        self.table().insert(id, live);
        Registered { registry: self, id }
    }

    /// Every live session, oldest first.
    pub(super) fn list(&self) -> Vec<Arc<Live>> {
        let mut all: Vec<Arc<Live>> = self.table().values().cloned().collect();
        all.sort_by_key(|l| l.id);
        all
    }

    /// How many sessions are live (the drain's log lines).
    pub(super) fn len(&self) -> usize {
        self.table().len()
    }

    pub(super) fn get(&self, id: u64) -> Option<Arc<Live>> {
        self.table().get(&id).cloned()
    }
}

/// The close codes an operator may send: normal, going away, policy violation, try again
/// later, and the private range.
pub(super) fn operator_code_allowed(code: u16) -> bool {
    matches!(code, 1000 | 1001 | 1008 | 1013 | 4000..=4999)
}

/// `[{...}, ...]`: the sessions as JSON (fields in a fixed order; strings escaped).
pub(super) fn to_json(sessions: &[Arc<Live>]) -> String {
    let mut out = String::with_capacity(64 + sessions.len() * 200);
    out.push('[');
    for (i, s) in sessions.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let started = s
            .started
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        out.push_str(&format!(
            "{{\"id\":{},\"route\":{},\"peer\":{},\"backend\":{},\"started\":\"{}\",\"bytes_from_client\":{},\"bytes_to_client\":{}}}",
            s.id,
            quote(&s.route),
            quote(&s.peer),
            quote(&s.backend.to_string()),
            crate::log_time::rfc3339(started),
            s.control.bytes_from_client.load(Ordering::Relaxed),
            s.control.bytes_to_client.load(Ordering::Relaxed),
        ));
    }
    out.push(']');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_are_listed_until_they_end_and_written_as_json() {
        let r = Registry::default();
        let control = Arc::new(SessionControl::default());
        let a = r.register(
            &"/vnc".into(),
            &Peer::tcp("192.0.2.1:5000".parse().unwrap()),
            Arc::new(Backend::Tcp("10.0.0.1:5900".into())),
            control.clone(),
        );
        let b = r.register(
            &"/a\"b".into(),
            &Peer::tcp("[2001:db8::1]:1".parse().unwrap()),
            Arc::new(Backend::Echo),
            Arc::default(),
        );
        control.bytes_from_client.store(7, Ordering::Relaxed);
        let listed = r.list();
        assert_eq!(listed.iter().map(|l| l.id).collect::<Vec<_>>(), [1, 2]);
        let json = to_json(&listed);
        assert!(json.starts_with("[{\"id\":1,\"route\":\"/vnc\",\"peer\":\"192.0.2.1:5000\",\"backend\":\"tcp://10.0.0.1:5900\",\"started\":\""), "{json}");
        assert!(
            json.contains("\"bytes_from_client\":7,\"bytes_to_client\":0}"),
            "{json}"
        );
        assert!(json.contains("\"route\":\"/a\\\"b\""), "{json}");
        assert_eq!(r.len(), 2);
        drop(a);
        assert_eq!((r.list().len(), r.len()), (1, 1));
        assert!(r.get(1).is_none() && r.get(2).is_some());
        drop(b);
        assert!(r.list().is_empty());
        assert_eq!(r.len(), 0);
        assert_eq!(to_json(&[]), "[]");
    }

    #[test]
    fn operators_send_only_the_codes_meant_for_them() {
        for ok in [1000, 1001, 1008, 1013, 4000, 4999] {
            assert!(operator_code_allowed(ok), "{ok}");
        }
        for bad in [999, 1002, 1005, 1006, 1011, 1015, 3000, 3999, 5000] {
            assert!(!operator_code_allowed(bad), "{bad}");
        }
    }
}
