//! Generated gRPC types and stubs for `proto/exchange/v1/daemon.proto`.
#![allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]

tonic::include_proto!("exchange.v1");

/// The encoded descriptor set, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/daemon_descriptor.bin"));
