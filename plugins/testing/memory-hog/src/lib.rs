//! `memory-hog` (test plugin): on every batch, allocates 1 MiB blocks filled
//! with non-zero bytes and keeps them forever, without bound, so the broker's
//! memory limit must stop it (the failed allocation traps).

use std::hint::black_box;

use msmq_plugin::{Batch, Config, Outcome, Plugin};

const BLOCK: usize = 1 << 20;

struct MemoryHog {
    /// Lives in the plugin instance, i.e. for the lifetime of the component
    /// instance.
    blocks: Vec<Vec<u8>>,
}

impl Plugin for MemoryHog {
    fn init(_config: Config) -> Result<Self, String> {
        Ok(MemoryHog { blocks: Vec::new() })
    }

    fn handle(&mut self, _batch: &Batch) -> Vec<Outcome> {
        loop {
            let fill = (self.blocks.len() % 255) as u8 + 1;
            self.blocks.push(black_box(vec![fill; BLOCK]));
        }
    }
}

msmq_plugin::export_plugin!(MemoryHog);
