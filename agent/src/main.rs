//! The `latch` command line: `latch agent` runs the node agent, `latch debug` asks a running one
//! through its debug socket, `latch policy` checks and explains policies offline and `latch ca`
//! makes a development CA. Each is a thin layer over the library.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use latch::policy_test;

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
    /// Run the node agent: in local mode (workloads, peers and policies from the config file),
    /// or with --kubernetes from the cluster's Pods, Namespaces and Istio policies.
    Agent {
        /// The node config file (YAML).
        #[arg(long)]
        config: PathBuf,
        /// Detach every program and unpin every map of this config's bpfPinDir, then exit.
        #[arg(long)]
        uninstall: bool,
        /// Kubernetes mode: watch the API server (in-cluster config unless --kubeconfig).
        #[arg(long)]
        kubernetes: bool,
        /// Kubernetes mode outside a cluster (development, tests): this kubeconfig.
        #[arg(long, requires = "kubernetes")]
        kubeconfig: Option<PathBuf>,
        /// Kubernetes mode: kubelet's kubepods cgroup, when it is not found on its own (a
        /// kubelet with another --cgroup-root).
        #[arg(long, requires = "kubernetes")]
        kubepods_root: Option<PathBuf>,
        /// Kubernetes mode: where `GET /ready` is served (the DaemonSet's readiness probe).
        #[arg(long, default_value = "127.0.0.1:15021", requires = "kubernetes")]
        ready: std::net::SocketAddr,
    },
    /// Development certificate authority for local mode and tests.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Ask a running agent through its debug socket (tables, or --json).
    Debug {
        #[command(subcommand)]
        command: latch::debug::DebugCli,
        /// Print the API's JSON instead of tables.
        #[arg(long, global = true)]
        json: bool,
        /// The agent's debug socket.
        #[arg(long, global = true, default_value = latch::debug::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Istio AuthorizationPolicy / PeerAuthentication files: validate, explain decisions.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Validate policy files and directories, then run the policy tests among them; exit 0 if
    /// valid and every test passes, 1 with `file:line:col: field: why` or the failing cases.
    Check {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Run policy test files (PolicyTest documents: expected decisions as data) against their
    /// policies. Exit 0 if every case passes, 1 if one fails or a test file is invalid.
    Test {
        /// Test files, or directories holding them (beside the policies, or elsewhere).
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Also write the results as JUnit XML to FILE (for CI systems).
        #[arg(long, value_name = "FILE")]
        junit: Option<PathBuf>,
        /// Also list every AuthorizationPolicy rule with the number of cases that match it,
        /// and the rules no case exercises.
        #[arg(long)]
        coverage: bool,
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
        /// A request header, NAME:VALUE (repeatable; `request.headers[..]` conditions).
        #[arg(long = "header")]
        headers: Vec<String>,
    },
}

/// Exit code of `latch policy explain` for a deny.
const EXIT_DENY: u8 = 3;

fn exit(ok: bool) -> ExitCode {
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Bad test files: one `file:line:col: field: why` line each (policy errors on their own
/// lines), exit 1.
fn test_file_errors(errors: &[policy_test::TestFileError]) -> ExitCode {
    for e in errors {
        eprintln!("{e}");
    }
    ExitCode::FAILURE
}

fn policy(command: PolicyCommand) -> anyhow::Result<ExitCode> {
    match command {
        PolicyCommand::Check { paths } => {
            let (text, ok) = latch::policy::cli::check(&paths);
            if !ok {
                eprint!("{text}");
                return Ok(ExitCode::FAILURE);
            }
            print!("{text}");
            // The tests beside the policies, once the policies are known to be valid.
            match policy_test::run_found(&paths) {
                Ok(None) => Ok(ExitCode::SUCCESS),
                Ok(Some(outcome)) => {
                    print!("{}", policy_test::report::failures(&outcome));
                    println!("policy tests: {}", policy_test::report::summary(&outcome));
                    Ok(exit(outcome.ok()))
                }
                Err(errors) => Ok(test_file_errors(&errors)),
            }
        }
        PolicyCommand::Test {
            paths,
            junit,
            coverage,
        } => {
            let outcome = match policy_test::run(&paths) {
                Ok(outcome) => outcome,
                Err(errors) => return Ok(test_file_errors(&errors)),
            };
            print!("{}", policy_test::report::render(&outcome));
            if coverage {
                let rules = policy_test::coverage::coverage(&outcome.suites);
                print!("{}", policy_test::coverage::render(&rules));
            }
            if let Some(file) = junit {
                let xml = policy_test::junit::xml(&outcome)
                    .map_err(|e| anyhow::anyhow!("JUnit XML for {}: {e}", file.display()))?;
                std::fs::write(&file, xml)
                    .map_err(|e| anyhow::anyhow!("writing {}: {e}", file.display()))?;
            }
            Ok(exit(outcome.ok()))
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
            let snapshot = latch::state::Snapshot::load(&config)?;
            let question = latch::state::decide::Question {
                from,
                source_ip,
                to,
                method,
                path,
                host,
                headers,
            };
            let explanation =
                latch::state::decide::explain(&snapshot, &question).map_err(anyhow::Error::msg)?;
            print!("{}", latch::policy::cli::render_explain(&explanation));
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

/// `latch debug`: one request to the agent's debug socket, printed.
fn debug(
    command: latch::debug::DebugCli,
    json: bool,
    socket: &std::path::Path,
) -> anyhow::Result<()> {
    let command = latch::debug::DebugCommand::try_from(command)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let client = latch::debug::client::Client::new(socket).with_explain_renderer(render_explain);
    let out = runtime.block_on(client.run(&command, json))?;
    print!("{out}");
    Ok(())
}

/// The debug API's explain answer, printed as `latch policy explain` prints it.
fn render_explain(value: &serde_json::Value) -> String {
    serde_json::from_value::<latch::policy::Explanation>(value.clone())
        .map(|e| latch::policy::cli::render_explain(&e))
        .unwrap_or_else(|_| serde_json::to_string_pretty(value).unwrap_or_default())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Offline tools and the debug client print for people; the agent and `ca` log as JSON.
    let printed = match cli.command {
        Command::Policy { command } => policy(command),
        Command::Debug {
            command,
            json,
            socket,
        } => debug(command, json, &socket).map(|()| ExitCode::SUCCESS),
        Command::Agent {
            config,
            uninstall,
            kubernetes,
            kubeconfig,
            kubepods_root,
            ready,
        } => {
            return logged(|| {
                if !kubernetes {
                    return agent(&config, uninstall);
                }
                if uninstall {
                    return latch::kubernetes::serve::uninstall(&config);
                }
                latch::kubernetes::serve::serve(latch::kubernetes::serve::Options {
                    config_path: config,
                    kubeconfig,
                    kubepods_root,
                    ready,
                })
            });
        }
        Command::Ca {
            command: CaCommand::Init { dir },
        } => return logged(|| ca_init(&dir)),
    };
    printed.unwrap_or_else(|e| {
        eprintln!("latch: {e:#}");
        ExitCode::FAILURE
    })
}

fn agent(config: &std::path::Path, uninstall: bool) -> anyhow::Result<()> {
    if uninstall {
        return latch::runtime::uninstall(config);
    }
    latch::runtime::serve(config)
}

fn ca_init(dir: &std::path::Path) -> anyhow::Result<()> {
    let (cert, key) = latch::identity::ca::init(dir)?;
    println!("CA certificate: {}", cert.display());
    println!("CA private key: {} (mode 0600)", key.display());
    Ok(())
}

/// Run `f` with JSON logging; a failure is logged and printed.
fn logged(f: impl FnOnce() -> anyhow::Result<()>) -> ExitCode {
    let _written_on_exit = match latch::logging::init() {
        Ok(flusher) => flusher,
        Err(e) => {
            eprintln!("latch: starting the log thread: {e}");
            return ExitCode::FAILURE;
        }
    };
    match f() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "latch failed");
            eprintln!("latch: {e:#}");
            ExitCode::FAILURE
        }
    }
}
