//! `cargo xtask`: the one entry point for building, testing, demonstrating and benchmarking
//! Latch. Every command first runs the setup it needs and says what it is doing.

mod bench_all;
mod cmd;
mod fuzz;
mod image;
mod manifests;
mod modules;
mod plots;
mod setup;
mod tasks;
mod venv;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Build, test, demo and benchmark Latch")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install the eBPF toolchain (nightly rust-src, a matching bpf-linker) and check the kernel.
    Setup,
    /// Build the agent (with its eBPF object) and the test binaries.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// fmt check, clippy on every crate (eBPF included), the manifests, the image, unit and
    /// kernel integration tests.
    Test,
    /// The agent as an OCI image, latch:dev (release build), under target/image/ and in podman.
    Image {
        /// Instead: latch:test from the debug build, run with podman as `cargo xtask test` does.
        #[arg(long)]
        check: bool,
    },
    /// Render deploy/ with kubectl kustomize and validate it against the Kubernetes schemas.
    Manifests,
    /// A two-node cluster in network namespaces with real agents; prints what happened.
    Demo {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Fuzz the parsers of outside input (cargo-fuzz, nightly): each target for `--seconds`.
    Fuzz {
        /// How long each target runs.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Minimise each target's corpus afterwards (`cargo fuzz cmin`).
        #[arg(long)]
        cmin: bool,
        /// One target (default: all of fuzz/fuzz_targets).
        target: Option<String>,
    },
    /// Benchmarks: with no suite named, every suite in one run and `target/bench/BENCHMARKS.md`;
    /// or one of `datapath`, `tunnel`, `load`, `memory`, `policy`, `tls` or `compare` (agent
    /// builds side by side).
    Bench {
        #[arg(default_value = "all")]
        what: String,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Setup => setup::toolchain().and_then(|()| setup::kernel()),
        Command::Build { release } => tasks::build(release),
        Command::Test => tasks::test(),
        Command::Image { check } => tasks::image(check),
        Command::Manifests => manifests::check(),
        Command::Demo { args } => tasks::demo(&args),
        Command::Fuzz {
            seconds,
            cmin,
            target,
        } => fuzz::run(seconds, cmin, target.as_deref()),
        Command::Bench { what, args } => tasks::bench(&what, &args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("\nxtask: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
