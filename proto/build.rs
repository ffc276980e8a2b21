//! Compiles our `.proto` files with `protox` (pure Rust), so a fresh machine needs nothing but cargo.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("protos");
    let files = [
        "axon/common.proto",
        "axon/event.proto",
        "axon/control.proto",
        "axon/command.proto",
        "axon/query.proto",
        "internal/internal.proto",
        "internal/cluster.proto",
    ];
    let fds = protox::compile(files, [&root])?;
    tonic_prost_build::configure()
        // Payloads are forwarded between processes many times: share them instead of copying.
        .bytes(".")
        .compile_fds(fds)?;
    println!("cargo:rerun-if-changed={}", root.display());
    Ok(())
}
