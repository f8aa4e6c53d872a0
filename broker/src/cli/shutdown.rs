//! Stopping client commands on SIGTERM, SIGINT and SIGHUP.
//!
//! The first signal asks the command to stop. Long-running commands
//! (`consume`, `produce`, `bench …`, `tx send`) watch [`requested`]: they
//! finish the request in hand, commit what they printed, leave their groups
//! and exit 0. Every other command is dropped at once and the process exits
//! with 128 + the signal number, as a shell expects. If a command has not
//! ended [`SHUTDOWN_GRACE_MS`] after the first signal, or a second signal
//! arrives, the process exits at once.

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
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
    hangup: tokio::signal::unix::Signal,
}

#[cfg(unix)]
fn listen() -> std::io::Result<Signals> {
    use tokio::signal::unix::{signal, SignalKind};
    Ok(Signals {
        terminate: signal(SignalKind::terminate())?,
        interrupt: signal(SignalKind::interrupt())?,
        hangup: signal(SignalKind::hangup())?,
    })
}

#[cfg(unix)]
impl Signals {
    async fn next(&mut self) -> Signal {
        let (name, number) = tokio::select! {
            _ = self.terminate.recv() => ("SIGTERM", 15),
            _ = self.interrupt.recv() => ("SIGINT", 2),
            _ = self.hangup.recv() => ("SIGHUP", 1),
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
