//! A pair of nginx stream proxies doing mutual TLS, the sidecar-style setup the tunnel benchmark
//! compares against: one in the client pod (plaintext in on loopback, TLS 1.3 out with a client
//! certificate) and one in the server pod (TLS 1.3 in, client certificate required, plaintext to
//! the application on loopback). Uses Debian's nginx with its stream module, installed with
//! apt-get if absent.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{Cluster, PodId, netns};

const MODULE: &str = "/usr/lib/nginx/modules/ngx_stream_module.so";
/// Where the client-side proxy listens inside the client pod.
pub const CLIENT_PORT: u16 = 9001;
const SERVER_PORT: u16 = 9443;

/// The two nginx masters, each the leader of a process group with its workers.
pub struct NginxPair {
    children: Vec<Child>,
}

impl Drop for NginxPair {
    /// Kill each nginx's whole process group: killing only the master would leave its workers
    /// running, holding the pod's netns and ports.
    fn drop(&mut self) {
        for child in &mut self.children {
            if let Ok(pid) = i32::try_from(child.id()) {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            let _ = child.wait();
        }
    }
}

fn ensure_installed() -> anyhow::Result<()> {
    if Path::new("/usr/sbin/nginx").exists() && Path::new(MODULE).exists() {
        return Ok(());
    }
    println!("installing Debian's nginx-light and libnginx-mod-stream (apt-get)");
    for args in [
        &["update", "-qq"][..],
        &["install", "-y", "-qq", "nginx-light", "libnginx-mod-stream"][..],
    ] {
        let status = Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .context("running apt-get")?;
        if !status.success() {
            bail!("apt-get {} failed", args.join(" "));
        }
    }
    // The package may start a default server in the host namespace: stop it.
    let _ = Command::new("pkill").arg("-x").arg("nginx").status();
    Ok(())
}

fn conf(dir: &Path, name: &str, server: &str) -> String {
    format!(
        "load_module {MODULE};\nworker_processes auto;\ndaemon off;\npid {pid};\nerror_log {err} warn;\n\
         events {{ worker_connections 8192; }}\nstream {{\n{server}\n}}\n",
        pid = dir.join(format!("{name}.pid")).display(),
        err = dir.join(format!("{name}.err")).display(),
    )
}

impl NginxPair {
    /// Start the pair for `client` → `server`:8080, with certificates from the cluster's CA.
    pub fn start(
        cluster: &Cluster,
        client: PodId,
        server: PodId,
        app_port: u16,
    ) -> anyhow::Result<Self> {
        ensure_installed()?;
        let dir: PathBuf = cluster.node(cluster.pod(client).node).dir.join("nginx");
        std::fs::create_dir_all(&dir)?;
        let ca_dir = cluster.ca_dir();
        let ca =
            latch::identity::ca::DevCa::load(&ca_dir.join("ca.pem"), &ca_dir.join("ca-key.pem"))?;
        let td = &cluster.trust_domain;
        for (name, pod) in [("client", client), ("server", server)] {
            let svid = ca.mint(&cluster.pod(pod).spiffe_id(td), Duration::from_secs(3600))?;
            std::fs::write(dir.join(format!("{name}.pem")), svid.chain_pem())?;
            std::fs::write(dir.join(format!("{name}-key.pem")), svid.key_pem())?;
        }
        std::fs::write(dir.join("ca.pem"), ca.certificate_pem())?;
        let f = |n: &str| dir.join(n).display().to_string();
        let server_ip = cluster.pod(server).ipv4;
        let client_conf = conf(
            &dir,
            "client",
            &format!(
                "server {{ listen 127.0.0.1:{CLIENT_PORT}; proxy_pass {server_ip}:{SERVER_PORT}; proxy_ssl on; \
                 proxy_ssl_protocols TLSv1.3; proxy_ssl_certificate {}; proxy_ssl_certificate_key {}; \
                 proxy_ssl_session_reuse on; proxy_half_close on; }}",
                f("client.pem"),
                f("client-key.pem")
            ),
        );
        let server_conf = conf(
            &dir,
            "server",
            &format!(
                "server {{ listen {SERVER_PORT} ssl; ssl_protocols TLSv1.3; ssl_certificate {}; \
                 ssl_certificate_key {}; ssl_client_certificate {}; ssl_verify_client on; \
                 proxy_pass 127.0.0.1:{app_port}; proxy_half_close on; }}",
                f("server.pem"),
                f("server-key.pem"),
                f("ca.pem")
            ),
        );
        let mut pair = NginxPair {
            children: Vec::new(),
        };
        for (name, pod, text) in [
            ("client", client, client_conf),
            ("server", server, server_conf),
        ] {
            let path = dir.join(format!("{name}.conf"));
            std::fs::write(&path, text)?;
            let mut cmd = Command::new("/usr/sbin/nginx");
            cmd.arg("-c")
                .arg(&path)
                .arg("-e")
                .arg(dir.join(format!("{name}.err")));
            cmd.stdout(Stdio::null()).stderr(Stdio::null());
            std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
            netns::enter(&mut cmd, &cluster.pod(pod).netns(), None)?;
            pair.children.push(cmd.spawn().context("starting nginx")?);
            // nginx writes its pid file once it listens; it offers no other signal.
            let pid = dir.join(format!("{name}.pid"));
            let deadline = Instant::now() + Duration::from_secs(10);
            while !pid.exists() {
                if Instant::now() > deadline {
                    let err = std::fs::read_to_string(dir.join(format!("{name}.err")))
                        .unwrap_or_default();
                    bail!("nginx ({name}) did not start: {err}");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(pair)
    }
}
