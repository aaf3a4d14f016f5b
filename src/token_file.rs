//! Token targets, compatible with websockify's `TokenFile` plugin: `backend =
//! "token-file:PATH"`, where PATH is a file, or a directory of files, with lines
//! `token: host:port`. Blank lines and lines starting with `#` are skipped; a line that is
//! not `token: host:port` is skipped with a warning naming its file and line (never its
//! text, which holds a token).
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
        let mut loaded = self.loaded.lock().unwrap();
        if let Some(l) = loaded.as_ref() {
            if l.stamp == stamp {
                return Ok(l.targets.clone());
            }
        }
        let mut targets = HashMap::new();
        for f in &files {
            let text = std::fs::read_to_string(f)?;
            for line in parse(&text, &mut targets) {
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

/// Adds the `token: host:port` lines of `text` to `targets`; returns the numbers of the lines
/// that are neither that, blank nor a comment.
fn parse(text: &str, targets: &mut HashMap<String, String>) -> Vec<usize> {
    let mut bad = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match parse_line(line) {
            Some((token, target)) => {
                targets.insert(token.to_owned(), target.to_owned());
            }
            None => bad.push(n + 1),
        }
    }
    bad
}

/// `token: host:port` (the separator is a colon and one whitespace character, as websockify
/// splits it; exactly one separator per line).
fn parse_line(line: &str) -> Option<(&str, &str)> {
    let mut seps = line
        .char_indices()
        .zip(line.chars().skip(1))
        .filter(|((_, c), next)| *c == ':' && next.is_whitespace())
        .map(|((i, _), _)| i);
    let sep = seps.next()?;
    if seps.next().is_some() {
        return None;
    }
    let token = &line[..sep];
    let target = line[sep + 2..].trim();
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
            "# comment\n\nvnc1: 127.0.0.1:5901\n  vnc2:\t[::1]:5902  \nbroken\nno-port: host\nx: a: b:1\n",
            &mut t,
        );
        assert_eq!(t.get("vnc1").map(String::as_str), Some("127.0.0.1:5901"));
        assert_eq!(t.get("vnc2").map(String::as_str), Some("[::1]:5902"));
        assert_eq!(t.len(), 2);
        assert_eq!(bad, vec![5, 6, 7]);
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
