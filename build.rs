//! Generates the protobuf types from `proto/im.proto` with prost, using the
//! pure-Rust `protox` compiler so that no system `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/im.proto");
    let descriptors = protox::compile(["proto/im.proto"], ["proto"])?;
    prost_build::Config::new().compile_fds(descriptors)?;
    Ok(())
}
