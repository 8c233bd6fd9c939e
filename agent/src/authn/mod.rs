//! Request authentication (Istio's `RequestAuthentication`): the JWTs of an HTTP request checked
//! against the rules that apply to its workload, before authorization. A request without a
//! token passes with no request principal; a request with a token that does not verify is
//! refused (`401`); a verified token becomes the request's [`RequestAuth`], its outputs are
//! written, and it is taken out of the request unless `forwardOriginalToken`.
//!
//! [`token`] finds tokens, [`verify`] checks one, [`keys`] are an issuer's public keys,
//! [`cache`] fetches ([`fetch`]) and keeps `jwksUri` key sets, [`output`] writes the headers.

pub mod cache;
pub mod fetch;
pub mod keys;
pub mod output;
pub mod token;
pub mod verify;

use std::sync::{Arc, LazyLock};

use hyper::http::request::Parts;

use crate::{
    config::Jwt as Settings,
    metrics::Metrics,
    policy::{JwtRule, KeySource, RequestAuth},
};
use cache::{KeyCache, Need};
use verify::VerifyError;

/// A refused token: which issuer (if it could be read) and why. Never the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct Refusal {
    pub issuer: Option<String>,
    /// `namespace/name` of the RequestAuthentication whose rule refused it, if one was chosen.
    pub policy: Option<String>,
    pub reason: VerifyError,
}

/// Checks requests' tokens; holds the fetched key sets.
#[derive(Default)]
pub struct Authenticator {
    keys: KeyCache,
}

/// The agent's authenticator: one key cache for every workload, so an issuer's keys are
/// fetched once per node.
pub fn global() -> &'static Authenticator {
    static GLOBAL: LazyLock<Authenticator> = LazyLock::new(Authenticator::default);
    &GLOBAL
}

impl Authenticator {
    /// Authenticate the request in `parts` with `rules` (those of its workload): `Ok(None)`
    /// without a token, `Ok(Some)` with a verified one (outputs written, token removed unless
    /// forwarded), `Err` with a token that does not verify. Without rules nothing is touched.
    /// Key fetches are counted in `metrics`.
    pub async fn authenticate(
        &self,
        rules: &[Arc<JwtRule>],
        settings: &Settings,
        metrics: &Metrics,
        parts: &mut Parts,
    ) -> Result<Option<RequestAuth>, Refusal> {
        if rules.is_empty() {
            return Ok(None);
        }
        output::strip(rules, &mut parts.headers);
        // Every distinct token, with the rules that look where it was found.
        let mut found: Vec<(String, Vec<usize>)> = Vec::new();
        for (i, rule) in rules.iter().enumerate() {
            for location in &rule.locations {
                for token in token::find(location, parts) {
                    match found.iter_mut().find(|(t, _)| *t == token) {
                        Some((_, by)) => by.push(i),
                        None => found.push((token, vec![i])),
                    }
                }
            }
        }
        let mut verified = Vec::new();
        for (token, by) in &found {
            let refusal = |issuer: Option<&str>, policy: Option<&str>, reason| Refusal {
                issuer: issuer.map(str::to_owned),
                policy: policy.map(str::to_owned),
                reason,
            };
            let issuer = verify::unverified_issuer(token).map_err(|r| refusal(None, None, r))?;
            let Some(rule) = by.iter().map(|&i| &rules[i]).find(|r| r.issuer == issuer) else {
                return Err(refusal(
                    Some(&issuer),
                    None,
                    VerifyError::UnknownIssuer(issuer.clone()),
                ));
            };
            let result = self.verify(token, rule, settings, metrics).await;
            let v = result.map_err(|r| refusal(Some(&issuer), Some(&rule.policy), r))?;
            verified.push((token, rule, v));
        }
        let mut auth = None;
        for (token, rule, v) in verified {
            output::apply(rule, &v, &mut parts.headers);
            if !rule.forward_original_token {
                for location in &rule.locations {
                    token::remove(location, token, parts);
                }
            }
            auth.get_or_insert(v.auth);
        }
        Ok(auth)
    }

    async fn verify(
        &self,
        token: &str,
        rule: &JwtRule,
        settings: &Settings,
        metrics: &Metrics,
    ) -> Result<verify::Verified, VerifyError> {
        let uri = match &rule.keys {
            KeySource::Inline(keys) => return verify::verify(token, rule, keys),
            KeySource::Uri(uri) => uri,
        };
        let timeout = rule.fetch_timeout.unwrap_or(settings.jwks_fetch_timeout);
        let no_keys = |e: cache::NoKeys| VerifyError::NoKeys {
            issuer: rule.issuer.clone(),
            why: e.0,
        };
        let keys = self
            .keys
            .keys(uri, settings, timeout, Need::Keys, metrics)
            .await
            .map_err(no_keys)?;
        match verify::verify(token, rule, &keys) {
            // The issuer may have rotated its keys: fetch them again (rate-limited) and retry.
            Err(VerifyError::UnknownKid(kid)) => {
                let keys = self
                    .keys
                    .keys(uri, settings, timeout, Need::Kid(&kid), metrics)
                    .await
                    .map_err(no_keys)?;
                verify::verify(token, rule, &keys)
            }
            other => other,
        }
    }

    /// Every fetched key set's state.
    pub fn status(&self) -> Vec<cache::Status> {
        self.keys.status()
    }
}

#[cfg(test)]
mod tests;
