//! The `sibyl.v1` wire contract, generated from `proto/sibyl/v1/*.proto` at build time.
//!
//! Proto types stop at each service's gRPC adapter, which converts them once, with
//! validation, into the domain types of `sibyl-spec` and `sibyl-decode`.

pub mod auth;
pub mod client;
mod convert;
pub mod server;
pub mod tls;

pub use convert::{fingerprint, penalties, sampling_config, WireError};

/// Generated messages, clients (`*_client`) and servers (`*_server`) of package `sibyl.v1`.
pub mod v1 {
    tonic::include_proto!("sibyl.v1");

    /// Encoded `FileDescriptorSet` of the package, for gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("sibyl_v1_descriptor");
}

/// Converts a wire duration into a `std::time::Duration` (absent or negative: zero).
pub fn std_duration(value: Option<&prost_types::Duration>) -> std::time::Duration {
    value.map_or(std::time::Duration::ZERO, |d| {
        let seconds = u64::try_from(d.seconds).unwrap_or(0);
        let nanos = u32::try_from(d.nanos).unwrap_or(0);
        std::time::Duration::new(seconds, nanos.min(999_999_999))
    })
}

/// Converts a `std::time::Duration` into its wire form.
pub fn duration(value: std::time::Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(value.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(value.subsec_nanos()).unwrap_or(0),
    }
}
