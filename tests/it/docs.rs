//! The reference cannot drift from the code: every config key the parser accepts is in
//! docs/configuration.md (the keys are found by asking the parser itself, not from a list kept
//! by hand), every metric the process exports is in docs/operations.md, every relative link in
//! README.md and docs/ reaches a file and heading that exist, and every example config in the
//! repository passes `--check-config`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::*;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn read(path: &str) -> String {
    std::fs::read_to_string(Path::new(ROOT).join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The keys the parser expected where it met an unknown one in `text` (serde names every
/// field a table accepts), or `None` when `text` did not fail that way.
fn expected_keys(text: &str) -> Option<Vec<String>> {
    let err = match wsgate::Config::parse(text, "probe.toml", Path::new("/nonexistent")) {
        Ok(_) => return None,
        Err(e) => e.to_string(),
    };
    let (_, expected) = err.split_once("unknown field `wsgate_probe_unknown_key`")?;
    let keys: Vec<String> = expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect();
    assert!(!keys.is_empty(), "no keys listed in: {err}");
    Some(keys)
}

/// The TOML value for `path[depth]` that holds `leaf` at the end of `path`; the keys in
/// `arrays` are arrays of tables.
fn value_of(path: &[String], depth: usize, arrays: &BTreeSet<String>, leaf: &str) -> String {
    if depth + 1 == path.len() {
        return leaf.to_owned();
    }
    let inner = format!(
        "{{ {} = {} }}",
        path[depth + 1],
        value_of(path, depth + 1, arrays, leaf)
    );
    if arrays.contains(&path[..=depth].join(".")) {
        format!("[{inner}]")
    } else {
        inner
    }
}

/// Every dotted key path the config parser accepts: the top level's keys from the parser's
/// refusal of an unknown one, then each key probed with an unknown key inside it, as a table
/// and as an array of tables, down to the leaves.
fn accepted_keys() -> BTreeSet<String> {
    const TABLE: &str = "{ wsgate_probe_unknown_key = 1 }";
    const ARRAY: &str = "[{ wsgate_probe_unknown_key = 1 }]";
    let mut found = BTreeSet::new();
    let mut arrays = BTreeSet::new();
    let root = expected_keys("wsgate_probe_unknown_key = 1\n").expect("the top level is a table");
    let mut queue: Vec<Vec<String>> = root.into_iter().map(|k| vec![k]).collect();
    let mut rounds = 0;
    while let Some(path) = queue.pop() {
        rounds += 1;
        assert!(rounds < 500, "the probe ends");
        let dotted = path.join(".");
        found.insert(dotted.clone());
        let probe = |leaf: &str, arrays: &BTreeSet<String>| {
            expected_keys(&format!(
                "{} = {}\n",
                path[0],
                value_of(&path, 0, arrays, leaf)
            ))
        };
        let keys = match probe(TABLE, &arrays) {
            Some(keys) => Some(keys),
            None => probe(ARRAY, &arrays).inspect(|_| {
                arrays.insert(dotted.clone());
            }),
        };
        for key in keys.into_iter().flatten() {
            let mut child = path.clone();
            child.push(key);
            queue.push(child);
        }
    }
    found
}

#[test]
fn every_config_key_the_parser_accepts_is_in_the_configuration_reference() {
    let keys = accepted_keys();
    for expected in [
        "listen.addr",
        "listen.tls.cert",
        "limits.send_timeout",
        "route.auth.basic",
    ] {
        assert!(
            keys.contains(expected),
            "the probe finds {expected}: {keys:?}"
        );
    }
    let doc = read("docs/configuration.md");
    // A table may be named as its header: `[limits]`, `[[route]]`.
    let named = |k: &String| {
        [format!("`{k}`"), format!("`[{k}]`"), format!("`[[{k}]]`")]
            .iter()
            .any(|form| doc.contains(form))
    };
    let missing: Vec<&String> = keys.iter().filter(|k| !named(k)).collect();
    assert!(
        missing.is_empty(),
        "docs/configuration.md lacks (as `dotted.key`): {missing:?}"
    );
}

#[test]
fn every_metric_the_process_exports_is_in_the_operations_reference() {
    let names = wsgate::metric_names();
    assert!(names.len() > 10, "{names:?}");
    let doc = read("docs/operations.md");
    let missing: Vec<&String> = names
        .iter()
        .filter(|n| !doc.contains(&format!("`{n}")))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/operations.md lacks these metrics: {missing:?}"
    );
}

/// GitHub's anchor for a heading: lower-cased, punctuation other than `-` and `_` dropped,
/// spaces made hyphens.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

fn anchors(text: &str) -> BTreeSet<String> {
    let mut fenced = false;
    let mut out = BTreeSet::new();
    for line in text.lines() {
        if line.starts_with("```") {
            fenced = !fenced;
        }
        if !fenced && line.starts_with('#') {
            out.insert(anchor(line.trim_start_matches('#')));
        }
    }
    out
}

/// The `(target)` of every `[text](target)` outside code blocks and spans.
fn links(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut fenced = false;
    for line in text.lines() {
        if line.starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            continue;
        }
        // Code spans hold no links.
        let plain: String = line.split('`').step_by(2).collect::<Vec<_>>().join(" ");
        let mut rest = plain.as_str();
        while let Some(i) = rest.find("](") {
            let after = &rest[i + 2..];
            match after.find(')') {
                Some(j) => {
                    out.push(after[..j].to_owned());
                    rest = &after[j..];
                }
                None => break,
            }
        }
    }
    out
}

