//! Code generated from `proto/metadata/v1/metadata.proto`.

#![allow(clippy::all, missing_docs)]

pub mod v1 {
    tonic::include_proto!("metadata.v1");
}

/// Served by reflection so that grpcurl can describe every message.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/metadata_descriptor.bin"));
