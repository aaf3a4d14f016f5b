//! Per-client and per-route limits: connections from one client address
//! (`max_connections_per_ip`), handshakes one client address may start
//! (`handshakes_per_ip_per_second` with `handshakes_per_ip_burst`, a token bucket), and a
//! route's own `max_connections`. IPv6 clients count per network (`per_ip_ipv6_prefix`, /64 by
//! default), since one host holds a whole /64.
//!
//! The client is the one the request names (the PROXY header's source, or a trusted proxy's
//! chain), so these are checked when a request head arrives, before any backend connect.
//! The tables hold only clients with something open or a bucket not yet full again, so their
//! size follows the traffic, not the history.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::config::Limits;

/// A limit a request is over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum OverLimit {
    /// The client address has `max_connections_per_ip` open: 503.
    ClientConnections,
    /// The client address started handshakes too fast: 429, retry after this long.
    ClientRate(Duration),
    /// The route has its `max_connections` open: 503.
    RouteConnections,
}

impl OverLimit {
    pub(super) fn label(self) -> &'static str {
        match self {
            OverLimit::ClientConnections => "per_ip_connections",
            OverLimit::ClientRate(_) => "per_ip_rate",
            OverLimit::RouteConnections => "route_connections",
        }
    }
}

/// One client address's token bucket.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

#[derive(Default)]
struct Tables {
    per_client: HashMap<IpAddr, usize>,
    per_route: HashMap<String, usize>,
    buckets: HashMap<IpAddr, Bucket>,
}

/// The counts behind the limits, shared by every connection of the process.
#[derive(Default)]
pub(super) struct ClientLimits {
    tables: Mutex<Tables>,
}

/// A place taken under a connection limit; given back when dropped.
pub(super) struct Held {
    limits: Arc<ClientLimits>,
    /// Whom and which route it was taken for (a keep-alive connection's next request for
    /// another client or route takes a place of its own).
    ip: IpAddr,
    route: Arc<str>,
    /// The per-client count it holds (the client's key), when that limit is set.
    client_counted: Option<IpAddr>,
    /// Whether it holds a place in the route's count (the route has `max_connections`).
    route_counted: bool,
}

impl Held {
    /// Whether this place is the one a request from `client` to `route` needs.
    pub(super) fn is_for(&self, client: IpAddr, route: &str) -> bool {
        self.ip == client && &*self.route == route
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut t = self.limits.tables.lock().unwrap();
        if let Some(key) = self.client_counted {
            release(&mut t.per_client, &key);
        }
        if self.route_counted {
            release(&mut t.per_route, &*self.route);
        }
    }
}

fn release<K, Q>(map: &mut HashMap<K, usize>, key: &Q)
where
    K: std::borrow::Borrow<Q> + std::hash::Hash + Eq,
    Q: std::hash::Hash + Eq + ?Sized,
{
    if let Some(n) = map.get_mut(key) {
        *n -= 1;
        if *n == 0 {
            map.remove(key);
        }
    }
}

/// The address a client is counted under: itself, or its IPv6 network.
fn client_key(ip: IpAddr, v6_prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let bits = u128::from(v6);
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(v6_prefix.min(128)))
                    .unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(bits & mask))
            }
        },
        v4 => v4,
    }
}

