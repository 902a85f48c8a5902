//! Compiles the `.proto` contracts with protox (a pure-Rust protobuf
//! compiler), so no system `protoc` is needed, and keeps the encoded file
//! descriptor set for gRPC reflection.

use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files =
        ["proto/embark/v1/embark.proto", "proto/retina/v1/retina.proto", "proto/embark/internal/v1/queue.proto"];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let out = PathBuf::from(env::var("OUT_DIR")?);
    // One descriptor set per server, so reflection on a port lists only
    // what that port serves (the internal messages are on no port).
    for (name, roots) in [("embark", &files[..1]), ("retina", &files[1..2])] {
        let set = protox::compile(roots, ["proto"])?;
        std::fs::write(out.join(format!("{name}_descriptors.bin")), prost::Message::encode_to_vec(&set))?;
    }
    let descriptors = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        // Vectors travel as `bytes::Bytes`, so a response matrix built in a
        // `Vec<u8>` is handed to the transport without another copy.
        .bytes(".")
        // prost, with a guard on the number of fields before decoding.
        .codec_path("crate::codec::BoundedCodec")
        // Written by hand, to send its matrix from the rows where they are
        // (src/lookup_response.rs); the same message on the wire.
        .extern_path(".embark.v1.LookupResponse", "crate::lookup_response::LookupResponse")
        .compile_fds(descriptors)?;
    Ok(())
}
