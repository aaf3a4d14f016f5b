//! Config parsing: defaults, every error naming its key and line, and each key's checks.

use super::*;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, "test.toml", Path::new("/etc/wsgate"))
}

const MINIMAL: &str =
    "[[listen]]\naddr = \"127.0.0.1:0\"\n[[route]]\npath = \"/\"\nbackend = \"echo\"\n";

#[test]
fn example_config_parses() {
    let text = include_str!("../../config.example.toml");
    let c = parse(text).unwrap();
    assert!(!c.listen.is_empty());
    assert!(c.routes.routes().len() >= 2);
}

#[test]
fn defaults_are_the_documented_ones() {
    let c = parse(MINIMAL).unwrap();
    assert_eq!(c.limits, Limits::default());
    assert_eq!(c.limits.max_message_size, 16 * 1024 * 1024);
}

#[test]
fn unknown_key_names_key_and_line() {
    let text = format!("{MINIMAL}[limits]\nidle_timout = \"5s\"\n");
    let err = parse(&text).unwrap_err().to_string();
    assert!(err.contains("line 7"), "{err}");
    assert!(err.contains("idle_timout"), "{err}");
}

#[test]
fn bad_values_name_key_and_line() {
    let text = format!("{MINIMAL}[limits]\nhandshake_timeout = \"10x\"\n");
    let err = parse(&text).unwrap_err().to_string();
    assert!(
        err.contains("line 7") && err.contains("handshake_timeout"),
        "{err}"
    );
    let text = format!("{MINIMAL}[limits]\nmax_message_size = \"lots\"\n");
    let err = parse(&text).unwrap_err().to_string();
    assert!(
        err.contains("line 7") && err.contains("max_message_size"),
        "{err}"
    );
    let text = "[[listen]]\naddr = \"127.0.0.1:0\"\n[[route]]\npath = \"/\"\nbackend = \"tcp://nowhere\"\n";
    let err = parse(text).unwrap_err().to_string();
    assert!(err.contains("line 5") && err.contains("backend"), "{err}");
    let text = format!("{MINIMAL}[[route]]\npath = \"/\"\nbackend = \"echo\"\n");
    let err = parse(&text).unwrap_err().to_string();
    assert!(err.contains("line 7") && err.contains("twice"), "{err}");
}

#[test]
fn trusted_proxies_take_networks_and_addresses_and_name_bad_ones() {
    let text = format!("{MINIMAL}[limits]\ntrusted_proxies = [\"10.0.0.0/8\", \"::1\"]\n");
    let c = parse(&text).unwrap();
    assert!(c
        .limits
        .trusted_proxies
        .contains("10.2.3.4".parse().unwrap()));
    assert!(c.limits.trusted_proxies.contains("::1".parse().unwrap()));
    assert!(!c
        .limits
        .trusted_proxies
        .contains("192.0.2.1".parse().unwrap()));
    let text = format!("{MINIMAL}[limits]\ntrusted_proxies = [\"10.0.0.0/33\"]\n");
    let err = parse(&text).unwrap_err().to_string();
    assert!(
        err.contains("line 7") && err.contains("trusted_proxies"),
        "{err}"
    );
}

#[test]
fn send_proxy_protocol_is_for_byte_stream_backends() {
    let ok = "[[listen]]\naddr = \"127.0.0.1:0\"\n[[route]]\npath = \"/\"\nbackend = \"tcp://127.0.0.1:1\"\nsend_proxy_protocol = \"v2\"\n";
    assert_eq!(
        parse(ok).unwrap().routes.routes()[0].send_proxy_protocol,
        Some(ProxyVersion::V2)
    );
    let echo = format!("{MINIMAL}send_proxy_protocol = \"v1\"\n");
    let err = parse(&echo).unwrap_err().to_string();
    assert!(
        err.contains("line 6") && err.contains("send_proxy_protocol"),
        "{err}"
    );
    let bad = ok.replace("\"v2\"", "\"v3\"");
    let err = parse(&bad).unwrap_err().to_string();
    assert!(err.contains("line 6") && err.contains("v3"), "{err}");
}

#[test]
fn backend_lists_and_balance_are_checked() {
    let route = |backend: &str, extra: &str| {
        format!("[[listen]]\naddr = \"127.0.0.1:0\"\n[[route]]\npath = \"/\"\nbackend = {backend}\n{extra}")
    };
    let c = parse(&route(
        "[\"tcp://a:1\", \"tcp://b:2\"]",
        "balance = \"least_connections\"\neject_for = \"2s\"\n",
    ))
    .unwrap();
    let r = &c.routes.routes()[0];
    assert_eq!(r.backends.len(), 2);
    assert_eq!(r.balance, Balance::LeastConnections);
    assert_eq!(r.eject_for, Duration::from_secs(2));
    for (backend, extra, needle) in [
        ("[]", "", "empty"),
        ("[\"tcp://a:1\", \"ws://b:2\"]", "", "not both"),
        ("[\"echo\", \"tcp://b:2\"]", "", "no echo"),
        ("[\"tcp://a:1\"]", "balance = \"random\"\n", "random"),
    ] {
        let err = parse(&route(backend, extra)).unwrap_err().to_string();
        assert!(err.contains("line ") && err.contains(needle), "{err}");
    }
}

#[test]
fn durations_and_sizes() {
    assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
    assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
    assert!(parse_duration("5").is_err());
    assert!(parse_duration("s").is_err());
    assert_eq!(parse_size("16MiB"), Ok(16 << 20));
    assert_eq!(parse_size("1KB"), Ok(1000));
    assert_eq!(parse_size("42"), Ok(42));
    assert!(parse_size("1TiB").is_err());
}

#[test]
fn quick_mode_is_one_route_to_tcp() {
    let args = QuickArgs {
        listen: "127.0.0.1:8080".into(),
        target: Some("127.0.0.1:5900".into()),
        ..QuickArgs::default()
    };
    let c = args.to_config().unwrap();
    assert_eq!(
        c.routes.routes()[0].backend,
        Backend::Tcp("127.0.0.1:5900".into())
    );
    let bad = QuickArgs {
        listen: "nope".into(),
        ..args
    };
    assert!(bad.to_config().is_err());
}

#[test]
fn a_listen_address_twice_is_refused_port_0_included() {
    for addr in ["127.0.0.1:8080", "127.0.0.1:0"] {
        let text = format!(
            "[[listen]]\naddr = \"{addr}\"\n[[listen]]\naddr = \"{addr}\"\n[[route]]\npath = \"/\"\nbackend = \"echo\"\n"
        );
        let err = Config::parse(&text, "t.toml", Path::new("."))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("line 4") && err.contains("listed twice"),
            "{err}"
        );
    }
    let two = "[[listen]]\naddr = \"127.0.0.1:0\"\n[[listen]]\naddr = \"127.0.0.2:0\"\n[[route]]\npath = \"/\"\nbackend = \"echo\"\n";
    assert_eq!(
        Config::parse(two, "t.toml", Path::new("."))
            .unwrap()
            .listen
            .len(),
        2
    );
}
