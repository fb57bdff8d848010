//! Compiles `proto/` with protox (pure Rust), so no `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["exchange/v1/envelope.proto", "exchange/v1/receipt.proto"];
    for f in &files {
        println!("cargo:rerun-if-changed=../proto/{f}");
    }
    let fds = protox::compile(files, ["../proto"])?;
    prost_build::Config::new().compile_fds(fds)?;
    Ok(())
}
