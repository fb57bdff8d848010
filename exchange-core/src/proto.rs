//! Generated protobuf types (private: converted to domain types at the edge).
#![allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]

include!(concat!(env!("OUT_DIR"), "/exchange.v1.rs"));
