//! The shared artefact store: an S3-compatible bucket (AWS S3, Cloudflare R2, MinIO,
//! Railway buckets, ...), so that any replica can serve any request of a flow.
//!
//! Requests are signed by `rusty-s3` (sans-IO: it only builds and signs URLs and parses
//! listings) and sent with `ureq`, the blocking client the model download already uses.
//! Every store call runs on the blocking pool, so a synchronous client fits without a
//! second async runtime or HTTP stack in the binary. Objects are whole small PNGs, sent
//! and received one at a time, as the local store reads and writes them.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use rusty_s3::actions::ListObjectsV2;
use rusty_s3::{Bucket, Credentials, S3Action, UrlStyle};

use super::ledger::{footprint, SessionUsage, FILES};
use super::{Artefact, Backend, BackendHealth, SessionId, StorageError};

/// Lifetime of a signed request: it is sent at once.
const SIGNED_FOR: Duration = Duration::from_secs(120);
/// An unreachable store must answer 503 quickly, not hold a request for minutes.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// `/health` probes the store only when nothing was heard from it for this long.
const HEALTH_FRESH: Duration = Duration::from_secs(10);
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest object read back (artefacts are PNGs of the working image).
const MAX_OBJECT_BYTES: u64 = 256 * 1024 * 1024;

/// Where the bucket is and how to reach it (`STORAGE_URL=s3://BUCKET[/PREFIX]` plus the
/// standard `AWS_*` variables).
pub struct S3Settings {
    pub bucket: String,
    /// Key prefix without a trailing slash ("" for none).
    pub prefix: String,
    /// `AWS_ENDPOINT_URL`; `None`: AWS itself, `https://s3.<region>.amazonaws.com`.
    pub endpoint: Option<String>,
    pub region: String,
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
    /// `AWS_ALLOW_HTTP=true`: a plain-http endpoint is accepted.
    pub allow_http: bool,
    /// `AWS_VIRTUAL_HOSTED_STYLE_REQUEST=true`: `https://BUCKET.host/key` instead of
    /// `https://host/BUCKET/key` (the default for a custom endpoint, which every
    /// S3-compatible server accepts).
    pub virtual_hosted: bool,
}

/// Why the settings cannot make a store; each message names the variable.
#[derive(Debug, thiserror::Error)]
#[error("{var} {why}")]
pub struct S3SettingsError {
    pub var: &'static str,
    pub why: String,
}

pub struct S3Bucket {
    bucket: Bucket,
    credentials: Credentials,
    /// "" or "prefix/".
    prefix: String,
    agent: ureq::Agent,
    /// The last thing heard from the store (for `/health`): `None` inside = fine.
    heard: Mutex<Option<(Instant, Option<String>)>>,
}

impl S3Bucket {
    pub fn new(settings: S3Settings) -> Result<Self, S3SettingsError> {
        let err = |var, why: &str| S3SettingsError { var, why: why.to_string() };
        if settings.access_key_id.is_empty() || settings.secret_access_key.is_empty() {
            return Err(err("AWS_ACCESS_KEY_ID", "and AWS_SECRET_ACCESS_KEY must be set for an s3:// STORAGE_URL"));
        }
        let endpoint =
            settings.endpoint.clone().unwrap_or_else(|| format!("https://s3.{}.amazonaws.com", settings.region));
        let url: url::Url = endpoint.parse().map_err(|_| err("AWS_ENDPOINT_URL", "is not a URL"))?;
        match url.scheme() {
            "https" => {}
            "http" if settings.allow_http => {}
            "http" => return Err(err("AWS_ENDPOINT_URL", "is plain http: set AWS_ALLOW_HTTP=true to allow it")),
            _ => return Err(err("AWS_ENDPOINT_URL", "must be an http(s) URL")),
        }
        let style =
            if settings.virtual_hosted || settings.endpoint.is_none() { UrlStyle::VirtualHost } else { UrlStyle::Path };
        let bucket = Bucket::new(url, style, settings.bucket, settings.region)
            .map_err(|e| err("AWS_ENDPOINT_URL", &format!("cannot address the bucket: {e}")))?;
        let credentials = match settings.session_token {
            Some(token) => Credentials::new_with_token(settings.access_key_id, settings.secret_access_key, token),
            None => Credentials::new(settings.access_key_id, settings.secret_access_key),
        };
        let agent = ureq::Agent::config_builder()
            .timeout_connect(Some(CONNECT_TIMEOUT))
            .timeout_global(Some(REQUEST_TIMEOUT))
            .build()
            .into();
        let prefix = if settings.prefix.is_empty() { String::new() } else { format!("{}/", settings.prefix) };
        Ok(S3Bucket { bucket, credentials, prefix, agent, heard: Mutex::new(None) })
    }

