//! Compiles `sibyl/v1/*.proto` into `OUT_DIR` with the protoc binary vendored by
//! `protoc-bin-vendored`, so a fresh machine needs nothing installed.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let well_known = protoc_bin_vendored::include_path()?;
    // SAFETY: build scripts are single-threaded; prost-build reads PROTOC from the environment.
    unsafe { std::env::set_var("PROTOC", protoc) };
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let protos = [
        "sibyl/v1/common.proto",
        "sibyl/v1/drafter.proto",
        "sibyl/v1/verifier.proto",
        "sibyl/v1/gateway.proto",
    ];
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("sibyl_v1_descriptor.bin"))
        .compile_protos(&protos, &[".", well_known.to_str().ok_or("include path")?])?;
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    Ok(())
}
