//! Where log lines go: stderr, through a buffer that a thread of its own writes out every
//! [`FLUSH_EVERY`] (or sooner, once [`FLUSH_AT`] bytes are waiting).
//!
//! A gateway opening thousands of sessions a second logs two lines for each; written one by
//! one, each line is a `write` on the session's own thread and, behind a pipe, a wake-up of
//! whoever reads it. Buffered, a busy second costs ten writes. A line waits at most
//! `FLUSH_EVERY` before it is written (nginx's `access_log … flush=` does the same), and
//! nothing is dropped: past [`HOLD_AT_MOST`] bytes the logging thread writes the buffer out
//! itself, so a stderr that does not drain slows the gateway as unbuffered writes would,
//! rather than growing memory. What is buffered is written when the [`Flusher`] is dropped
//! (main's return).

use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

/// The longest a line waits in the buffer.
pub const FLUSH_EVERY: Duration = Duration::from_millis(100);
/// Bytes waiting that wake the writer thread early.
pub const FLUSH_AT: usize = 64 * 1024;
/// Bytes waiting past which the logging thread writes them out itself.
pub const HOLD_AT_MOST: usize = 1024 * 1024;

#[derive(Default)]
struct Buffer {
    bytes: Vec<u8>,
    closed: bool,
}

struct Shared<W> {
    buffer: Mutex<Buffer>,
    wake: Condvar,
    out: Mutex<W>,
}

impl<W: Write> Shared<W> {
    fn lock(&self) -> MutexGuard<'_, Buffer> {
        self.buffer.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_out(&self) -> MutexGuard<'_, W> {
        self.out.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes `bytes` out (errors are dropped: there is nowhere left to report them).
    fn write_out(&self, bytes: &[u8]) {
        write_to(&mut *self.lock_out(), bytes);
    }
}

fn write_to<W: Write>(out: &mut W, bytes: &[u8]) {
    let _ = out.write_all(bytes);
    let _ = out.flush();
}

/// The handle log lines are written to (a `MakeWriter` for tracing-subscriber).
pub struct LogWriter<W: Write + Send + 'static> {
    shared: Arc<Shared<W>>,
}

impl<W: Write + Send + 'static> Clone for LogWriter<W> {
    fn clone(&self) -> Self {
        LogWriter {
            shared: self.shared.clone(),
        }
    }
}

/// Writes out what is buffered and stops the writer thread when dropped.
pub struct Flusher<W: Write + Send + 'static> {
    shared: Arc<Shared<W>>,
    thread: Option<JoinHandle<()>>,
}

/// A buffered log writer over `out`, and the guard that flushes it.
pub fn buffered<W: Write + Send + 'static>(out: W) -> (LogWriter<W>, Flusher<W>) {
    let shared = Arc::new(Shared {
        buffer: Mutex::new(Buffer::default()),
        wake: Condvar::new(),
        out: Mutex::new(out),
    });
    let thread = {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name("wsgate-log".into())
            .spawn(move || loop {
                let mut buffer = shared.lock();
                if buffer.bytes.len() < FLUSH_AT && !buffer.closed {
                    buffer = shared
                        .wake
                        .wait_timeout(buffer, FLUSH_EVERY)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
                let bytes = std::mem::take(&mut buffer.bytes);
                let closed = buffer.closed;
                // The output is taken before the buffer is let go (the order every writer
                // locks in), so a logging thread that writes out past HOLD_AT_MOST cannot put
                // newer lines ahead of these.
                let mut out = shared.lock_out();
                drop(buffer);
                if !bytes.is_empty() {
                    write_to(&mut *out, &bytes);
                }
                drop(out);
                if closed {
                    return;
                }
            })
            .expect("spawning the log writer thread")
    };
    (
        LogWriter {
            shared: shared.clone(),
        },
        Flusher {
            shared,
            thread: Some(thread),
        },
    )
}

impl<W: Write + Send + 'static> Write for LogWriter<W> {
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        let mut buffer = self.shared.lock();
        if buffer.closed {
            drop(buffer);
            self.shared.write_out(line);
            return Ok(line.len());
        }
        buffer.bytes.extend_from_slice(line);
        if buffer.bytes.len() >= HOLD_AT_MOST {
            // The writer thread is not keeping up: write out here, in order, under the lock.
            let bytes = std::mem::take(&mut buffer.bytes);
            self.shared.write_out(&bytes);
        } else if buffer.bytes.len() >= FLUSH_AT {
            self.shared.wake.notify_one();
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a, W: Write + Send + 'static> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter<W> {
    type Writer = LogWriter<W>;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

impl<W: Write + Send + 'static> Drop for Flusher<W> {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.wake.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// A `Write` the test can look into.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_line_is_written_within_the_flush_interval_and_all_on_drop() {
        let sink = Sink::default();
        let (mut writer, flusher) = buffered(sink.clone());
        let written = Instant::now();
        writer.write_all(b"first\n").unwrap();
        // Waits for the condition (the line out), bounded well past the promised window.
        let out = loop {
            let out = sink.0.lock().unwrap().clone();
            if !out.is_empty() || written.elapsed() > FLUSH_EVERY * 20 {
                break out;
            }
            std::thread::yield_now();
        };
        let took = written.elapsed();
        assert_eq!(out, b"first\n");
        // The window is FLUSH_EVERY; allow scheduling slack on a busy machine.
        assert!(took < FLUSH_EVERY * 5, "the line took {took:?}");
        for i in 0..1000 {
            writeln!(writer, "line {i}").unwrap();
        }
        drop(flusher);
        let out = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 1001, "every line, in order");
        assert_eq!(lines[1000], "line 999");
        // After the flusher is gone, lines are written straight through.
        writer.write_all(b"late\n").unwrap();
        assert!(sink.0.lock().unwrap().ends_with(b"late\n"));
    }
}
