//! Generates the protobuf types from `proto/im.proto` with prost, using the
//! pure-Rust `protox` compiler so that no system `protoc` is needed, and
//! from the same descriptors the field numbers (`im_server::proto::fields`)
//! that the hand-written wire code on the pull path uses: renumbering a field
//! in the .proto changes them too, so no number is written twice.

use std::fmt::Write as _;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/im.proto");
    let descriptors = protox::compile(["proto/im.proto"], ["proto"])?;
    let mut fields = String::new();
    for file in &descriptors.file {
        for message in &file.message_type {
            writeln!(fields, "/// Field numbers of `{}`.", message.name())?;
            writeln!(fields, "pub mod {} {{", snake_case(message.name()))?;
            for field in &message.field {
                writeln!(
                    fields,
                    "    pub const {}: u32 = {};",
                    field.name().to_uppercase(),
                    field.number()
                )?;
            }
            writeln!(fields, "}}")?;
        }
    }
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("im_fields.rs"), fields)?;
    prost_build::Config::new().compile_fds(descriptors)?;
    Ok(())
}

/// `PullResponse` -> `pull_response`.
fn snake_case(name: &str) -> String {
    let mut out = String::new();
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}