#[test]
fn every_relative_link_in_the_docs_reaches_a_file_and_heading() {
    let mut pages: Vec<PathBuf> = vec![PathBuf::from("README.md")];
    for entry in std::fs::read_dir(Path::new(ROOT).join("docs")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "md") {
            pages.push(path.strip_prefix(ROOT).unwrap().to_owned());
        }
    }
    let mut checked = 0;
    let mut broken = Vec::new();
    for page in &pages {
        let text = read(page.to_str().unwrap());
        let dir = page.parent().unwrap_or(Path::new(""));
        for link in links(&text) {
            if link.contains("://") || link.starts_with("mailto:") {
                continue;
            }
            let (file, heading) = link.split_once('#').unwrap_or((&link, ""));
            let target = if file.is_empty() {
                page.clone()
            } else {
                dir.join(file)
            };
            checked += 1;
            let full = Path::new(ROOT).join(&target);
            if !full.exists() {
                broken.push(format!(
                    "{}: {link} (no file {})",
                    page.display(),
                    target.display()
                ));
                continue;
            }
            if !heading.is_empty() {
                let text = std::fs::read_to_string(&full).unwrap_or_default();
                if !anchors(&text).contains(heading) {
                    broken.push(format!(
                        "{}: {link} (no heading #{heading})",
                        page.display()
                    ));
                }
            }
        }
    }
    assert!(checked > 20, "only {checked} links found");
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

#[test]
fn the_anchor_rule_is_githubs() {
    assert_eq!(
        anchor(" Static pages on a route (`static = \"DIR\"`)"),
        "static-pages-on-a-route-static--dir"
    );
    assert_eq!(anchor(" One canonical path"), "one-canonical-path");
    assert_eq!(
        links("see [a](b.md#c) and `[x](y)` [d](e)"),
        ["b.md#c", "e"]
    );
}

#[test]
fn every_example_config_passes_check_config() {
    let mut configs = vec![Path::new(ROOT).join("config.example.toml")];
    for dir in ["examples", "deploy"] {
        let mut stack = vec![Path::new(ROOT).join(dir)];
        while let Some(d) = stack.pop() {
            for entry in std::fs::read_dir(&d).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() && !path.ends_with("node_modules") {
                    stack.push(path);
                } else if path.extension().is_some_and(|e| e == "toml") {
                    configs.push(path);
                }
            }
        }
    }
    assert!(configs.len() >= 5, "{configs:?}");
    for config in configs {
        let out = output_within(
            Command::new(env!("CARGO_BIN_EXE_wsgate"))
                .arg("--check-config")
                .arg(&config),
            WAIT,
        );
        assert!(
            out.status.success(),
            "{}: {}",
            config.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The example's `/vnc` route takes stock noVNC, which offers no subprotocol (as websockify
/// does): the answer is the backend's absence (502), never a 400 for the subprotocol.
#[tokio::test]
async fn the_example_configs_vnc_route_takes_a_client_offering_no_subprotocol() {
    let text = read("config.example.toml").replace("127.0.0.1:8080", "127.0.0.1:0");
    let vnc = unused_addr();
    let text = text.replace("tcp://127.0.0.1:5900", &format!("tcp://{vnc}"));
    let gate = Gate::start(&text).await;
    let r = raw_request(gate.addr, upgrade_request("/vnc", "").as_bytes()).await;
    assert_eq!(r.status, 502, "{r:?}");
    let echo = echo_backend().await;
    let text = read("config.example.toml")
        .replace("127.0.0.1:8080", "127.0.0.1:0")
        .replace("tcp://127.0.0.1:5900", &format!("tcp://{echo}"));
    let gate = Gate::start(&text).await;
    let (r, _s) = upgrade_head(gate.addr, upgrade_request("/vnc", "").as_bytes()).await;
    assert_eq!(r.status, 101, "{r:?}");
}
