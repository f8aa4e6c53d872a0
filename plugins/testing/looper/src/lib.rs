//! `looper` (test plugin): never returns from handle-batch. It spins forever
//! on a value the optimiser cannot see through, so the broker's time limit
//! must stop it.

use std::hint::black_box;

use msmq_plugin::{Batch, Config, Outcome, Plugin};

struct Looper;

impl Plugin for Looper {
    fn init(_config: Config) -> Result<Self, String> {
        Ok(Looper)
    }

    fn handle(&mut self, _batch: &Batch) -> Vec<Outcome> {
        let mut n: u64 = 0;
        loop {
            n = black_box(n.wrapping_add(1));
        }
    }
}

msmq_plugin::export_plugin!(Looper);
