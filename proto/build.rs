//! Compiles `backy.proto` with protox (pure Rust), so no `protoc` is needed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=backy.proto");
    let fds = protox::compile(["backy.proto"], ["."])?;
    // Range payloads as `Bytes`: decoded as slices of the received buffer
    // instead of copies (up to 1 MiB per frame, every frame of a push or
    // restore).
    tonic_prost_build::configure()
        .bytes(".backy.v1.DataRange.data")
        .compile_fds(fds)?;
    Ok(())
}
