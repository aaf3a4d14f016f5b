//! Token targets, compatible with websockify's `TokenFile` plugin: `backend =
//! "token-file:PATH"`, where PATH is a file, or a directory of files, with lines
//! `token: host:port`. Blank lines and lines starting with `#` are skipped; a line that is
//! not `token: host:port` (or not UTF-8) is skipped with a warning naming its file and line
//! (never its text, which holds a token), and the file's other lines still count. CRLF line
//! ends and a UTF-8 byte order mark are taken as editors write them. In a directory, a file
//! that cannot be read is skipped with a warning; the others still answer.
//!
//! Like websockify's `TokenFile` (not `ReadOnlyTokenFile`), edits are seen by the next
//! connection without a restart: each lookup checks the files' modification times and sizes
//! and reads them again when they changed. Live sessions keep the target they started with.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tracing::warn;

/// One token source and the targets last read from it.
#[derive(Debug)]
pub struct TokenFile {
    source: PathBuf,
    loaded: Mutex<Option<Loaded>>,
}

#[derive(Debug)]
struct Loaded {
    stamp: Vec<Stamp>,
    targets: Arc<HashMap<String, String>>,
}

/// What tells a changed file: its path, modification time and size.
type Stamp = (PathBuf, Option<SystemTime>, u64);

impl TokenFile {
    /// Checks that the source can be read now (a typo in the path stops wsgate at start).
    pub fn open(source: &Path) -> io::Result<TokenFile> {
        let file = TokenFile {
            source: source.to_owned(),
            loaded: Mutex::new(None),
        };
        file.targets()?;
        Ok(file)
    }

    pub fn source(&self) -> &Path {
        &self.source
    }

    /// The `host:port` the token maps to, as the files say now. Reads the file system: call
    /// it off the async workers (`spawn_blocking`).
    pub fn lookup(&self, token: &str) -> io::Result<Option<String>> {
        Ok(self.targets()?.get(token).cloned())
    }

    fn targets(&self) -> io::Result<Arc<HashMap<String, String>>> {
        let files = self.files()?;
        let stamp: Vec<Stamp> = files
            .iter()
            .map(|f| {
                let meta = std::fs::metadata(f).ok();
                (
                    f.clone(),
                    meta.as_ref().and_then(|m| m.modified().ok()),
                    meta.map_or(0, |m| m.len()),
                )
            })
            .collect();
        // A panic elsewhere while the lock was held must not make every later lookup fail.
        let mut loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(l) = loaded.as_ref() {
            if l.stamp == stamp {
                return Ok(l.targets.clone());
            }
        }
        let mut targets = HashMap::new();
        let single = !self.source.is_dir();
        for f in &files {
            let bytes = match std::fs::read(f) {
                Ok(b) => b,
                Err(e) if single => return Err(e),
                Err(e) => {
                    warn!(file = %f.display(), error = %e, "token file cannot be read; skipped");
                    continue;
                }
            };
            for line in parse(&bytes, &mut targets) {
                warn!(file = %f.display(), line, "token file: not `token: host:port`; line skipped");
            }
        }
        let targets = Arc::new(targets);
        *loaded = Some(Loaded {
            stamp,
            targets: targets.clone(),
        });
        Ok(targets)
    }

    /// The source itself, or the files in the source directory (sorted, so a token listed
    /// twice resolves the same way every time: the last file wins).
    fn files(&self) -> io::Result<Vec<PathBuf>> {
        if !self.source.is_dir() {
            std::fs::metadata(&self.source)?;
            return Ok(vec![self.source.clone()]);
        }
        let mut files = Vec::new();
        for entry in std::fs::read_dir(&self.source)? {
            let path = entry?.path();
            if path.is_file() {
                files.push(path);
            }
        }
        files.sort();
        Ok(files)
    }
}

/// Adds the `token: host:port` lines of `bytes` to `targets`; returns the numbers of the
/// lines that are neither that, blank nor a comment (lines that are not UTF-8 included).
pub fn parse(bytes: &[u8], targets: &mut HashMap<String, String>) -> Vec<usize> {
    let mut bad = Vec::new();
    for (n, line) in operator_lines(bytes) {
        match line.map(parse_line) {
            Some(Some((token, target))) => {
                targets.insert(token.to_owned(), target.to_owned());
            }
            _ => bad.push(n),
        }
    }
    bad
}

/// The lines of a file an operator wrote (token files, htpasswd, bearer tokens), numbered
/// from 1, trimmed, without blank lines and `#` comments; `None` for a line that is not
/// UTF-8. A leading byte order mark and CRLF line ends are taken as editors write them.
pub(crate) fn operator_lines(bytes: &[u8]) -> impl Iterator<Item = (usize, Option<&str>)> {
    let bytes = bytes.strip_prefix("\u{feff}".as_bytes()).unwrap_or(bytes);
    bytes
        .split(|&b| b == b'\n')
        .enumerate()
        .map(|(n, line)| (n + 1, std::str::from_utf8(line).ok().map(str::trim)))
        .filter(|(_, line)| !line.is_some_and(|l| l.is_empty() || l.starts_with('#')))
}

