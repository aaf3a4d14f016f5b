//! Who the client is when wsgate sits behind other proxies: `[limits] trusted_proxies` lists
//! the networks whose `X-Forwarded-For` (or, without one, `Forwarded: for=`) is believed.
//! Pure: the server asks, the proxy route's request is built from the answer.
//!
//! - From a trusted peer, the client is the rightmost address in the chain that is not itself
//!   trusted (each trusted hop appended the address it saw), and the chain is passed on with
//!   the peer appended.
//! - From anyone else, the headers are not believed: the peer is the client, and the chain
//!   sent on is replaced by the peer alone (never appended to blindly).

use std::net::IpAddr;

use hyper::header::{HeaderMap, HeaderName};
use ipnet::IpNet;

use crate::protocol::handshake::header_tokens;

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const FORWARDED: HeaderName = HeaderName::from_static("forwarded");

/// The networks whose forwarding headers are believed (none by default), and whether peers on
/// unix-socket listeners are (the entry `"unix:"`, as nginx's `set_real_ip_from unix:`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies {
    pub nets: Vec<IpNet>,
    pub unix: bool,
}

impl TrustedProxies {
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.nets.iter().any(|net| net.contains(&ip))
    }

    /// Nothing listed: every peer may send a PROXY header (the listener's own setting).
    pub fn is_empty(&self) -> bool {
        self.nets.is_empty() && !self.unix
    }
}

/// IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) as the IPv4 address they are.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The addresses a request says it was forwarded for, leftmost (the original client) first:
/// `X-Forwarded-For` when present, else the `for=` parameters of `Forwarded` (RFC 7239).
/// Entries that are not addresses (`unknown`, obfuscated names) end the list there.
fn chain(headers: &HeaderMap) -> Vec<Option<IpAddr>> {
    if headers.contains_key(X_FORWARDED_FOR) {
        return header_tokens(headers, &X_FORWARDED_FOR)
            .map(parse_node)
            .collect();
    }
    header_tokens(headers, &FORWARDED)
        .flat_map(|element| element.split(';'))
        .filter_map(|pair| {
            let (key, value) = pair.trim().split_once('=')?;
            key.trim()
                .eq_ignore_ascii_case("for")
                .then(|| parse_node(value.trim().trim_matches('"')))
        })
        .collect()
}

/// An address as forwarding headers write it: `192.0.2.1`, `192.0.2.1:4711`, `2001:db8::1`,
/// `[2001:db8::1]` or `[2001:db8::1]:4711`.
fn parse_node(node: &str) -> Option<IpAddr> {
    if let Ok(ip) = node.parse() {
        return Some(ip);
    }
    if let Some(rest) = node.strip_prefix('[') {
        return rest.split_once(']')?.0.parse().ok();
    }
    let (host, port) = node.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    host.parse().ok()
}

/// The client a trusted peer's forwarding chain names (`peer_trusted`: the peer is in the
/// networks, or is a unix-socket peer with `"unix:"` listed): the rightmost address of the
/// chain that is not trusted (the leftmost when all are). `None` when the peer is not
/// trusted or names nobody: the peer is the client then.
pub fn forwarded_client(
    peer_trusted: bool,
    headers: &HeaderMap,
    trusted: &TrustedProxies,
) -> Option<IpAddr> {
    if !peer_trusted {
        return None;
    }
    let mut client = None;
    for node in chain(headers).into_iter().rev() {
        match node {
            Some(ip) => {
                client = Some(ip);
                if !trusted.contains(ip) {
                    break;
                }
            }
            // An entry we cannot read: nothing left of it can be believed.
            None => break,
        }
    }
    client
}

