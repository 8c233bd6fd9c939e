//! The `latch` command line: `latch agent` runs the node agent; more subcommands (policy, debug,
//! ca) follow the same pattern and live in their own modules of the library.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "latch",
    version,
    about = "Latch: node-level mTLS and authorization enforcement with an eBPF verdict cache"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node agent in local mode.
    Agent {
        /// The node config file (YAML).
        #[arg(long)]
        config: PathBuf,
        /// Detach every program and unpin every map of this config's bpfPinDir, then exit.
        #[arg(long)]
        uninstall: bool,
    },
    /// Development certificate authority for local mode and tests.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
}

#[derive(Subcommand)]
enum CaCommand {
    /// Create a development CA (ca.pem, and ca-key.pem with mode 0600) in DIR.
    Init { dir: PathBuf },
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("LATCH_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(filter)
        .with_writer(std::io::stdout)
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    let result = match cli.command {
        Command::Agent { config, uninstall } => {
            if uninstall {
                latch::runtime::uninstall(&config)
            } else {
                tokio::runtime::Builder::new_multi_thread()
                    .enable_all()
                    .build()
                    .map_err(anyhow::Error::from)
                    .and_then(|rt| rt.block_on(latch::runtime::run(&config)))
            }
        }
        Command::Ca {
            command: CaCommand::Init { dir },
        } => latch::identity::ca::init(&dir)
            .map(|(cert, key)| {
                println!("CA certificate: {}", cert.display());
                println!("CA private key: {} (mode 0600)", key.display());
            })
            .map_err(anyhow::Error::from),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "latch failed");
            eprintln!("latch: {e:#}");
            ExitCode::FAILURE
        }
    }
}
