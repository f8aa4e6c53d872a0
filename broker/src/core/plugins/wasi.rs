//! The empty WASI a plugin gets: every WASI 0.2 interface a toolchain links
//! in is there, with nothing behind it.
//!
//! Owns: the plugin's [`WasiCtx`] and the sink of its stdout and stderr.
//!
//! Invariants:
//! - No preopened directory, so every filesystem call fails; TCP, UDP and
//!   name lookup are switched off; environment and arguments are empty;
//!   stdin is empty. `wasi:http` is linked as functions that trap (see the
//!   engine). What a plugin sees of the world is its batch and the `host`
//!   interface.
//! - Clocks and random come from the host through the context, so a later
//!   deterministic replay can replace them in one place.
//! - Output becomes log lines tagged with the plugin: stdout at info,
//!   stderr at warn. A line is cut at [`LOG_LINE_BYTES_MAX`] bytes and a call
//!   logs at most [`OUTPUT_LINES_PER_CALL_MAX`] lines, so a chatty plugin
//!   cannot flood the broker's log or memory.
//! - The last error output of a call (stderr lines and `host.log` errors)
//!   is kept, bounded, so a failed call can say what the plugin said.

use super::host::LOG_LINE_BYTES_MAX;
use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder};

/// Most lines of stdout and stderr one call may log; more are counted and
/// dropped with one note.
pub const OUTPUT_LINES_PER_CALL_MAX: u32 = 200;
/// Most recent error lines kept to describe a failed call.
pub const ERROR_LINES_KEPT_MAX: usize = 8;

/// Which standard stream a writer is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stream {
    Stdout,
    Stderr,
}

/// Lines a plugin wrote, shared by its streams and its host state.
#[derive(Clone)]
pub struct PluginOutput {
    inner: Arc<Mutex<OutputLines>>,
}

struct OutputLines {
    plugin: Arc<str>,
    stdout_partial: Vec<u8>,
    stderr_partial: Vec<u8>,
    lines_this_call: u32,
    dropped_this_call: u32,
    /// Lines the plugin logged at error level through `host.log`.
    logged_errors: VecDeque<String>,
    /// Lines it wrote to stderr.
    stderr_lines: VecDeque<String>,
}

