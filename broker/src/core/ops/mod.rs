//! The core's operations, one module per family of requests: each takes
//! the request's fields, checks them against the configured limits, reads
//! or submits commands, and returns the reply. The wire calls them after
//! its gate; nothing here knows about connections or frames.

pub mod access;
pub mod admin;
pub mod fetch;
pub mod group;
pub mod plugin;
pub mod produce;
pub mod tx;
