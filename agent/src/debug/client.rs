//! `latch debug`: the clap subcommands, the HTTP/1.1 request over the agent's Unix socket, and
//! turning the answer into a table (or pretty JSON with `--json`).

use std::{
    io,
    net::IpAddr,
    path::{Path, PathBuf},
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper::{Method, Request, StatusCode, header::HOST};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;

use super::{
    api::{
        ApiError, Cert, Connection, ExplainQuery, FlushResult, Policies, ReloadResult, Stats,
        Status, VerdictFilter, VerdictPage, Workload,
    },
    query::QueryError,
    table,
};

/// One debug request, independent of how the command line spells it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DebugCommand {
    Status,
    Workloads,
    Policies,
    Verdicts(VerdictFilter),
    Certs,
    Connections,
    Stats,
    Explain(ExplainQuery),
    Flush(VerdictFilter),
    Reload,
}

impl DebugCommand {
    /// Method and path (with query) of the request.
    pub fn request(&self) -> (Method, String) {
        let with_query = |path: &str, query: String| {
            if query.is_empty() {
                path.to_owned()
            } else {
                format!("{path}?{query}")
            }
        };
        match self {
            DebugCommand::Status => (Method::GET, "/v1/status".into()),
            DebugCommand::Workloads => (Method::GET, "/v1/workloads".into()),
            DebugCommand::Policies => (Method::GET, "/v1/policies".into()),
            DebugCommand::Verdicts(f) => (Method::GET, with_query("/v1/verdicts", f.to_query())),
            DebugCommand::Certs => (Method::GET, "/v1/certs".into()),
            DebugCommand::Connections => (Method::GET, "/v1/connections".into()),
            DebugCommand::Stats => (Method::GET, "/v1/stats".into()),
            DebugCommand::Explain(q) => (Method::GET, with_query("/v1/explain", q.to_query())),
            DebugCommand::Flush(f) => {
                (Method::POST, with_query("/v1/verdicts/flush", f.to_query()))
            }
            DebugCommand::Reload => (Method::POST, "/v1/reload".into()),
        }
    }
}

/// Filters shared by `verdicts` and `flush`.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct MatchArgs {
    /// Only verdicts whose source or destination is this SPIFFE ID (or `key:<hex>`).
    #[arg(long)]
    pub identity: Option<String>,
    /// Only verdicts from this source identity.
    #[arg(long)]
    pub source: Option<String>,
    /// Only verdicts to this destination identity.
    #[arg(long)]
    pub destination: Option<String>,
    /// Only verdicts for this destination port.
    #[arg(long)]
    pub port: Option<u16>,
}

#[derive(Clone, Debug, clap::Args)]
pub struct VerdictArgs {
    #[command(flatten)]
    pub filter: MatchArgs,
    /// Skip this many matching verdicts.
    #[arg(long, default_value_t = 0)]
    pub offset: usize,
    /// Show at most this many (1-10000).
    #[arg(long, default_value_t = VerdictFilter::DEFAULT_LIMIT, value_parser = parse_limit)]
    pub limit: usize,
}

fn parse_limit(raw: &str) -> Result<usize, String> {
    raw.parse::<usize>()
        .ok()
        .filter(|n| (1..=VerdictFilter::MAX_LIMIT).contains(n))
        .ok_or_else(|| format!("expected a number from 1 to {}", VerdictFilter::MAX_LIMIT))
}

#[derive(Clone, Debug, clap::Args)]
pub struct ExplainArgs {
    /// The caller: a SPIFFE ID, or `plaintext` for a connection without mTLS.
    #[arg(long)]
    pub from: String,
    /// The destination, IP:PORT (or IP with --port).
    #[arg(long)]
    pub to: String,
    /// The destination port, when --to has none.
    #[arg(long)]
    pub port: Option<u16>,
    /// The caller's source address.
    #[arg(long)]
    pub source_ip: Option<IpAddr>,
    /// HTTP method (L7 rules).
    #[arg(long)]
    pub method: Option<String>,
    /// HTTP path (L7 rules).
    #[arg(long)]
    pub path: Option<String>,
    /// HTTP host (L7 rules).
    #[arg(long)]
    pub host: Option<String>,
    /// A request header, NAME:VALUE (repeatable; `request.headers[..]` conditions).
    #[arg(long = "header")]
    pub headers: Vec<String>,
}

