//! The client's own address on a `CONNECT`, in a `Forwarded` header (RFC 7239):
//! `for="10.244.1.2:41000"` or `for="[fd00::2]:41000"`. A pooled tunnel is shared by every pod of
//! the source identity on the node, so the tunnel connection's address names only the pod that
//! dialled it; each stream says which pod it carries. The destination believes it only when its
//! registry gives that address the identity the certificate proved.

use std::net::{IpAddr, SocketAddr};

use hyper::header::HeaderValue;

/// The header's name, as HTTP/2 carries it.
pub const FORWARDED: &str = "forwarded";

/// `Forwarded` naming `client`. Marked sensitive, which HPACK sends as never indexed: the value
/// changes with every connection (the client's port), so indexing it would only fill both ends'
/// header tables with entries never used again, pushing out the ones every `CONNECT` reuses.
pub fn header(client: SocketAddr) -> HeaderValue {
    // An IP address and a port are always a valid header value.
    let mut value =
        HeaderValue::from_str(&format!("for=\"{client}\"")).unwrap_or(HeaderValue::from_static(""));
    value.set_sensitive(true);
    value
}

/// The address of the first `for=` of a `Forwarded` value (port 0 if it has none), or why it has
/// none. Obfuscated and unknown identifiers (`for=_hidden`, `for=unknown`) are errors: a Latch
/// source always names the address.
pub fn parse(value: &HeaderValue) -> Result<SocketAddr, String> {
    let text = value
        .to_str()
        .map_err(|_| "Forwarded header is not visible ASCII".to_owned())?;
    let element = text.split(',').next().unwrap_or_default();
    let node = element
        .split(';')
        .filter_map(|pair| pair.split_once('='))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("for"))
        .map(|(_, node)| node.trim())
        .ok_or_else(|| format!("Forwarded header {text:?} has no for="))?;
    let node = node
        .strip_prefix('"')
        .and_then(|n| n.strip_suffix('"'))
        .unwrap_or(node);
    if let Ok(addr) = node.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let bare = node
        .strip_prefix('[')
        .and_then(|n| n.strip_suffix(']'))
        .unwrap_or(node);
    bare.parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, 0))
        .map_err(|_| format!("Forwarded header names {node:?}, not an IP address"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(text: &str) -> Result<SocketAddr, String> {
        parse(&HeaderValue::from_str(text).expect("value"))
    }

    #[test]
    fn what_it_writes_it_reads() {
        for client in ["10.244.1.2:41000", "[fd00:244::1:2]:41000"] {
            let client: SocketAddr = client.parse().expect("address");
            assert_eq!(parse(&header(client)), Ok(client));
        }
        assert_eq!(
            header("10.244.1.2:7".parse().expect("address")),
            "for=\"10.244.1.2:7\""
        );
        assert_eq!(
            header("[fd00::2]:7".parse().expect("address")),
            "for=\"[fd00::2]:7\""
        );
        assert!(
            header("10.244.1.2:7".parse().expect("address")).is_sensitive(),
            "sent never indexed"
        );
    }

    #[test]
    fn reads_the_forms_rfc_7239_allows() {
        let v4 = SocketAddr::from(([10, 244, 1, 2], 0));
        assert_eq!(parsed("for=10.244.1.2"), Ok(v4));
        assert_eq!(parsed("For=\"10.244.1.2\""), Ok(v4));
        assert_eq!(parsed("proto=https; for=10.244.1.2;by=x"), Ok(v4));
        assert_eq!(
            parsed("for=10.244.1.2:80, for=10.244.9.9"),
            Ok(SocketAddr::from(([10, 244, 1, 2], 80))),
            "the first element"
        );
        assert_eq!(
            parsed("for=\"[fd00::2]\""),
            Ok(SocketAddr::new("fd00::2".parse().expect("v6"), 0))
        );
    }

    #[test]
    fn refuses_what_names_no_address() {
        for bad in [
            "by=10.244.1.2",
            "for=_hidden",
            "for=unknown",
            "for=\"[fd00::2\"",
            "",
        ] {
            let err = parsed(bad).expect_err(bad);
            assert!(err.contains("Forwarded"), "{bad}: {err}");
        }
    }
}
