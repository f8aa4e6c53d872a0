//! `fs-reader` (test plugin): reads `/etc/passwd` with `std::fs` in
//! handle-batch and acks. Using `std::fs` makes the component import
//! `wasi:filesystem`, so the broker must refuse to deploy it.

use std::hint::black_box;

use msmq_plugin::{Batch, Config, Outcome, Plugin};

struct FsReader;

impl Plugin for FsReader {
    fn init(_config: Config) -> Result<Self, String> {
        Ok(FsReader)
    }

    fn handle(&mut self, batch: &Batch) -> Vec<Outcome> {
        let _ = black_box(std::fs::read_to_string("/etc/passwd"));
        vec![Outcome::Ack; batch.len()]
    }
}

msmq_plugin::export_plugin!(FsReader);
