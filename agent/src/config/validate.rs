//! Checks across fields, after parsing: distinct ports, IPs used once, unique workload names,
//! workload cgroups under `cgroupRoot`, certificate settings complete for their source, JWKS keys
//! kept at least as long as their refresh interval.

use std::collections::{HashMap, HashSet};

use super::{
    CertificateSource, Config,
    report::{Problem, problem},
};

pub fn check(config: &Config) -> Result<(), Problem> {
    let p = &config.ports;
    if p.capture == p.inbound || p.capture == p.tunnel {
        return Err(problem(
            "ports.capture",
            format!("port {} is used twice in ports", p.capture),
        ));
    }
    if p.inbound == p.tunnel {
        return Err(problem(
            "ports.inbound",
            format!("port {} is used twice in ports", p.inbound),
        ));
    }

    if config.jwt.jwks_max_stale < config.jwt.jwks_refresh_interval {
        return Err(problem(
            "jwt.jwksMaxStale",
            format!(
                "{} is shorter than jwt.jwksRefreshInterval ({}): keys would be dropped before \
                 they are due to be fetched again",
                humantime::format_duration(config.jwt.jwks_max_stale),
                humantime::format_duration(config.jwt.jwks_refresh_interval)
            ),
        ));
    }

    let mut owners: HashMap<std::net::IpAddr, String> = HashMap::new();
    let mut names = HashSet::new();
    for (i, w) in config.workloads.iter().enumerate() {
        let at = format!("workloads[{i}]");
        if !names.insert((w.namespace.clone(), w.name.clone())) {
            return Err(problem(
                format!("{at}.name"),
                format!("workload {}/{} is listed twice", w.namespace, w.name),
            ));
        }
        if !w.cgroup.starts_with(&config.cgroup_root) || w.cgroup == config.cgroup_root {
            return Err(problem(
                format!("{at}.cgroup"),
                format!(
                    "{} is not below cgroupRoot {}",
                    w.cgroup.display(),
                    config.cgroup_root.display()
                ),
            ));
        }
        for (j, ip) in w.ips.iter().enumerate() {
            if let Some(owner) = owners.insert(*ip, format!("{at} ({})", w.name)) {
                return Err(problem(
                    format!("{at}.ips[{j}]"),
                    format!("{ip} is already used by {owner}"),
                ));
            }
        }
    }
    for (i, peer) in config.peers.iter().enumerate() {
        let at = format!("peers[{i}]");
        for (j, ip) in peer.ips.iter().enumerate() {
            if let Some(owner) = owners.insert(*ip, format!("{at} ({})", peer.name)) {
                return Err(problem(
                    format!("{at}.ips[{j}]"),
                    format!("{ip} is already used by {owner}"),
                ));
            }
        }
    }

    if config.certificates.is_none() && !config.workloads.is_empty() {
        return Err(problem(
            "certificates",
            "required when the node has workloads: the mTLS tunnel needs their SVIDs",
        ));
    }
    if let Some(certs) = &config.certificates {
        match certs.source {
            CertificateSource::DevCa => {
                if certs.ca_cert.is_none() {
                    return Err(problem("certificates", "source dev-ca needs caCert"));
                }
                if certs.ca_key.is_none() {
                    return Err(problem("certificates", "source dev-ca needs caKey"));
                }
            }
            CertificateSource::Files => {
                if certs.dir.is_none() {
                    return Err(problem("certificates", "source files needs dir"));
                }
            }
        }
    }
    Ok(())
}