/// The `latch debug` subcommands.
#[derive(Clone, Debug, clap::Subcommand)]
pub enum DebugCli {
    /// Agent version, uptime, programs, maps, certificates and the last reload.
    Status,
    /// Local workloads and known peers.
    Workloads,
    /// Loaded policies and the errors of the last reload.
    Policies,
    /// The kernel verdict cache.
    Verdicts(VerdictArgs),
    /// Current SVIDs (no key material).
    Certs,
    /// Open connections through the agent.
    Connections,
    /// Kernel counters.
    Stats,
    /// Why a request would be allowed or denied.
    Explain(ExplainArgs),
    /// Remove cached verdicts (all of them unless filtered).
    Flush(MatchArgs),
    /// Re-read the config and policy files now.
    Reload,
}

fn filter(args: MatchArgs, offset: usize, limit: usize) -> VerdictFilter {
    VerdictFilter {
        identity: args.identity,
        source: args.source,
        destination: args.destination,
        port: args.port,
        offset,
        limit,
    }
}

impl TryFrom<DebugCli> for DebugCommand {
    type Error = QueryError;

    fn try_from(cli: DebugCli) -> Result<Self, QueryError> {
        Ok(match cli {
            DebugCli::Status => DebugCommand::Status,
            DebugCli::Workloads => DebugCommand::Workloads,
            DebugCli::Policies => DebugCommand::Policies,
            DebugCli::Verdicts(a) => DebugCommand::Verdicts(filter(a.filter, a.offset, a.limit)),
            DebugCli::Certs => DebugCommand::Certs,
            DebugCli::Connections => DebugCommand::Connections,
            DebugCli::Stats => DebugCommand::Stats,
            DebugCli::Explain(a) => DebugCommand::Explain(ExplainQuery {
                source_ip: a.source_ip,
                method: a.method,
                path: a.path,
                host: a.host,
                headers: a.headers,
                ..ExplainQuery::new(&a.from, &a.to, a.port)?
            }),
            DebugCli::Flush(a) => DebugCommand::Flush(filter(a, 0, VerdictFilter::DEFAULT_LIMIT)),
            DebugCli::Reload => DebugCommand::Reload,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no agent is listening on {} (is `latch agent` running? pass --socket)", path.display())]
    NoAgent { path: PathBuf },
    #[error("permission denied on {} (the debug socket is root-only)", path.display())]
    PermissionDenied { path: PathBuf },
    #[error("connecting to {}: {source}", path.display())]
    Connect { path: PathBuf, source: io::Error },
    #[error("{request}: {source}")]
    Http {
        request: String,
        source: hyper::Error,
    },
    #[error("{request}: {status}: {message}")]
    Server {
        request: String,
        status: StatusCode,
        message: String,
    },
    #[error("{request}: the agent's answer is not what this client expects: {source}")]
    Decode {
        request: String,
        source: serde_json::Error,
    },
}

/// Renders the opaque `explain` answer.
pub type ExplainRenderer = fn(&serde_json::Value) -> String;

/// A `latch debug` client bound to one socket.
#[derive(Clone, Debug)]
pub struct Client {
    socket: PathBuf,
    explain: ExplainRenderer,
}

impl Client {
    pub fn new(socket: &Path) -> Self {
        Self {
            socket: socket.to_owned(),
            explain: table::key_values,
        }
    }

    /// Replace the default `key: value` rendering of `explain` answers.
    pub fn with_explain_renderer(mut self, render: ExplainRenderer) -> Self {
        self.explain = render;
        self
    }

    /// Send `command`; the 2xx body, or the server's error message.
    pub async fn call(&self, command: &DebugCommand) -> Result<Bytes, ClientError> {
        let (method, path) = command.request();
        let request = format!("{method} {path}");
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|source| match source.kind() {
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
                    ClientError::NoAgent {
                        path: self.socket.clone(),
                    }
                }
                io::ErrorKind::PermissionDenied => ClientError::PermissionDenied {
                    path: self.socket.clone(),
                },
                _ => ClientError::Connect {
                    path: self.socket.clone(),
                    source,
                },
            })?;
        let http = |source| ClientError::Http {
            request: request.clone(),
            source,
        };
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(http)?;
        let driver = tokio::spawn(connection);
        let req = Request::builder()
            .method(method)
            .uri(&path)
            .header(HOST, "localhost")
            .body(Empty::<Bytes>::new())
            .map_err(|e| ClientError::Server {
                request: request.clone(),
                status: StatusCode::BAD_REQUEST,
                message: format!("building the request: {e}"),
            })?;
        let response = sender.send_request(req).await.map_err(http)?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(http)?
            .to_bytes();
        driver.abort();
        if !status.is_success() {
            let message = serde_json::from_slice::<ApiError>(&body)
                .map(|e| e.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&body).trim().to_owned());
            return Err(ClientError::Server {
                request,
                status,
                message,
            });
        }
        Ok(body)
    }

