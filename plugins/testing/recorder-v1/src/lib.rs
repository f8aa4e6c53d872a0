//! `recorder-v1` (test plugin, for upgrade tests): for each message, sets
//! `seen/<message id>` = `v1` and increments `count/v1`; if `seen/<id>` was
//! already set (a duplicate processing, which must never happen), sets
//! `dup/<id>` = `v1` instead. Publishes nothing; acks every message. A refused
//! state write traps. `recorder-v2` is the same code with `VERSION = "v2"`.

/// The version this build records.
const VERSION: &str = "v1";

mod recorder;

msmq_plugin::export_plugin!(recorder::Recorder);
