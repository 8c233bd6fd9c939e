//! Builds the eBPF programs (`ebpf/`, nightly toolchain, bpfel-unknown-none) on every build of the
//! agent and leaves the object in `OUT_DIR`, where `datapath` embeds it. One build path: the agent
//! can only ever load the object built from the sources next to it.

use std::path::PathBuf;

fn main() -> anyhow::Result<()> {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let workspace = manifest_dir
        .parent()
        .ok_or_else(|| anyhow::anyhow!("agent crate has no parent directory"))?;
    let ebpf_dir = workspace.join("ebpf");
    let common_dir = workspace.join("common");
    println!("cargo:rerun-if-changed={}", common_dir.display());
    let ebpf_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("non-UTF-8 path {}", ebpf_dir.display()))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "latch-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Nightly,
    )
}
