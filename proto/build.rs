//! Compiles the .proto files with protox (pure Rust, no protoc needed).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/migfs/meta/v1/meta.proto",
        "proto/migfs/block/v1/block.proto",
        "proto/migfs/image/v1/image.proto",
        "proto/migfs/agent/v1/agent.proto",
    ];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure()
        .bytes(".migfs.block.v1.Block.data")
        .bytes(".migfs.block.v1.GetBlockReply.data")
        .compile_fds(fds)?;
    Ok(())
}
