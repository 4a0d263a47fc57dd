//! With the `cuda` feature, points the linker at the CUDA libraries of
//! `deploy/gpu/cuda-toolkit.sh` (`SIBYL_CUDA_LIB_DIR`); a system CUDA installation needs nothing.

fn main() {
    println!("cargo:rerun-if-env-changed=SIBYL_CUDA_LIB_DIR");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        if let Some(dir) = std::env::var_os("SIBYL_CUDA_LIB_DIR") {
            println!("cargo:rustc-link-search=native={}", dir.to_string_lossy());
        }
    }
}
