//! Live transactional producers by producer group, for check-backs.
//!
//! Invariant: a connection is listed only while it is open; the connection
//! task removes it when it closes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use tokio::sync::Notify;

#[derive(Default)]
pub struct ProducerRegistry {
    groups: Mutex<HashMap<String, Vec<(u64, quinn::Connection)>>>,
    turn: AtomicUsize,
    /// Signalled when a producer registers, so waiting checks go out now.
    pub registered: Notify,
}

impl ProducerRegistry {
    pub fn register(&self, group: &str, connection_id: u64, conn: quinn::Connection) {
        let mut groups = self.groups.lock().expect("producer lock");
        let members = groups.entry(group.to_string()).or_default();
        if !members.iter().any(|(id, _)| *id == connection_id) {
            members.push((connection_id, conn));
        }
        drop(groups);
        self.registered.notify_one();
    }

    pub fn remove_connection(&self, connection_id: u64) {
        let mut groups = self.groups.lock().expect("producer lock");
        for members in groups.values_mut() {
            members.retain(|(id, _)| *id != connection_id);
        }
        groups.retain(|_, members| !members.is_empty());
    }

    /// A live producer of `group`, taking turns between them.
    pub fn pick(&self, group: &str) -> Option<quinn::Connection> {
        let groups = self.groups.lock().expect("producer lock");
        let members = groups.get(group)?;
        let live: Vec<&quinn::Connection> = members
            .iter()
            .map(|(_, c)| c)
            .filter(|c| c.close_reason().is_none())
            .collect();
        if live.is_empty() {
            return None;
        }
        let i = self.turn.fetch_add(1, Ordering::Relaxed) % live.len();
        Some(live[i].clone())
    }

    pub fn count(&self, group: &str) -> usize {
        self.groups
            .lock()
            .expect("producer lock")
            .get(group)
            .map_or(0, |m| m.len())
    }
}
