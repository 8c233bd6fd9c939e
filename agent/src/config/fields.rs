//! Field-level checks done while deserializing, so that the parser reports the exact line:
//! durations (and the busy-poll window), absolute paths, Kubernetes names, the trust domain,
//! ports, the metrics address, the number of worker threads, the tunnel's handshake limits.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use serde::{Deserialize, Deserializer, Serializer, de::Error};

pub fn positive_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let raw = String::deserialize(d)?;
    let duration = parse_duration(&raw).map_err(D::Error::custom)?;
    if duration.is_zero() {
        return Err(D::Error::custom(format!(
            "duration {raw:?} must be greater than zero"
        )));
    }
    Ok(duration)
}

fn parse_duration(raw: &str) -> Result<Duration, String> {
    humantime::parse_duration(raw.trim()).map_err(|e| format!("invalid duration {raw:?}: {e}"))
}

/// `dataplane.verdictTtl`: greater than zero, at most [`MAX_VERDICT_TTL`].
pub fn verdict_ttl<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let duration = positive_duration(d)?;
    if duration > MAX_VERDICT_TTL {
        return Err(D::Error::custom(format!(
            "{} is longer than the {} maximum",
            humantime::format_duration(duration),
            humantime::format_duration(MAX_VERDICT_TTL)
        )));
    }
    Ok(duration)
}

/// A cached verdict is a decision the kernel keeps applying without asking again; a day bounds
/// how long a verdict outlives anything the agent failed to revoke (certificates bound it too).
pub const MAX_VERDICT_TTL: Duration = Duration::from_secs(24 * 3600);

/// The busy-poll window: zero (off) up to [`MAX_BUSY_POLL`].
pub fn busy_poll<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let raw = String::deserialize(d)?;
    let duration = parse_duration(&raw).map_err(D::Error::custom)?;
    if duration > MAX_BUSY_POLL {
        return Err(D::Error::custom(format!(
            "{raw:?} is longer than the {} maximum",
            humantime::format_duration(MAX_BUSY_POLL)
        )));
    }
    Ok(duration)
}

/// Longer windows would keep a worker busy between unrelated connections rather than between a
/// request and its answer.
pub const MAX_BUSY_POLL: Duration = Duration::from_millis(10);

/// Tokio worker threads: 1 to [`MAX_WORKER_THREADS`].
pub fn worker_threads<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    let n = usize::deserialize(d)?;
    if !(1..=MAX_WORKER_THREADS).contains(&n) {
        return Err(D::Error::custom(format!(
            "{n} worker threads: must be between 1 and {MAX_WORKER_THREADS}"
        )));
    }
    Ok(n)
}

pub const MAX_WORKER_THREADS: usize = 256;

/// The tunnel's handshake timeout: greater than zero, at most [`MAX_HANDSHAKE_TIMEOUT`].
pub fn handshake_timeout<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let raw = String::deserialize(d)?;
    let duration = parse_duration(&raw).map_err(D::Error::custom)?;
    if duration.is_zero() || duration > MAX_HANDSHAKE_TIMEOUT {
        return Err(D::Error::custom(format!(
            "{raw:?} must be greater than zero and at most {}",
            humantime::format_duration(MAX_HANDSHAKE_TIMEOUT)
        )));
    }
    Ok(duration)
}

/// A longer handshake would let idle connections hold the agent's descriptors for that long.
pub const MAX_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);

/// Handshakes in progress per source address: 1 to [`MAX_HANDSHAKES_PER_SOURCE`].
pub fn max_handshakes_per_source<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    let n = usize::deserialize(d)?;
    if !(1..=MAX_HANDSHAKES_PER_SOURCE).contains(&n) {
        return Err(D::Error::custom(format!(
            "{n} handshakes: must be between 1 and {MAX_HANDSHAKES_PER_SOURCE}"
        )));
    }
    Ok(n)
}

pub const MAX_HANDSHAKES_PER_SOURCE: usize = 4096;

pub fn serialize_duration<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_duration(*d).to_string())
}

pub fn absolute_path<'de, D: Deserializer<'de>>(d: D) -> Result<PathBuf, D::Error> {
    let path = PathBuf::deserialize(d)?;
    if !path.is_absolute() {
        return Err(D::Error::custom(format!(
            "path {:?} must be absolute",
            path.display().to_string()
        )));
    }
    Ok(path)
}

pub fn optional_absolute_path<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<PathBuf>, D::Error> {
    absolute_path(d).map(Some)
}

pub fn port<'de, D: Deserializer<'de>>(d: D) -> Result<u16, D::Error> {
    let port = u16::deserialize(d)?;
    if port == 0 {
        return Err(D::Error::custom("port must be between 1 and 65535"));
    }
    Ok(port)
}

/// An RFC 1123 label: Kubernetes namespaces.
pub fn dns_label<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let name = String::deserialize(d)?;
    check_label(&name, 63).map_err(D::Error::custom)?;
    Ok(name)
}

/// An RFC 1123 subdomain: Kubernetes object names (pods, service accounts, nodes).
pub fn dns_subdomain<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let name = String::deserialize(d)?;
    if name.len() > 253 {
        return Err(D::Error::custom(format!(
            "{name:?} is longer than 253 characters"
        )));
    }
    for part in name.split('.') {
        check_label(part, 63).map_err(|why| D::Error::custom(format!("{name:?}: {why}")))?;
    }
    Ok(name)
}

fn check_label(name: &str, max: usize) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    if name.len() > max {
        return Err(format!("{name:?} is longer than {max} characters"));
    }
    let ok_chars = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !ok_chars || name.starts_with('-') || name.ends_with('-') {
        return Err(format!(
            "{name:?} is not a valid name (lowercase letters, digits and '-', starting and ending with a letter or digit)"
        ));
    }
    Ok(())
}

/// A SPIFFE trust domain: lowercase letters, digits, `.`, `-` and `_`.
pub fn trust_domain<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let td = String::deserialize(d)?;
    if td.is_empty() || td.len() > 255 {
        return Err(D::Error::custom("trust domain must be 1 to 255 characters"));
    }
    if let Some(bad) = td
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_')))
    {
        return Err(D::Error::custom(format!(
            "trust domain {td:?} has the character {bad:?}; only lowercase letters, digits, '.', '-' and '_' are allowed"
        )));
    }
    Ok(td)
}

/// `host:port`, or `off` / null to disable.
pub fn metrics<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    match Option::<String>::deserialize(d)? {
        None => Ok(None),
        Some(s) if s == "off" => Ok(None),
        Some(s) => s.parse().map(Some).map_err(|_| {
            D::Error::custom(format!(
                "invalid address {s:?}: expected ip:port or \"off\""
            ))
        }),
    }
}

pub fn non_empty_ips<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<IpAddr>, D::Error> {
    let ips = Vec::<IpAddr>::deserialize(d)?;
    if ips.is_empty() {
        return Err(D::Error::custom("at least one IP address is required"));
    }
    Ok(ips)
}