    /// Send `command` and render the answer: a table, or with `json` the body pretty-printed.
    pub async fn run(&self, command: &DebugCommand, json: bool) -> Result<String, ClientError> {
        let body = self.call(command).await?;
        let request = || format!("{} {}", command.request().0, command.request().1);
        if json {
            let value: serde_json::Value = decode(&body, request)?;
            let mut out = serde_json::to_string_pretty(&value).unwrap_or_default();
            out.push('\n');
            return Ok(out);
        }
        Ok(match command {
            DebugCommand::Status => table::status(&decode::<Status>(&body, request)?),
            DebugCommand::Workloads => table::workloads(&decode::<Vec<Workload>>(&body, request)?),
            DebugCommand::Policies => table::policies(&decode::<Policies>(&body, request)?),
            DebugCommand::Verdicts(_) => table::verdicts(&decode::<VerdictPage>(&body, request)?),
            DebugCommand::Certs => table::certs(&decode::<Vec<Cert>>(&body, request)?),
            DebugCommand::Connections => {
                table::connections(&decode::<Vec<Connection>>(&body, request)?)
            }
            DebugCommand::Stats => table::stats(&decode::<Stats>(&body, request)?),
            DebugCommand::Explain(_) => (self.explain)(&decode(&body, request)?),
            DebugCommand::Flush(_) => {
                let n = decode::<FlushResult>(&body, request)?.removed;
                format!("removed {n} verdict{}\n", if n == 1 { "" } else { "s" })
            }
            DebugCommand::Reload => match decode::<ReloadResult>(&body, request)? {
                ReloadResult { ok: true, .. } => "reloaded\n".into(),
                ReloadResult { error, .. } => format!(
                    "reload failed: {}\n",
                    error.unwrap_or_else(|| "no reason given".into())
                ),
            },
        })
    }
}

fn decode<T: DeserializeOwned>(
    body: &[u8],
    request: impl Fn() -> String,
) -> Result<T, ClientError> {
    serde_json::from_slice(body).map_err(|source| ClientError::Decode {
        request: request(),
        source,
    })
}

/// What the `latch debug` binary calls: run `command` against the agent at `socket`.
pub async fn run(command: DebugCommand, socket: &Path, json: bool) -> anyhow::Result<String> {
    Ok(Client::new(socket).run(&command, json).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_missing_socket_says_no_agent() {
        let path = Path::new("/nonexistent/latch-test/debug.sock");
        let err = run(DebugCommand::Status, path, false)
            .await
            .expect_err("no agent");
        assert_eq!(
            err.to_string(),
            "no agent is listening on /nonexistent/latch-test/debug.sock \
             (is `latch agent` running? pass --socket)"
        );
    }

    #[test]
    fn cli_converts_to_commands() {
        use clap::Parser as _;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(subcommand)]
            cmd: DebugCli,
        }
        let parse = |args: &[&str]| {
            let cli = Cli::try_parse_from(std::iter::once("debug").chain(args.iter().copied()))
                .expect("parses");
            DebugCommand::try_from(cli.cmd)
        };
        assert_eq!(
            parse(&["verdicts", "--port", "8080", "--limit", "5"]),
            Ok(DebugCommand::Verdicts(VerdictFilter {
                port: Some(8080),
                limit: 5,
                ..VerdictFilter::default()
            }))
        );
        let Ok(DebugCommand::Explain(q)) = parse(&[
            "explain",
            "--from",
            "plaintext",
            "--to",
            "10.244.1.2",
            "--port",
            "80",
        ]) else {
            panic!("explain parses");
        };
        assert_eq!(q.to.to_string(), "10.244.1.2:80");
        assert!(parse(&["explain", "--from", "plaintext", "--to", "10.244.1.2"]).is_err());
        assert!(
            Cli::try_parse_from(["debug", "verdicts", "--limit", "10001"]).is_err(),
            "limit is capped"
        );
        assert_eq!(
            DebugCommand::Flush(VerdictFilter {
                identity: Some("spiffe://td/ns/a/sa/b".into()),
                ..VerdictFilter::default()
            })
            .request(),
            (
                Method::POST,
                "/v1/verdicts/flush?identity=spiffe%3A%2F%2Ftd%2Fns%2Fa%2Fsa%2Fb".into()
            )
        );
    }
}
