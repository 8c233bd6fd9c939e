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
    /// Istio AuthorizationPolicy / PeerAuthentication files: validate, explain decisions.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Validate policy files and directories; exit 0 if valid, 1 with `file:line:col: field: why`.
    Check {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// The decision for one connection or request to the workload that owns the destination
    /// address, per the config's workloads, peers and policies. Exit 0 ALLOW, 3 DENY, 1 error.
    Explain {
        /// The node config file (its workloads, peers and policies are used).
        #[arg(long)]
        config: PathBuf,
        /// The source's SPIFFE ID, or `plaintext` for a connection without mTLS.
        #[arg(long)]
        from: String,
        /// The source's IP address (for ipBlocks and source.ip conditions).
        #[arg(long)]
        source_ip: Option<std::net::IpAddr>,
        /// The destination, IP:PORT.
        #[arg(long)]
        to: std::net::SocketAddr,
        #[arg(long)]
        method: Option<String>,
        #[arg(long)]
        path: Option<String>,
        #[arg(long)]
        host: Option<String>,
        /// NAME:VALUE; accepted for compatibility, not evaluated (no supported policy field
        /// reads request headers).
        #[arg(long = "header")]
        headers: Vec<String>,
    },
}

/// Exit code of `latch policy explain` for a deny.
const EXIT_DENY: u8 = 3;

fn policy(command: PolicyCommand) -> anyhow::Result<ExitCode> {
    match command {
        PolicyCommand::Check { paths } => {
            let (text, ok) = latch::policy::cli::check(&paths);
            if ok {
                print!("{text}");
                Ok(ExitCode::SUCCESS)
            } else {
                eprint!("{text}");
                Ok(ExitCode::FAILURE)
            }
        }
        PolicyCommand::Explain {
            config,
            from,
            source_ip,
            to,
            method,
            path,
            host,
            headers,
        } => {
            let snapshot = latch::runtime::offline_snapshot(&config)?;
            let question = latch::verdicts::decide::Question {
                from,
                source_ip,
                to,
                method,
                path,
                host,
            };
            let explanation = latch::verdicts::decide::explain(&snapshot, &question)
                .map_err(anyhow::Error::msg)?;
            print!("{}", latch::policy::cli::render_explain(&explanation));
            if !headers.is_empty() {
                println!("headers: not evaluated (no supported policy field reads them)");
            }
            Ok(if explanation.decision.allowed {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_DENY)
            })
        }
    }
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
    // Offline tools print for people; only the agent logs.
    if let Command::Policy { command } = cli.command {
        return policy(command).unwrap_or_else(|e| {
            eprintln!("latch: {e:#}");
            ExitCode::FAILURE
        });
    }
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
        Command::Policy { .. } => unreachable!("handled above"),
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
