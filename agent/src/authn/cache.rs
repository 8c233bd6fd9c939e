//! The fetched key sets, one per `jwksUri`. Fetches run in background tasks, started by
//! requests: the first request for a URI, keys older than `jwt.jwksRefreshInterval` (the request
//! goes on with the keys it has), a token whose `kid` the keys lack (a rotation), a retry after
//! a failure; the last two at most once per `jwt.jwksRefetchMinInterval`. A request waits for a
//! fetch only when it has no usable key, and never longer than the fetch timeout. While fetches
//! fail, the last keys fetched are used until `jwt.jwksMaxStale` after they were fetched; then
//! the issuer's tokens are refused (fail closed). Every failure is logged and kept for
//! [`KeyCache::status`].

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use hyper::Uri;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::{fetch, keys::KeySet};
use crate::{config::Jwt as Settings, metrics::Metrics};

/// Every URI's keys.
#[derive(Default)]
pub struct KeyCache {
    entries: Mutex<HashMap<String, Arc<Entry>>>,
}

struct Entry {
    uri: Uri,
    state: Mutex<State>,
    /// Bumped after every fetch, successful or not.
    done: watch::Sender<u64>,
}

#[derive(Default)]
struct State {
    keys: Option<Arc<KeySet>>,
    fetched: Option<Instant>,
    attempted: Option<Instant>,
    in_flight: bool,
    last_error: Option<String>,
    failures: u64,
}

/// One URI's state: what `GET /v1/policies` lists under `jwks` (`debug::api::JwksStatus`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    pub uri: String,
    /// Usable keys held (0: never fetched, or none usable).
    pub keys: usize,
    /// Seconds since the last successful fetch; `None` if none succeeded.
    pub fetched_seconds_ago: Option<u64>,
    /// Failed fetches so far.
    pub failures: u64,
    /// The last failure's error, if the last fetch failed.
    pub last_error: Option<String>,
}

/// Why a URI has no keys to verify with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoKeys(pub String);

/// What a request needs from the cache.
#[derive(Clone, Copy)]
pub enum Need<'a> {
    /// Any usable keys.
    Keys,
    /// Keys that include this `kid` (a fetch may be started for it).
    Kid(&'a str),
}

impl KeyCache {
    /// The keys of `uri`, fetching them (and waiting up to `timeout`) if there are none usable.
    pub async fn keys(
        &self,
        uri: &Uri,
        settings: &Settings,
        timeout: Duration,
        need: Need<'_>,
        metrics: &Metrics,
    ) -> Result<Arc<KeySet>, NoKeys> {
        let entry = self.entry(uri);
        let now = Instant::now();
        let mut waiter = entry.done.subscribe();
        let (usable, start, wait) = {
            let mut state = entry.lock();
            let usable = state.keys.clone().filter(|_| {
                state
                    .fetched
                    .is_some_and(|f| now - f <= settings.jwks_max_stale)
            });
            let may_refetch = state
                .attempted
                .is_none_or(|a| now - a >= settings.jwks_refetch_min_interval);
            let stale = state
                .fetched
                .is_none_or(|f| now - f >= settings.jwks_refresh_interval);
            let lacks_kid = match need {
                Need::Kid(kid) => usable.as_ref().is_none_or(|k| !k.has_kid(kid)),
                Need::Keys => false,
            };
            let missing = usable.is_none() || lacks_kid;
            let start = !state.in_flight && may_refetch && (missing || stale);
            if start {
                state.in_flight = true;
                state.attempted = Some(now);
            }
            let wait = missing && (start || state.in_flight);
            (usable, start, wait)
        };
        if start {
            spawn_fetch(
                entry.clone(),
                settings.jwks_ca_file.clone(),
                timeout,
                metrics.clone(),
            );
        }
        if wait {
            waiter.mark_unchanged();
            let _ = tokio::time::timeout(timeout, waiter.changed()).await;
            let state = entry.lock();
            let now = Instant::now();
            return state
                .keys
                .clone()
                .filter(|_| {
                    state
                        .fetched
                        .is_some_and(|f| now - f <= settings.jwks_max_stale)
                })
                .ok_or_else(|| NoKeys(no_keys_reason(&state)));
        }
        usable.ok_or_else(|| NoKeys(no_keys_reason(&entry.lock())))
    }

    /// Every URI's state.
    pub fn status(&self) -> Vec<Status> {
        let entries: Vec<_> = self
            .entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        let mut out: Vec<Status> = entries
            .iter()
            .map(|e| {
                let s = e.lock();
                Status {
                    uri: e.uri.to_string(),
                    keys: s.keys.as_ref().map_or(0, |k| k.keys.len()),
                    fetched_seconds_ago: s.fetched.map(|f| f.elapsed().as_secs()),
                    failures: s.failures,
                    last_error: s.last_error.clone(),
                }
            })
            .collect();
        out.sort_by(|a, b| a.uri.cmp(&b.uri));
        out
    }

    fn entry(&self, uri: &Uri) -> Arc<Entry> {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries
            .entry(uri.to_string())
            .or_insert_with(|| {
                Arc::new(Entry {
                    uri: uri.clone(),
                    state: Mutex::new(State::default()),
                    done: watch::channel(0).0,
                })
            })
            .clone()
    }
}

impl Entry {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn no_keys_reason(state: &State) -> String {
    match (&state.last_error, state.fetched) {
        (Some(e), Some(_)) => format!("keys older than jwt.jwksMaxStale, last fetch: {e}"),
        (Some(e), None) => format!("fetch failed: {e}"),
        (None, _) => "keys not fetched yet".to_owned(),
    }
}

fn spawn_fetch(
    entry: Arc<Entry>,
    ca_file: Option<std::path::PathBuf>,
    timeout: Duration,
    metrics: Metrics,
) {
    tokio::spawn(async move {
        let result = tokio::time::timeout(timeout, fetch::jwks(&entry.uri, ca_file.as_deref()))
            .await
            .unwrap_or_else(|_| {
                Err(format!(
                    "no answer within {}",
                    humantime::format_duration(timeout)
                ))
            });
        metrics.jwks_fetched(&entry.uri.to_string(), result.is_ok());
        {
            let mut state = entry.lock();
            state.in_flight = false;
            match result {
                Ok(keys) => {
                    tracing::info!(uri = %entry.uri, keys = keys.keys.len(), "JWKS fetched");
                    state.keys = Some(Arc::new(keys));
                    state.fetched = Some(Instant::now());
                    state.last_error = None;
                }
                Err(error) => {
                    state.failures += 1;
                    // Recorded before it is logged: whoever reads the log line sees it.
                    state.last_error = Some(error.clone());
                    let kept_for = state.fetched.map(|f| f.elapsed().as_secs());
                    tracing::warn!(
                        uri = %entry.uri,
                        %error,
                        failures = state.failures,
                        last_good_keys_age_seconds = kept_for,
                        "JWKS fetch failed; the last keys fetched, if any, are used until \
                         jwt.jwksMaxStale"
                    );
                }
            }
        }
        entry.done.send_modify(|n| *n += 1);
    });
}
