//! `recorder-v2` (test plugin, for upgrade tests): `recorder-v1`'s code
//! (`../recorder-v1/src/recorder.rs`) with `VERSION = "v2"`: records `v2` in
//! `seen/<id>`, `dup/<id>` and `count/v2`.

/// The version this build records.
const VERSION: &str = "v2";

#[path = "../../recorder-v1/src/recorder.rs"]
mod recorder;

msmq_plugin::export_plugin!(recorder::Recorder);
