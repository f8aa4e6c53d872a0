//! The MSMQ broker: storage, consumer groups, the QUIC server and the `msmq`
//! command line. See `ARCHITECTURE.md` for the map of concepts to modules.

pub mod auth;
pub mod cli;
pub mod clock;
pub mod command;
pub mod config;
pub mod core;
pub mod delivery;
pub mod groups;
pub mod layers;
pub mod metrics;
pub mod producers;
pub mod server;
pub mod storage;
pub mod tls;
pub mod topics;
pub mod transactions;