    fn key(&self, session: &str, artefact: Artefact) -> String {
        format!("{}sessions/{session}/{}", self.prefix, artefact.file_name())
    }

    fn heard(&self) -> MutexGuard<'_, Option<(Instant, Option<String>)>> {
        self.heard.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records what a call told us of the store, and passes its result on.
    fn note<T>(&self, result: Result<T, StorageError>) -> Result<T, StorageError> {
        let problem = match &result {
            Err(e @ (StorageError::Unavailable(_) | StorageError::Denied(_) | StorageError::Rejected(_))) => {
                Some(e.public_message().to_string())
            }
            _ => None,
        };
        *self.heard() = Some((Instant::now(), problem));
        result
    }

    /// The bytes of a listing page (also the health probe, with `max_keys`).
    fn list_page(
        &self,
        token: Option<&str>,
        max_keys: Option<usize>,
        timeout: Option<Duration>,
    ) -> Result<String, StorageError> {
        let mut action = self.bucket.list_objects_v2(Some(&self.credentials));
        action.with_prefix(format!("{}sessions/", self.prefix));
        if let Some(token) = token {
            action.with_continuation_token(token.to_string());
        }
        if let Some(n) = max_keys {
            action.with_max_keys(n);
        }
        let url = action.sign(SIGNED_FOR);
        let request = self.agent.get(url.as_str());
        let sent = match timeout {
            Some(t) => request.config().timeout_global(Some(t)).build().call(),
            None => request.call(),
        };
        let mut response = sent.map_err(|e| classify(e, "listing"))?;
        response.body_mut().read_to_string().map_err(|e| classify(e, "listing"))
    }
}

impl Backend for S3Bucket {
    fn kind(&self) -> &'static str {
        "s3"
    }

    fn put(&self, session: &str, artefact: Artefact, bytes: &[u8]) -> Result<(), StorageError> {
        let url = self.bucket.put_object(Some(&self.credentials), &self.key(session, artefact)).sign(SIGNED_FOR);
        let sent = self.agent.put(url.as_str()).header("Content-Type", "image/png").send(bytes);
        self.note(sent.map(drop).map_err(|e| classify(e, "writing an artefact")))
    }

    fn get(&self, session: &str, artefact: Artefact) -> Result<Vec<u8>, StorageError> {
        let url = self.bucket.get_object(Some(&self.credentials), &self.key(session, artefact)).sign(SIGNED_FOR);
        let got = match self.agent.get(url.as_str()).call() {
            Ok(mut response) => response
                .body_mut()
                .with_config()
                .limit(MAX_OBJECT_BYTES)
                .read_to_vec()
                .map_err(|e| classify(e, "reading an artefact")),
            Err(ureq::Error::StatusCode(404)) => Err(StorageError::NotFound(artefact)),
            Err(e) => Err(classify(e, "reading an artefact")),
        };
        self.note(got)
    }

    fn delete(&self, session: &str, artefact: Artefact) -> Result<(), StorageError> {
        let url = self.bucket.delete_object(Some(&self.credentials), &self.key(session, artefact)).sign(SIGNED_FOR);
        // Deleting what is not there succeeds in S3: two replicas sweeping at once is harmless.
        let done = match self.agent.delete(url.as_str()).call() {
            Ok(_) | Err(ureq::Error::StatusCode(404)) => Ok(()),
            Err(e) => Err(classify(e, "deleting an artefact")),
        };
        self.note(done)
    }

    /// A session's keys are known (one per artefact), so no listing is needed.
    fn delete_session(&self, session: &str) -> Result<(), StorageError> {
        Artefact::ALL.iter().try_for_each(|a| self.delete(session, *a))
    }

    /// Every session under the prefix, its objects' sizes and the time of its last write
    /// (S3 keeps no read times: a session's age counts from its last write here, from
    /// its last use on the replica that served it).
    fn list(&self) -> Result<Vec<SessionUsage>, StorageError> {
        let base = format!("{}sessions/", self.prefix);
        let mut sessions: HashMap<String, SessionUsage> = HashMap::new();
        let mut token: Option<String> = None;
        loop {
            let text = self.note(self.list_page(token.as_deref(), None, None))?;
            let page = match ListObjectsV2::parse_response(&text) {
                Ok(page) => page,
                Err(e) => return self.note(Err(StorageError::Rejected(format!("unreadable listing: {e}")))),
            };
            for object in page.contents {
                let key = percent_decode(&object.key);
                let Some((id, name)) = key.strip_prefix(&base).and_then(|rest| rest.split_once('/')) else { continue };
                let Some(artefact) = Artefact::ALL.iter().find(|a| a.file_name() == name) else { continue };
                if SessionId::parse(id).is_none() {
                    continue;
                }
                let modified = parse_time(&object.last_modified).unwrap_or(SystemTime::UNIX_EPOCH);
                let entry = sessions.entry(id.to_string()).or_insert_with(|| SessionUsage {
                    id: id.to_string(),
                    bytes: [0; FILES],
                    last_used: modified,
                });
                entry.bytes[artefact.index()] = footprint(object.size);
                entry.last_used = entry.last_used.max(modified);
            }
            match page.next_continuation_token {
                Some(next) if !next.is_empty() => token = Some(next),
                _ => break,
            }
        }
        Ok(sessions.into_values().collect())
    }

    /// What the store last told us; a short probe (one listing of one key) when that is
    /// older than a few seconds or was a failure, so that `/health` stays cheap under
    /// traffic and still notices a recovery.
    fn health(&self) -> BackendHealth {
        let last = self.heard().clone();
        let problem = match last {
            Some((at, problem)) if at.elapsed() < HEALTH_FRESH && problem.is_none() => None,
            _ => self
                .note(self.list_page(None, Some(1), Some(PROBE_TIMEOUT)))
                .err()
                .map(|e| e.public_message().to_string()),
        };
        let ok = problem.is_none();
        BackendHealth { kind: self.kind(), reachable: ok, writable: ok, problem }
    }
}