/// The `X-Forwarded-For` to send on: the incoming chain with `peer` appended when `peer` is
/// trusted, else `peer` alone.
pub fn forwarded_for(peer: IpAddr, headers: &HeaderMap, peer_trusted: bool) -> String {
    let peer = canonical(peer);
    let prior: Vec<&str> = header_tokens(headers, &X_FORWARDED_FOR).collect();
    if peer_trusted && !prior.is_empty() {
        format!("{}, {peer}", prior.join(", "))
    } else {
        peer.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The client behind a TCP peer (trusted when it is in the networks).
    fn client_via(peer: IpAddr, headers: &HeaderMap, trusted: &TrustedProxies) -> IpAddr {
        forwarded_client(trusted.contains(peer), headers, trusted).unwrap_or(peer)
    }

    fn trusted(nets: &[&str]) -> TrustedProxies {
        TrustedProxies {
            nets: nets.iter().map(|n| n.parse().unwrap()).collect(),
            unix: false,
        }
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn untrusted_peers_are_the_client_and_their_chain_is_replaced() {
        let h = headers(&[("x-forwarded-for", "6.6.6.6")]);
        let t = trusted(&["10.0.0.0/8"]);
        assert_eq!(client_via(ip("192.0.2.9"), &h, &t), ip("192.0.2.9"));
        assert_eq!(
            forwarded_for(ip("192.0.2.9"), &h, t.contains(ip("192.0.2.9"))),
            "192.0.2.9"
        );
        assert_eq!(
            client_via(ip("192.0.2.9"), &h, &TrustedProxies::default()),
            ip("192.0.2.9")
        );
    }

    #[test]
    fn trusted_peers_give_the_rightmost_untrusted_address() {
        let t = trusted(&["10.0.0.0/8", "::1/128"]);
        let h = headers(&[("x-forwarded-for", "6.6.6.6, 203.0.113.5, 10.1.1.1")]);
        assert_eq!(client_via(ip("10.0.0.2"), &h, &t), ip("203.0.113.5"));
        assert_eq!(
            forwarded_for(ip("10.0.0.2"), &h, t.contains(ip("10.0.0.2"))),
            "6.6.6.6, 203.0.113.5, 10.1.1.1, 10.0.0.2"
        );
        // Split over two header lines, IPv6 with brackets and ports.
        let h = headers(&[
            ("x-forwarded-for", "[2001:db8::5]:4711"),
            ("x-forwarded-for", "10.9.9.9"),
        ]);
        assert_eq!(client_via(ip("::1"), &h, &t), ip("2001:db8::5"));
        // All trusted: the leftmost.
        let h = headers(&[("x-forwarded-for", "10.1.1.1, 10.2.2.2")]);
        assert_eq!(client_via(ip("10.0.0.2"), &h, &t), ip("10.1.1.1"));
        // Garbage stops the walk: what is left of it is not believed.
        let h = headers(&[("x-forwarded-for", "203.0.113.5, bogus, 10.1.1.1")]);
        assert_eq!(client_via(ip("10.0.0.2"), &h, &t), ip("10.1.1.1"));
        // No header: the peer.
        assert_eq!(
            client_via(ip("10.0.0.2"), &HeaderMap::new(), &t),
            ip("10.0.0.2")
        );
    }

    #[test]
    fn forwarded_header_when_there_is_no_x_forwarded_for() {
        let t = trusted(&["10.0.0.0/8"]);
        let h = headers(&[(
            "forwarded",
            "for=198.51.100.17;proto=https, For=\"[2001:db8:cafe::17]:4711\"",
        )]);
        assert_eq!(client_via(ip("10.0.0.2"), &h, &t), ip("2001:db8:cafe::17"));
        let h = headers(&[("forwarded", "for=unknown")]);
        assert_eq!(client_via(ip("10.0.0.2"), &h, &t), ip("10.0.0.2"));
    }

    #[test]
    fn ipv4_mapped_peers_match_ipv4_networks() {
        let t = trusted(&["127.0.0.0/8"]);
        assert!(t.contains(ip("::ffff:127.0.0.1")));
        assert!(!t.contains(ip("::1")));
    }
}
