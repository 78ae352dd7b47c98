//! Compiles proto/provisioner.proto (DESIGN §7) into the gRPC client and server types. protox
//! parses the proto in pure Rust, so no protoc is needed to build.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/provisioner.proto");
    let fds = protox::compile(["provisioner.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
