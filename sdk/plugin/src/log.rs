//! Writing to the broker's log.
//!
//! Lines are written to the broker's log tagged with the plugin's name. This
//! is the only output a plugin has: stdout and stderr are not granted.
//!
//! ```ignore
//! msmq_plugin::log::info(format!("processed {} messages", batch.len()));
//! ```
//!
//! # Panics
//!
//! Every function panics on a non-`wasm32` target (there is no broker).

use crate::bindings::msmq::plugin::host;
use crate::bindings::msmq::plugin::types::LogLevel;

/// The severity of a log line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    /// Very detailed tracing.
    Trace,
    /// Debugging detail.
    Debug,
    /// Normal operation.
    Info,
    /// Something unexpected that the plugin handled.
    Warn,
    /// Something failed.
    Error,
}

impl From<Level> for LogLevel {
    fn from(level: Level) -> Self {
        match level {
            Level::Trace => LogLevel::Trace,
            Level::Debug => LogLevel::Debug,
            Level::Info => LogLevel::Info,
            Level::Warn => LogLevel::Warn,
            Level::Error => LogLevel::Error,
        }
    }
}

/// Writes `message` to the broker's log at `level`.
pub fn write(level: Level, message: impl AsRef<str>) {
    host::log(level.into(), message.as_ref());
}

/// Writes `message` to the broker's log at trace level.
pub fn trace(message: impl AsRef<str>) {
    write(Level::Trace, message);
}

/// Writes `message` to the broker's log at debug level.
pub fn debug(message: impl AsRef<str>) {
    write(Level::Debug, message);
}

/// Writes `message` to the broker's log at info level.
pub fn info(message: impl AsRef<str>) {
    write(Level::Info, message);
}

/// Writes `message` to the broker's log at warn level.
pub fn warn(message: impl AsRef<str>) {
    write(Level::Warn, message);
}

/// Writes `message` to the broker's log at error level.
pub fn error(message: impl AsRef<str>) {
    write(Level::Error, message);
}
