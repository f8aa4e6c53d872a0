//! A network fault for tests: replies to produces lost after the commit.
//!
//! Owns: the `drop-replies` switch. With the storage fault switches on
//! (`MSMQ_STORAGE_FAULTS=1`, see `storage::faults`) and the file
//! `<data dir>/faults/drop-replies` holding N, the broker closes the
//! connection instead of sending the reply of a stored `Produce`, `SendHalf`
//! or `Sequenced` request, N times, every other such reply: each dropped
//! reply's retry is answered, so a client that sends again gets through.
//! What the client sees is what a connection cut between the broker's
//! commit and its reply looks like.
//!
//! Invariant: without the environment switch nothing here runs.

use crate::storage::faults::{FAULTS_DIR, FAULTS_ENV};
use msmq_protocol::{ErrorCode, Reply};
use std::path::PathBuf;
use std::sync::Mutex;

/// The switch file's name.
pub const DROP_REPLIES: &str = "drop-replies";

pub struct ReplyFaults {
    switch: PathBuf,
    /// The last reply this fault applied to was dropped.
    dropped_last: Mutex<bool>,
}

impl ReplyFaults {
    /// The fault, if the environment turns fault switches on.
    pub fn from_env(data_dir: &std::path::Path) -> Option<ReplyFaults> {
        std::env::var_os(FAULTS_ENV)
            .is_some_and(|v| v == "1")
            .then(|| ReplyFaults {
                switch: data_dir.join(FAULTS_DIR).join(DROP_REPLIES),
                dropped_last: Mutex::new(false),
            })
    }

    /// Whether to drop `reply` (and close its connection) instead of
    /// sending it.
    pub fn drop_reply(&self, reply: &Reply) -> bool {
        if !matches!(reply, Reply::Produced(_) | Reply::HalfStored(_)) {
            return false;
        }
        let mut dropped_last = self.dropped_last.lock().expect("reply fault lock");
        let Ok(text) = std::fs::read_to_string(&self.switch) else {
            return false;
        };
        let left: u64 = text.trim().parse().unwrap_or(0);
        if left == 0 || *dropped_last {
            *dropped_last = false;
            return false;
        }
        if std::fs::write(&self.switch, (left - 1).to_string()).is_err() {
            return false;
        }
        *dropped_last = true;
        true
    }
}

/// The close code of a connection cut by this fault.
pub const DROPPED_REPLY_CLOSE_CODE: ErrorCode = ErrorCode::INTERNAL;