impl PluginOutput {
    pub fn new(plugin: Arc<str>) -> Self {
        PluginOutput {
            inner: Arc::new(Mutex::new(OutputLines {
                plugin,
                stdout_partial: Vec::new(),
                stderr_partial: Vec::new(),
                lines_this_call: 0,
                dropped_this_call: 0,
                logged_errors: VecDeque::new(),
                stderr_lines: VecDeque::new(),
            })),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, OutputLines> {
        // A panic while holding it cannot leave the lines inconsistent.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Start a call: forget the previous call's errors and line count.
    pub fn begin_call(&self) {
        let mut out = self.lock();
        out.lines_this_call = 0;
        out.dropped_this_call = 0;
        out.logged_errors.clear();
        out.stderr_lines.clear();
    }

    /// End a call: log unfinished lines and the count of dropped ones.
    pub fn end_call(&self) {
        let mut out = self.lock();
        for stream in [Stream::Stdout, Stream::Stderr] {
            let partial = std::mem::take(out.partial(stream));
            if !partial.is_empty() {
                out.line(stream, &partial);
            }
        }
        if out.dropped_this_call > 0 {
            tracing::warn!(
                plugin = %out.plugin,
                "{} more lines of output of this call were dropped (at most {OUTPUT_LINES_PER_CALL_MAX} are logged per call)",
                out.dropped_this_call
            );
            out.dropped_this_call = 0;
        }
    }

    /// Remember an error-level line the plugin logged through `host.log`.
    pub fn note_error(&self, line: &str) {
        remember(&mut self.lock().logged_errors, line);
    }

    /// What the plugin said about errors during the current call, oldest
    /// first, or `None` if nothing: its error-level `host.log` lines if it
    /// logged any (what an SDK reports on purpose), else its stderr.
    pub fn recent_errors(&self) -> Option<String> {
        self.end_call();
        let out = self.lock();
        let said = [&out.logged_errors, &out.stderr_lines]
            .into_iter()
            .find(|lines| !lines.is_empty())
            .map(|lines| lines.iter().cloned().collect::<Vec<_>>().join("\n"));
        said
    }

    fn write(&self, stream: Stream, bytes: &[u8]) {
        let mut out = self.lock();
        for chunk in bytes.split_inclusive(|b| *b == b'\n') {
            let partial = out.partial(stream);
            partial.extend_from_slice(chunk);
            // A line too long for the log goes out in pieces.
            while out.partial(stream).len() > LOG_LINE_BYTES_MAX {
                let rest = out.partial(stream).split_off(LOG_LINE_BYTES_MAX);
                let piece = std::mem::replace(out.partial(stream), rest);
                out.line(stream, &piece);
            }
            if out.partial(stream).last() == Some(&b'\n') {
                let line = std::mem::take(out.partial(stream));
                out.line(stream, &line);
            }
        }
    }
}

impl OutputLines {
    fn partial(&mut self, stream: Stream) -> &mut Vec<u8> {
        match stream {
            Stream::Stdout => &mut self.stdout_partial,
            Stream::Stderr => &mut self.stderr_partial,
        }
    }

    fn line(&mut self, stream: Stream, bytes: &[u8]) {
        let mut end = bytes.len().min(LOG_LINE_BYTES_MAX);
        while end > 0 && matches!(bytes[end - 1], b'\n' | b'\r') {
            end -= 1;
        }
        let text = String::from_utf8_lossy(&bytes[..end]);
        if stream == Stream::Stderr && !text.trim().is_empty() {
            remember(&mut self.stderr_lines, &text);
        }
        if self.lines_this_call >= OUTPUT_LINES_PER_CALL_MAX {
            self.dropped_this_call += 1;
            return;
        }
        self.lines_this_call += 1;
        let plugin = &*self.plugin;
        match stream {
            Stream::Stdout => tracing::info!(plugin, stream = "stdout", "{text}"),
            Stream::Stderr => tracing::warn!(plugin, stream = "stderr", "{text}"),
        }
    }
}

/// Keep `line` among the last [`ERROR_LINES_KEPT_MAX`] of `lines`.
fn remember(lines: &mut VecDeque<String>, line: &str) {
    if lines.len() >= ERROR_LINES_KEPT_MAX {
        lines.pop_front();
    }
    lines.push_back(line.to_string());
}

/// One of a plugin's standard output streams, as WASI sees it.
#[derive(Clone)]
struct LogStream {
    output: PluginOutput,
    stream: Stream,
}

impl IsTerminal for LogStream {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for LogStream {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

/// Writes never block: a line goes to the log at once.
const WRITE_PERMIT_BYTES: usize = 64 * 1024;

#[wasmtime_wasi::async_trait]
impl Pollable for LogStream {
    async fn ready(&mut self) {}
}

impl OutputStream for LogStream {
    fn write(&mut self, bytes: bytes::Bytes) -> StreamResult<()> {
        self.output.write(self.stream, &bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(WRITE_PERMIT_BYTES)
    }
}

impl tokio::io::AsyncWrite for LogStream {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.output.write(self.stream, buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// The WASI context of one plugin instance: nothing in it but output.
pub fn empty_wasi(output: &PluginOutput) -> WasiCtx {
    WasiCtxBuilder::new()
        .stdout(LogStream {
            output: output.clone(),
            stream: Stream::Stdout,
        })
        .stderr(LogStream {
            output: output.clone(),
            stream: Stream::Stderr,
        })
        .allow_tcp(false)
        .allow_udp(false)
        .allow_ip_name_lookup(false)
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_split_cut_and_stderr_is_remembered() {
        let output = PluginOutput::new("p".into());
        output.begin_call();
        output.write(Stream::Stdout, b"hello\nwor");
        output.write(Stream::Stdout, b"ld\n");
        output.write(
            Stream::Stderr,
            b"Traceback (most recent call last):\n  File \"app.py\"",
        );
        output.write(Stream::Stderr, b", line 3\nValueError: bad amount\n");
        let errors = output.recent_errors().expect("stderr lines kept");
        assert_eq!(
            errors,
            "Traceback (most recent call last):\n  File \"app.py\", line 3\nValueError: bad amount"
        );
        let long = vec![b'x'; LOG_LINE_BYTES_MAX * 2 + 10];
        output.begin_call();
        output.write(Stream::Stderr, &long);
        let errors = output.recent_errors().expect("kept");
        assert_eq!(errors.lines().count(), 3, "a long line is cut into pieces");
        assert!(errors.lines().all(|l| l.len() <= LOG_LINE_BYTES_MAX));
    }

    #[test]
    fn a_call_logs_at_most_the_line_limit_and_keeps_the_last_errors() {
        let output = PluginOutput::new("p".into());
        output.begin_call();
        for i in 0..OUTPUT_LINES_PER_CALL_MAX + 5 {
            output.write(Stream::Stderr, format!("line {i}\n").as_bytes());
        }
        {
            let out = output.lock();
            assert_eq!(out.lines_this_call, OUTPUT_LINES_PER_CALL_MAX);
            assert_eq!(out.dropped_this_call, 5);
        }
        let errors = output.recent_errors().expect("kept");
        assert_eq!(errors.lines().count(), ERROR_LINES_KEPT_MAX);
        assert!(errors.ends_with(&format!("line {}", OUTPUT_LINES_PER_CALL_MAX + 4)));
        output.note_error("ValueError: bad amount");
        assert_eq!(
            output.recent_errors().as_deref(),
            Some("ValueError: bad amount"),
            "what the plugin logged as an error wins over its stderr"
        );
        output.begin_call();
        assert_eq!(output.recent_errors(), None);
    }
}
