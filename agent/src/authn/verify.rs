//! Verifying one token against one rule's keys: the signature (with a key of the right type and
//! `kid`, by the algorithm the token names, never `none` or an HMAC), then the claims: `iss` the
//! rule's issuer, `exp` and `nbf` with [`LEEWAY`], `aud` one of the rule's audiences when it
//! names any. What a verified token says becomes a [`RequestAuth`].

use jsonwebtoken::{Algorithm, Validation, errors::ErrorKind};
use serde_json::{Map, Value};

use super::keys::KeySet;
use crate::policy::{JwtRule, RequestAuth};

/// Clock skew allowed on `exp` and `nbf`: Envoy's default (`clock_skew_seconds`).
pub const LEEWAY: std::time::Duration = std::time::Duration::from_secs(60);

/// Why a token is refused. The text names what failed, never the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("malformed token: {0}")]
    Malformed(String),
    #[error("algorithm {0} refused: only asymmetric signatures are verified")]
    RefusedAlgorithm(String),
    #[error("issuer {0:?} is not configured for this workload")]
    UnknownIssuer(String),
    #[error("no key with kid {0:?}")]
    UnknownKid(String),
    #[error("no key for algorithm {0:?}")]
    NoKeyForAlgorithm(Algorithm),
    #[error("no keys for issuer {issuer:?}: {why}")]
    NoKeys { issuer: String, why: String },
    #[error("signature does not verify")]
    BadSignature,
    #[error("token expired")]
    Expired,
    #[error("token not yet valid (nbf)")]
    NotYetValid,
    #[error("audience not allowed")]
    Audience,
    #[error("issuer does not match")]
    Issuer,
    #[error("invalid claims: {0}")]
    Claims(String),
}

/// A verified token: what policy sees, and the payload as sent (base64url) for
/// `outputPayloadToHeader`.
#[derive(Debug, Clone)]
pub struct Verified {
    pub auth: RequestAuth,
    pub payload: String,
}

/// The `iss` of a token, before anything is verified: only to choose the rule that verifies it.
pub fn unverified_issuer(token: &str) -> Result<String, VerifyError> {
    let header_alg = token
        .split('.')
        .next()
        .map(header_algorithm)
        .transpose()?
        .flatten();
    if let Some(alg) = header_alg
        && (alg == "none" || alg.starts_with("HS"))
    {
        return Err(VerifyError::RefusedAlgorithm(alg));
    }
    let claims: Map<String, Value> = jsonwebtoken::dangerous::insecure_decode_claims(token)
        .map_err(|e| VerifyError::Malformed(e.to_string()))?;
    match claims.get("iss") {
        Some(Value::String(iss)) => Ok(iss.clone()),
        Some(_) => Err(VerifyError::Malformed("iss is not a string".into())),
        None => Err(VerifyError::Malformed("no iss claim".into())),
    }
}

/// The `alg` of a token's header as written, to refuse `none` and HMAC by name (the JWT crate
/// does not know `none`).
fn header_algorithm(segment: &str) -> Result<Option<String>, VerifyError> {
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(segment.trim_end_matches('='))
        .map_err(|e| VerifyError::Malformed(format!("header: {e}")))?;
    let header: Map<String, Value> = serde_json::from_slice(&bytes)
        .map_err(|e| VerifyError::Malformed(format!("header: {e}")))?;
    Ok(header.get("alg").and_then(Value::as_str).map(str::to_owned))
}

/// Verify `token` for `rule` with `keys`.
pub fn verify(token: &str, rule: &JwtRule, keys: &KeySet) -> Result<Verified, VerifyError> {
    let header =
        jsonwebtoken::decode_header(token).map_err(|e| VerifyError::Malformed(e.to_string()))?;
    if matches!(
        header.alg,
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512
    ) {
        return Err(VerifyError::RefusedAlgorithm(format!("{:?}", header.alg)));
    }
    if let Some(kid) = &header.kid
        && !keys.has_kid(kid)
    {
        return Err(VerifyError::UnknownKid(kid.clone()));
    }
    let candidates: Vec<_> = keys
        .keys
        .iter()
        .filter(|k| header.kid.is_none() || k.kid == header.kid)
        .filter(|k| k.algorithms.contains(&header.alg))
        .collect();
    if candidates.is_empty() {
        return Err(VerifyError::NoKeyForAlgorithm(header.alg));
    }
    let validation = validation(rule, header.alg);
    for candidate in candidates {
        match jsonwebtoken::decode::<Map<String, Value>>(token, &candidate.key, &validation) {
            Ok(data) => return Ok(verified(token, data.claims)),
            Err(e) => match e.kind() {
                // Another key of the set may have signed it.
                ErrorKind::InvalidSignature
                | ErrorKind::InvalidEcdsaKey
                | ErrorKind::InvalidRsaKey(_)
                | ErrorKind::InvalidEddsaKey
                | ErrorKind::InvalidKeyFormat => {}
                other => return Err(claim_error(other)),
            },
        }
    }
    Err(VerifyError::BadSignature)
}

fn validation(rule: &JwtRule, alg: Algorithm) -> Validation {
    let mut v = Validation::new(alg);
    v.leeway = LEEWAY.as_secs();
    v.validate_exp = true;
    v.validate_nbf = true;
    v.set_issuer(&[&rule.issuer]);
    // As Envoy: a token without `exp` does not expire; `iss` must be there.
    let mut required = vec!["iss"];
    if rule.audiences.is_empty() {
        v.validate_aud = false;
    } else {
        v.set_audience(&rule.audiences);
        required.push("aud");
    }
    v.set_required_spec_claims(&required);
    v
}

fn claim_error(kind: &ErrorKind) -> VerifyError {
    match kind {
        ErrorKind::ExpiredSignature => VerifyError::Expired,
        ErrorKind::ImmatureSignature => VerifyError::NotYetValid,
        ErrorKind::InvalidAudience => VerifyError::Audience,
        ErrorKind::MissingRequiredClaim(c) if c == "aud" => VerifyError::Audience,
        ErrorKind::InvalidIssuer => VerifyError::Issuer,
        ErrorKind::InvalidAlgorithm | ErrorKind::MissingAlgorithm => {
            VerifyError::RefusedAlgorithm(format!("{kind:?}"))
        }
        ErrorKind::Base64(_)
        | ErrorKind::Json(_)
        | ErrorKind::Utf8(_)
        | ErrorKind::InvalidToken => VerifyError::Malformed(format!("{kind:?}")),
        other => VerifyError::Claims(format!("{other:?}")),
    }
}

fn verified(token: &str, claims: Map<String, Value>) -> Verified {
    let text = |name: &str| claims.get(name).and_then(Value::as_str).unwrap_or_default();
    let principal = format!("{}/{}", text("iss"), text("sub"));
    let audiences = match claims.get("aud") {
        Some(Value::String(a)) => vec![a.clone()],
        Some(Value::Array(list)) => list
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect(),
        _ => Vec::new(),
    };
    let presenter = claims.get("azp").and_then(Value::as_str).map(str::to_owned);
    let payload = token.split('.').nth(1).unwrap_or_default().to_owned();
    Verified {
        auth: RequestAuth {
            principal,
            audiences,
            presenter,
            claims,
        },
        payload,
    }
}