/// A failed call, as the client is told of it: unreachable or overloaded (503, retry),
/// credentials refused, or another refusal (500, tell the operator).
fn classify(error: ureq::Error, what: &str) -> StorageError {
    match error {
        ureq::Error::StatusCode(code @ (401 | 403)) => StorageError::Denied(format!("{what}: HTTP {code}")),
        ureq::Error::StatusCode(code) if code == 429 || code >= 500 => {
            StorageError::Unavailable(format!("{what}: HTTP {code}"))
        }
        ureq::Error::StatusCode(code) => StorageError::Rejected(format!("{what}: HTTP {code}")),
        // Connection refused or reset, name not found, time-outs, broken bodies. (The
        // signed URL, which carries the access key id, is never part of the message.)
        other => StorageError::Unavailable(format!("{what}: {other}")),
    }
}

/// Listing keys come URL-encoded (`encoding-type=url`).
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1).copied().and_then(hex), bytes.get(i + 2).copied().and_then(hex)) {
            (b'%', Some(hi), Some(lo)) => {
                out.push((hi * 16 + lo) as u8);
                i += 3;
            }
            (b'+', _, _) => {
                out.push(b' ');
                i += 1;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_time(text: &str) -> Option<SystemTime> {
    let t = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).ok()?;
    Some(SystemTime::from(t))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listing_keys_and_times_are_read_as_s3_writes_them() {
        assert_eq!(percent_decode("p%2Fsessions%2Fab/image.png"), "p/sessions/ab/image.png");
        let t = parse_time("2026-12-02T10:00:00.000Z").unwrap();
        assert_eq!(t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs(), 1_796_205_600);
    }

    #[test]
    fn settings_are_refused_with_the_variable_named() {
        let settings = |endpoint: Option<&str>, allow_http| S3Settings {
            bucket: "b".into(),
            prefix: String::new(),
            endpoint: endpoint.map(str::to_string),
            region: "us-east-1".into(),
            access_key_id: "id".into(),
            secret_access_key: "secret".into(),
            session_token: None,
            allow_http,
            virtual_hosted: false,
        };
        let http = S3Bucket::new(settings(Some("http://127.0.0.1:9000"), false)).err().unwrap();
        assert_eq!(http.var, "AWS_ENDPOINT_URL");
        assert!(S3Bucket::new(settings(Some("http://127.0.0.1:9000"), true)).is_ok());
        assert!(S3Bucket::new(settings(None, false)).is_ok(), "AWS itself by default");
        let mut no_key = settings(None, false);
        no_key.secret_access_key.clear();
        assert_eq!(S3Bucket::new(no_key).err().unwrap().var, "AWS_ACCESS_KEY_ID");
    }
}
