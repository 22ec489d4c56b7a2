//! Compiles the proto with protox so that no system `protoc` is needed.
use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/metadata/v1/metadata.proto",
        "proto/metadata/v1/schema.proto",
    ];
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(protos, ["proto"])?;
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    // Reflection serves this descriptor set, so it must include the imports
    // (protox includes them) for grpcurl to resolve Struct and Timestamp.
    std::fs::write(out_dir.join("metadata_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
