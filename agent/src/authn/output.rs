//! What a verified token passes on to the application: its payload in a header
//! (`outputPayloadToHeader`, base64url as it was sent) and chosen claims in headers
//! (`outputClaimToHeaders`). Those headers are removed from every incoming request first, so a
//! client can never set them itself.

use hyper::{HeaderMap, header::HeaderValue};
use serde_json::Value;

use super::verify::Verified;
use crate::policy::JwtRule;

/// Remove every header a rule of `rules` writes.
pub fn strip(rules: &[std::sync::Arc<JwtRule>], headers: &mut HeaderMap) {
    for rule in rules {
        if let Some(name) = &rule.output_payload_to_header {
            headers.remove(name);
        }
        for (name, _) in &rule.output_claim_to_headers {
            headers.remove(name);
        }
    }
}

/// Write `verified`'s outputs as `rule` asks.
pub fn apply(rule: &JwtRule, verified: &Verified, headers: &mut HeaderMap) {
    if let Some(name) = &rule.output_payload_to_header
        && let Ok(value) = HeaderValue::from_str(&verified.payload)
    {
        headers.insert(name.clone(), value);
    }
    for (name, claim) in &rule.output_claim_to_headers {
        let value = claim_value(&verified.auth.claims, claim);
        if let Some(value) = value.and_then(|v| HeaderValue::from_str(&v).ok()) {
            headers.insert(name.clone(), value);
        }
    }
}

/// A claim as a header value: strings, numbers and booleans (as Istio); a nested claim by
/// `a.b` when there is no top-level claim of that name.
fn claim_value(claims: &serde_json::Map<String, Value>, name: &str) -> Option<String> {
    let value = claims.get(name).or_else(|| {
        let mut parts = name.split('.');
        let first = claims.get(parts.next()?)?;
        parts.try_fold(first, |v, p| v.get(p))
    })?;
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}
