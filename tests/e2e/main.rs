//! End-to-end tests: each starts the real `msmq` binary on a loopback port in
//! a temporary directory and talks to it over QUIC with the real client.
//! One test binary for the whole suite keeps linking cheap.

mod acks;
mod auth;
mod bad_input;
mod cli;
mod console;
mod crash;
mod crash_driver;
mod delayed;
mod disk;
mod faults;
mod groups;
mod harness;
mod idempotence;
mod limits;
mod memory;
mod metrics;
mod network;
mod plugins;
mod produce_consume;
mod replay;
mod retention;
mod stopping;
mod transactions;
