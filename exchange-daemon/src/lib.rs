//! # exchange-daemon
//!
//! `exchanged`: one facility's daemon (DESIGN.md §6). It accepts records from
//! local applications (the client service), seals them, stores them durably
//! and delivers them to other facilities over mutual TLS (the peer service),
//! through relays when the route names some, retrying until they expire; it
//! receives envelopes for its facility or to relay, and keeps every signed
//! receipt, marking the one at the provision boundary (責任分界点).
//!
//! * [`config`]: the TOML configuration and network profiles;
//! * [`tls`]: rustls mutual TLS, verification through exchange-core's trust store;
//! * [`store`]: the durable store trait and its SQLite backend;
//! * [`Node`]: the daemon's state and what it does with what it is sent,
//!   what it receives and what it delivers, served by the two gRPC
//!   services (the peer service and the client service, thin adapters);
//! * [`accountability`]: the audit log, checkpoints, patient pseudonyms,
//!   provision records and retention;
//! * [`admin`]: online backup, restore and integrity scrub of a store directory;
//! * [`client`]: a client library for local applications (used by the `exchange` CLI);
//! * [`Daemon`]: start and stop a daemon in-process.
//!
//! The envelope and receipt rules are exchange-core's; this crate moves bytes
//! between the network, the store and the core, and decides who may do what.

#![forbid(unsafe_code)]

#[macro_use]
mod failpoints;

pub mod accountability;
pub mod admin;
pub mod client;
mod client_service;
mod clock;
pub mod config;
pub mod error;
mod node;
mod peer;
pub mod proto;
mod rpc;
mod server;
mod sink;
pub mod store;
pub mod tls;

pub use clock::{from_unix_ms, unix_ms};
pub use config::Config;
pub use error::{DbTlsError, Error, StoreError};
pub use node::{Node, free_disk_bytes};
pub use server::Daemon;
