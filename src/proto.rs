//! Code generated from `proto/metadata/v1/metadata.proto`.

#![allow(clippy::all, missing_docs)]

pub mod v1 {
    tonic::include_proto!("metadata.v1");
}

/// Served by reflection so that grpcurl can describe every message.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/metadata_descriptor.bin"));

/// The service's descriptors, decoded once: the proto3 JSON form of any of
/// its messages (the relay's JSON events, the client's transactions).
pub fn descriptor_pool() -> &'static prost_reflect::DescriptorPool {
    static POOL: std::sync::OnceLock<prost_reflect::DescriptorPool> = std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        prost_reflect::DescriptorPool::decode(FILE_DESCRIPTOR_SET)
            .expect("the built-in descriptor set decodes")
    })
}
