//! Stopping client commands on SIGTERM, SIGINT and SIGHUP.
//!
//! The first signal asks the command to stop. Long-running commands
//! (`consume`, `produce`, `bench …`, `tx send`) watch [`requested`]: they
//! stop at their next safe point (a consumer drops its poll in flight,
//! which nothing printed or committed), commit what they printed, leave
//! their groups and exit 0; `demo` shuts its embedded broker down and exits
//! with 128 + the signal number. Every other command is dropped at once and
//! exits with 128 + the signal number, as a shell expects. If a command has
//! not ended [`SHUTDOWN_GRACE_MS`] after the first signal, or a second
//! signal arrives, the process exits at once. A signal the process was
//! started ignoring (`nohup`) stays ignored.

use std::sync::OnceLock;
use std::time::Duration;
use tokio::sync::watch;

/// How long a command may take to stop after the first signal.
pub const SHUTDOWN_GRACE_MS: u64 = 10_000;

/// A signal that asked the process to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Signal {
    pub name: &'static str,
    pub number: i32,
}

impl Signal {
    /// The conventional exit status of a process stopped by this signal.
    pub fn exit_status(self) -> u8 {
        (128 + self.number).clamp(0, 255) as u8
    }
}

/// The error a command that stops at once ends with.
#[derive(Debug, thiserror::Error)]
#[error("stopped by {}", .0.name)]
pub struct Interrupted(pub Signal);

static STOP: OnceLock<watch::Sender<Option<Signal>>> = OnceLock::new();

/// Listen for the stop signals. Call once, inside the runtime, before the
/// command starts (until then a signal ends the process the default way).
pub fn install() -> std::io::Result<()> {
    let (sender, _) = watch::channel(None);
    if STOP.set(sender).is_err() {
        return Ok(());
    }
    let mut signals = listen()?;
    tokio::spawn(async move {
        let first = signals.next().await;
        eprintln!(
            "msmq: {} received, stopping (send it again to stop at once)",
            first.name
        );
        if let Some(stop) = STOP.get() {
            stop.send_replace(Some(first));
        }
        tokio::select! {
            again = signals.next() => std::process::exit(again.exit_status().into()),
            _ = tokio::time::sleep(Duration::from_millis(SHUTDOWN_GRACE_MS)) => {
                eprintln!("msmq: still running {SHUTDOWN_GRACE_MS} ms after {}; exiting", first.name);
                std::process::exit(first.exit_status().into());
            }
        }
    });
    Ok(())
}

/// Whether a stop signal has arrived.
pub fn requested() -> bool {
    STOP.get().is_some_and(|stop| stop.borrow().is_some())
}

/// Resolves with the first stop signal (never, if [`install`] was not called).
pub async fn wait() -> Signal {
    if let Some(stop) = STOP.get() {
        let mut receiver = stop.subscribe();
        let signal = match receiver.wait_for(Option::is_some).await {
            Ok(signal) => *signal,
            Err(_) => None,
        };
        if let Some(signal) = signal {
            return signal;
        }
    }
    std::future::pending().await
}

#[cfg(unix)]
struct Signals {
    /// `None` for a signal the process was started ignoring (`nohup`
    /// ignores SIGHUP, a shell's background job SIGINT): it stays ignored.
    terminate: Option<tokio::signal::unix::Signal>,
    interrupt: Option<tokio::signal::unix::Signal>,
    hangup: Option<tokio::signal::unix::Signal>,
}

#[cfg(unix)]
fn listen() -> std::io::Result<Signals> {
    use tokio::signal::unix::{signal, SignalKind};
    let listen = |kind: SignalKind, number: libc::c_int| -> std::io::Result<_> {
        if ignored(number) {
            Ok(None)
        } else {
            signal(kind).map(Some)
        }
    };
    Ok(Signals {
        terminate: listen(SignalKind::terminate(), libc::SIGTERM)?,
        interrupt: listen(SignalKind::interrupt(), libc::SIGINT)?,
        hangup: listen(SignalKind::hangup(), libc::SIGHUP)?,
    })
}

/// Whether the process inherited `SIG_IGN` for `signal`.
#[cfg(unix)]
fn ignored(signal: libc::c_int) -> bool {
    // SAFETY: a zeroed sigaction is a valid out-parameter, and a null new
    // action makes sigaction(2) only read the current one.
    unsafe {
        let mut current: libc::sigaction = std::mem::zeroed();
        libc::sigaction(signal, std::ptr::null(), &mut current) == 0
            && current.sa_sigaction == libc::SIG_IGN
    }
}

#[cfg(unix)]
impl Signals {
    async fn next(&mut self) -> Signal {
        async fn recv(stream: &mut Option<tokio::signal::unix::Signal>) {
            match stream {
                Some(stream) => {
                    stream.recv().await;
                }
                None => std::future::pending().await,
            }
        }
        let (name, number) = tokio::select! {
            _ = recv(&mut self.terminate) => ("SIGTERM", libc::SIGTERM),
            _ = recv(&mut self.interrupt) => ("SIGINT", libc::SIGINT),
            _ = recv(&mut self.hangup) => ("SIGHUP", libc::SIGHUP),
        };
        Signal { name, number }
    }
}

#[cfg(not(unix))]
struct Signals;

#[cfg(not(unix))]
fn listen() -> std::io::Result<Signals> {
    Ok(Signals)
}

#[cfg(not(unix))]
impl Signals {
    async fn next(&mut self) -> Signal {
        let _ = tokio::signal::ctrl_c().await;
        Signal {
            name: "Ctrl-C",
            number: 2,
        }
    }
}