impl ClientLimits {
    /// Takes one handshake token for `client`; over the rate, how long until one is there.
    pub(super) fn handshake(&self, client: IpAddr, limits: &Limits) -> Result<(), OverLimit> {
        let Some(rate) = limits.handshakes_per_ip_per_second else {
            return Ok(());
        };
        let rate = f64::from(rate);
        let burst = f64::from(limits.handshakes_per_ip_burst.unwrap_or(rate as u32).max(1));
        let key = client_key(client, limits.per_ip_ipv6_prefix);
        let now = Instant::now();
        let mut t = self.tables.lock().unwrap();
        if t.buckets.len() >= 4096 {
            // Buckets that have filled up again say nothing: drop them.
            t.buckets.retain(|_, b| {
                b.tokens + now.duration_since(b.updated).as_secs_f64() * rate < burst
            });
        }
        let bucket = t.buckets.entry(key).or_insert(Bucket {
            tokens: burst,
            updated: now,
        });
        let refill = now.duration_since(bucket.updated).as_secs_f64() * rate;
        bucket.tokens = (bucket.tokens + refill).min(burst);
        bucket.updated = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            let wait = (1.0 - bucket.tokens) / rate;
            Err(OverLimit::ClientRate(Duration::from_secs_f64(wait)))
        }
    }

    /// Gives back a token [`ClientLimits::handshake`] took (a credential check that passed
    /// on a page request: good credentials never run out).
    pub(super) fn give_back(&self, client: IpAddr, limits: &Limits) {
        let Some(rate) = limits.handshakes_per_ip_per_second else {
            return;
        };
        let burst = f64::from(limits.handshakes_per_ip_burst.unwrap_or(rate).max(1));
        let key = client_key(client, limits.per_ip_ipv6_prefix);
        let mut t = self.tables.lock().unwrap();
        if let Some(bucket) = t.buckets.get_mut(&key) {
            bucket.tokens = (bucket.tokens + 1.0).min(burst);
        }
    }

    /// Takes a place for `client` and for `route` under their connection limits.
    pub(super) fn hold(
        self: &Arc<Self>,
        ip: IpAddr,
        route_path: &Arc<str>,
        route_max: Option<usize>,
        limits: &Limits,
    ) -> Result<Held, OverLimit> {
        let mut t = self.tables.lock().unwrap();
        let client = match limits.max_connections_per_ip {
            Some(max) => {
                let key = client_key(ip, limits.per_ip_ipv6_prefix);
                if t.per_client.get(&key).copied().unwrap_or(0) >= max {
                    return Err(OverLimit::ClientConnections);
                }
                Some(key)
            }
            None => None,
        };
        let route_counted = match route_max {
            Some(max) => {
                // One lookup: the count checked, then taken. The path is copied only when the
                // route has no place taken yet.
                let taken = t.per_route.get_mut(&**route_path);
                if taken.as_deref().map_or(0, |n| *n) >= max {
                    return Err(OverLimit::RouteConnections);
                }
                match taken {
                    Some(n) => *n += 1,
                    None => {
                        t.per_route.insert(route_path.to_string(), 1);
                    }
                }
                true
            }
            None => false,
        };
        if let Some(key) = client {
            *t.per_client.entry(key).or_insert(0) += 1;
        }
        Ok(Held {
            limits: self.clone(),
            ip,
            route: route_path.clone(),
            client_counted: client,
            route_counted,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_connections_per_ip: Some(2),
            handshakes_per_ip_per_second: Some(10),
            handshakes_per_ip_burst: Some(3),
            ..Limits::default()
        }
    }

    #[test]
    fn ipv6_clients_count_per_prefix() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(client_key(a, 64), client_key(b, 64));
        assert_ne!(client_key(a, 64), client_key(c, 64));
        assert_ne!(client_key(a, 128), client_key(b, 128));
        assert_eq!(
            client_key("::ffff:192.0.2.1".parse().unwrap(), 64),
            "192.0.2.1".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn connections_per_client_and_route_are_released() {
        let l = Arc::new(ClientLimits::default());
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let one = l.hold(ip, &"/a".into(), Some(3), &limits()).unwrap();
        let two = l.hold(ip, &"/a".into(), Some(3), &limits()).unwrap();
        assert_eq!(
            l.hold(ip, &"/a".into(), Some(3), &limits()).err(),
            Some(OverLimit::ClientConnections)
        );
        let other = l
            .hold(
                "192.0.2.2".parse().unwrap(),
                &"/a".into(),
                Some(3),
                &limits(),
            )
            .unwrap();
        assert_eq!(
            l.hold(
                "192.0.2.3".parse().unwrap(),
                &"/a".into(),
                Some(3),
                &limits()
            )
            .err(),
            Some(OverLimit::RouteConnections)
        );
        drop((one, two, other));
        assert!(l.tables.lock().unwrap().per_client.is_empty());
        assert!(l.tables.lock().unwrap().per_route.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn handshake_rate_is_a_token_bucket() {
        let l = ClientLimits::default();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        for _ in 0..3 {
            assert_eq!(l.handshake(ip, &limits()), Ok(()));
        }
        let Err(OverLimit::ClientRate(wait)) = l.handshake(ip, &limits()) else {
            panic!("over the burst");
        };
        assert!(wait <= Duration::from_millis(100), "{wait:?}");
        tokio::time::advance(Duration::from_millis(100)).await;
        assert_eq!(l.handshake(ip, &limits()), Ok(()));
        assert!(l.handshake(ip, &limits()).is_err());
        // Another client has its own bucket.
        assert_eq!(l.handshake("192.0.2.2".parse().unwrap(), &limits()), Ok(()));
    }
}