/// `token: host:port` (the separator is a colon and one whitespace character, as websockify
/// splits it; exactly one separator per line). Indices are taken from the characters
/// themselves: a separator such as U+00A0 or U+3000 is more than one byte.
fn parse_line(line: &str) -> Option<(&str, &str)> {
    let mut seps = line
        .char_indices()
        .zip(line.chars().skip(1))
        .filter(|((_, c), next)| *c == ':' && next.is_whitespace())
        .map(|((i, _), next)| (i, i + 1 + next.len_utf8()));
    let (sep, after) = seps.next()?;
    if seps.next().is_some() {
        return None;
    }
    let token = &line[..sep];
    let target = line[after..].trim();
    let (host, port) = target.rsplit_once(':')?;
    if token.is_empty() || host.is_empty() || port.parse::<u16>().is_err() {
        return None;
    }
    Some((token, target))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn websockify_format() {
        let mut t = HashMap::new();
        let bad = parse(
            b"# comment\n\nvnc1: 127.0.0.1:5901\n  vnc2:\t[::1]:5902  \nbroken\nno-port: host\nx: a: b:1\n",
            &mut t,
        );
        assert_eq!(t.get("vnc1").map(String::as_str), Some("127.0.0.1:5901"));
        assert_eq!(t.get("vnc2").map(String::as_str), Some("[::1]:5902"));
        assert_eq!(t.len(), 2);
        assert_eq!(bad, vec![5, 6, 7]);
    }

    /// Regression: `vm1:<U+00A0>127.0.0.1:5900` sliced a character in two and panicked (with
    /// the line in the message), poisoning the lock for every later lookup.
    #[test]
    fn odd_bytes_in_a_token_file_never_panic_nor_break_good_lines() {
        let mut t = HashMap::new();
        let text =
            "\u{feff}good: 127.0.0.1:1\r\nvm1:\u{a0}127.0.0.1:5900\nvm2:\u{3000}127.0.0.1:5901\n\
                    \u{3000}:\u{3000}\nx:\u{a0}\n";
        let mut bytes = text.as_bytes().to_vec();
        bytes.extend_from_slice(b"bad\xff\xfe: 127.0.0.1:2\n");
        bytes.extend_from_slice(&[b'a'; 100_000]);
        bytes.extend_from_slice(b"\nlast: 127.0.0.1:3");
        let bad = parse(&bytes, &mut t);
        assert_eq!(t.get("good").map(String::as_str), Some("127.0.0.1:1"));
        assert_eq!(t.get("vm1").map(String::as_str), Some("127.0.0.1:5900"));
        assert_eq!(t.get("vm2").map(String::as_str), Some("127.0.0.1:5901"));
        assert_eq!(t.get("last").map(String::as_str), Some("127.0.0.1:3"));
        assert_eq!(bad, vec![4, 5, 6, 7]);
    }

    #[test]
    fn a_file_with_invalid_utf8_in_a_folder_breaks_no_other_token() {
        let dir = std::env::temp_dir().join(format!("wsgate-tokens-utf8-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a"), "one: 127.0.0.1:1\n").unwrap();
        std::fs::write(dir.join("b"), b"\xff\xfe\x00garbage\ntwo: 127.0.0.1:2\n").unwrap();
        let tokens = TokenFile::open(&dir).unwrap();
        assert_eq!(
            tokens.lookup("one").unwrap().as_deref(),
            Some("127.0.0.1:1")
        );
        assert_eq!(
            tokens.lookup("two").unwrap().as_deref(),
            Some("127.0.0.1:2")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn edits_and_directories_are_read_again() {
        let dir = std::env::temp_dir().join(format!("wsgate-tokens-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a"), "one: 127.0.0.1:1\n").unwrap();
        let tokens = TokenFile::open(&dir).unwrap();
        assert_eq!(
            tokens.lookup("one").unwrap().as_deref(),
            Some("127.0.0.1:1")
        );
        assert_eq!(tokens.lookup("two").unwrap(), None);
        std::fs::write(dir.join("b"), "two: 127.0.0.1:2\n").unwrap();
        assert_eq!(
            tokens.lookup("two").unwrap().as_deref(),
            Some("127.0.0.1:2")
        );
        // Same size, new content: the modification time tells.
        std::fs::write(dir.join("a"), "one: 127.0.0.1:3\n").unwrap();
        let file = std::fs::File::options()
            .write(true)
            .open(dir.join("a"))
            .unwrap();
        file.set_modified(SystemTime::now() + std::time::Duration::from_secs(5))
            .unwrap();
        assert_eq!(
            tokens.lookup("one").unwrap().as_deref(),
            Some("127.0.0.1:3")
        );
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(TokenFile::open(&dir).is_err());
    }
}
