//! Compiles `proto/exchange/v1/daemon.proto` with protox (pure Rust, no
//! `protoc`) and keeps the descriptor set for gRPC server reflection.

use std::path::PathBuf;

use protox::prost::Message as _;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["exchange/v1/daemon.proto"];
    // daemon.proto imports the envelope's and the receipt's enums.
    for f in [
        "exchange/v1/daemon.proto",
        "exchange/v1/envelope.proto",
        "exchange/v1/receipt.proto",
    ] {
        println!("cargo:rerun-if-changed=../proto/{f}");
    }
    let fds = protox::compile(files, ["../proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("daemon_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
