//! HTTP webhook sink (reqwest): every message is one `POST` of its payload to the endpoint of
//! its topic, signed by the Standard Webhooks scheme (<https://www.standardwebhooks.com>).
//!
//! **Endpoint of a topic.** The first `--http-route PATTERN=URL` whose pattern matches the topic
//! (`payment.succeeded` exactly, or `payment.*` for every topic starting with `payment.`), else
//! `--http-url`. In either URL, `{topic}` is replaced by the topic, percent-encoded as one path
//! segment (`https://hooks.example.com/in/{topic}` -> `.../in/payment.succeeded`). A topic with
//! no endpoint is a permanent failure of that message (it can be replayed once a route exists).
//!
//! **Request.** Body: the payload, as stored. Headers: `content-type` (the producer's, else
//! `application/octet-stream`) and the producer's other headers; the `Tidings-*` headers
//! (message id, topic, key, biz-id, created time, attempt); `webhook-id` (the message id,
//! stable across retries), `webhook-timestamp` (this attempt's Unix seconds) and
//! `webhook-signature` (`v1,<HMAC-SHA256>` with each `--http-secret`, space-separated: add the
//! new secret, let receivers learn it, then drop the old one); `Tidings-Signature` (the same
//! scheme over the metadata headers a receiver deduplicates on, see
//! [`tidings_outbox::webhook`]); and `Idempotency-Key` (the message id). Redirects are not
//! followed (a signed message goes only where it was configured to go); no proxy is taken from
//! the environment.
//!
//! **Answers.** 2xx: delivered. 429 and 503 with `Retry-After` (seconds or an HTTP date):
//! retried at that time, the hint stored as the row's next attempt time (the relay caps it by
//! its longest backoff). 408, 429, 5xx and a timeout: retried with backoff. Any other answer
//! (3xx, 4xx, 410 included) is permanent: dead-lettered at once, with the status and up to 200
//! bytes of the answer's body in the error.
//!
//! **An endpoint down is an outage, not the messages' fault.** Each endpoint (an origin:
//! scheme, host and port, shared by all its topics' URLs) has a circuit: it opens when a
//! connection cannot be made (refused, DNS, TLS, connect timeout) or after
//! `--http-failure-threshold` failures in a row (408/429/5xx, timeouts), and stays open for a
//! cool-down that starts at one second and doubles up to `--http-cooldown-max` (or the
//! endpoint's `Retry-After`, when longer). The failures before the threshold count as the
//! messages' attempts; from the one that opens the circuit on, the endpoint's messages are
//! **postponed** ([`SinkError::Postpone`]: their next attempt time moves, their attempts do
//! not), and nothing is sent to it. When every endpoint used lately is down, the sink's health
//! check fails: the relay counts none of the batch's failures and backs off as for any broker
//! outage. After the cool-down one message goes as a probe: its success closes the circuit; a
//! failed probe is not counted and waits twice as long as the others, so that the next probe
//! is another message. A message that makes its endpoint fail therefore cannot keep it "down"
//! while other messages get through, and between their successes its own failures count, so
//! it still ends dead; alone (no other traffic to that endpoint) it is indistinguishable from
//! an outage and waits, uncounted. A probe whose request is abandoned (the relay gave up on the
//! round) is forgotten, so another can start. At most `--http-concurrency` requests are in
//! flight per endpoint; a message that finds no free slot within the timeout is postponed.
//!
//! **Secrets.** Neither the secrets nor the URLs (whose path or query may hold a token) are
//! logged or put in an error: an endpoint is named by its scheme, host and port only.
//! reqwest's own errors are shown without their URL. TLS: the system roots plus
//! `--http-tls-ca`, verified by rustls (ring).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use reqwest::StatusCode;
use tidings_outbox::webhook::{self, Secret};
use tokio::sync::Semaphore;

use super::{Capabilities, Delivery, Envelope, Sink, SinkError};
use crate::Error;

/// The sink's default payload limit (16 MiB); receivers usually set their own, lower one, and
/// answer 413, a permanent failure.
pub const HTTP_MAX_MESSAGE_SIZE: usize = 16 * 1024 * 1024;

/// Characters encoded when a topic becomes a path segment: all but the unreserved ones.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// The first cool-down of an endpoint's circuit.
const COOLDOWN_MIN: Duration = Duration::from_secs(1);
/// How long messages wait while an endpoint's probe is in flight.
const PROBE_WAIT: Duration = Duration::from_millis(250);
/// An endpoint unused this long is forgotten (its circuit closed).
const ENDPOINT_IDLE: Duration = Duration::from_secs(600);
/// The longest `Retry-After` taken as it is.
const RETRY_AFTER_MAX: Duration = Duration::from_secs(3600);

/// HTTP webhook sink settings.
#[derive(Clone)]
pub struct HttpSinkConfig {
    /// Endpoint of topics no route matches; `{topic}` is replaced by the topic (one
    /// percent-encoded path segment). `http://` or `https://`, no credentials.
    pub url: Option<String>,
    /// `(pattern, url)`: a topic matching `pattern` (exact, or a prefix ending in `*`) goes to
    /// `url` (with `{topic}` replaced). The first match wins.
    pub routes: Vec<(String, String)>,
    /// Signing secrets, `whsec_...`; every request is signed with each.
    pub secrets: Vec<String>,
    /// Bounds one request, from connecting to the end of the answer (and the wait for a free
    /// slot of its endpoint). Defaults to 4 seconds.
    pub timeout: Duration,
    /// Largest payload sent; a larger one is a permanent failure.
    pub max_message_bytes: usize,
    /// Requests in flight per endpoint at most. Defaults to 16.
    pub concurrency: usize,
    /// Failures in a row (408/429/5xx, timeouts) that open an endpoint's circuit. Defaults to 5.
    pub failure_threshold: u32,
    /// The longest cool-down of an open circuit. Defaults to 30 seconds.
    pub cooldown_max: Duration,
    /// Extra CA certificates (PEM) trusted besides the system roots.
    pub tls_ca_file: Option<PathBuf>,
}

impl Default for HttpSinkConfig {
    fn default() -> Self {
        HttpSinkConfig {
            url: None,
            routes: Vec::new(),
            secrets: Vec::new(),
            timeout: Duration::from_secs(4),
            max_message_bytes: HTTP_MAX_MESSAGE_SIZE,
            concurrency: 16,
            failure_threshold: 5,
            cooldown_max: Duration::from_secs(30),
            tls_ca_file: None,
        }
    }
}

/// Shows endpoints by scheme, host and port only, and no secret.
impl std::fmt::Debug for HttpSinkConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpSinkConfig")
            .field("url", &self.url.as_deref().map(shown))
            .field(
                "routes",
                &self
                    .routes
                    .iter()
                    .map(|(p, u)| format!("{p}={}", shown(u)))
                    .collect::<Vec<_>>(),
            )
            .field("secrets", &format!("<{} redacted>", self.secrets.len()))
            .field("timeout", &self.timeout)
            .field("max_message_bytes", &self.max_message_bytes)
            .field("concurrency", &self.concurrency)
            .field("failure_threshold", &self.failure_threshold)
            .field("cooldown_max", &self.cooldown_max)
            .field("tls_ca_file", &self.tls_ca_file)
            .finish()
    }
}

/// The HTTP sink's flags and environment variables (`tidings relay --sink http`).
#[derive(clap::Args)]
#[command(next_help_heading = "HTTP webhook sink (--sink http)")]
pub struct HttpArgs {
    /// Endpoint of topics no --http-route matches; {topic} is replaced by the topic
    /// (percent-encoded), e.g. https://hooks.example.com/in/{topic}. Never logged beyond
    /// scheme, host and port.
    #[arg(long, env = "TIDINGS_HTTP_URL", hide_env_values = true)]
    pub http_url: Option<String>,
    /// PATTERN=URL: topics matching PATTERN (exact, or a prefix ending in *) go to URL
    /// ({topic} replaced). Repeat it (or separate by spaces in the variable); the first match
    /// wins.
    #[arg(
        long = "http-route",
        env = "TIDINGS_HTTP_ROUTES",
        value_delimiter = ' ',
        hide_env_values = true
    )]
    pub http_routes: Vec<String>,
    /// Signing secret, whsec_ + base64 of 24-64 bytes. Repeat it (or separate by spaces in the
    /// variable) to sign with several while rotating. Prefer the variable or
    /// --http-secret-file: command lines are visible to other users.
    #[arg(
        long = "http-secret",
        env = "TIDINGS_HTTP_SECRET",
        value_delimiter = ' ',
        hide_env_values = true
    )]
    pub http_secrets: Vec<String>,
    /// File with one signing secret per line (read at start-up), besides --http-secret.
    #[arg(long, env = "TIDINGS_HTTP_SECRET_FILE")]
    pub http_secret_file: Option<PathBuf>,
    /// Requests in flight per endpoint at most.
    #[arg(long, env = "TIDINGS_HTTP_CONCURRENCY", default_value_t = 16)]
    pub http_concurrency: usize,
    /// Failures in a row (408, 429, 5xx, timeouts) after which an endpoint counts as down: its
    /// messages wait, without counting attempts, until a probe gets through.
    #[arg(long, env = "TIDINGS_HTTP_FAILURE_THRESHOLD", default_value_t = 5)]
    pub http_failure_threshold: u32,
    /// Longest wait before probing an endpoint that is down again (the wait starts at 1 s and
    /// doubles), e.g. 30s.
    #[arg(long, env = "TIDINGS_HTTP_COOLDOWN_MAX", default_value = "30s", value_parser = crate::parse_duration)]
    pub http_cooldown_max: Duration,
    /// Largest payload in bytes; a larger message is dead-lettered.
    #[arg(long, env = "TIDINGS_HTTP_MAX_MESSAGE_SIZE", default_value_t = HTTP_MAX_MESSAGE_SIZE)]
    pub http_max_message_size: usize,
    /// Extra CA certificate (PEM) to trust for https://, besides the system roots.
    #[arg(long, env = "TIDINGS_HTTP_TLS_CA")]
    pub http_tls_ca: Option<PathBuf>,
}

impl HttpArgs {
    /// Checks the flags, reads the secret file and builds the sink (see
    /// [`HttpSink::connect`]); a request ends within four fifths of `publish_timeout`, so that
    /// the sink, not the relay's own timeout, says why.
    pub async fn connect(self, publish_timeout: Duration) -> Result<HttpSink, Error> {
        let mut secrets = self.http_secrets;
        if let Some(path) = &self.http_secret_file {
            let text = tokio::fs::read_to_string(path).await.map_err(|e| {
                config_err(format!(
                    "--http-secret-file: cannot read {}: {e}",
                    path.display()
                ))
            })?;
            secrets.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .map(str::to_owned),
            );
        }
        let mut routes = Vec::with_capacity(self.http_routes.len());
        for r in self.http_routes.iter().filter(|r| !r.is_empty()) {
            let Some((pattern, url)) = r.split_once('=') else {
                return Err(config_err(
                    "--http-route must be PATTERN=URL (e.g. payment.*=https://hooks.example.com/payments)",
                ));
            };
            routes.push((pattern.to_owned(), url.to_owned()));
        }
        HttpSink::connect(HttpSinkConfig {
            url: self.http_url,
            routes,
            secrets,
            timeout: (publish_timeout * 4 / 5).max(Duration::from_millis(100)),
            max_message_bytes: self.http_max_message_size,
            concurrency: self.http_concurrency,
            failure_threshold: self.http_failure_threshold,
            cooldown_max: self.http_cooldown_max,
            tls_ca_file: self.http_tls_ca,
        })
        .await
    }
}

fn config_err(what: impl Into<String>) -> Error {
    Error::Config(what.into())
}

/// An endpoint as it may be shown: scheme, host and port (never path, query or credentials).
pub fn shown(url: &str) -> String {
    match url::Url::parse(&url.replace("{topic}", "t")) {
        Ok(u) => match (u.host_str(), u.port_or_known_default()) {
            (Some(h), Some(p)) => format!("{}://{h}:{p}", u.scheme()),
            _ => "<an endpoint without a host>".into(),
        },
        Err(_) => "<an unparsable endpoint>".into(),
    }
}

/// Checks one endpoint template; `flag` names it in the error.
fn check_template(template: &str, flag: &str) -> Result<(), Error> {
    let u = url::Url::parse(&template.replace("{topic}", "topic"))
        .map_err(|e| config_err(format!("{flag}: not a URL ({e})")))?;
    if !matches!(u.scheme(), "http" | "https") {
        return Err(config_err(format!(
            "{flag}: the scheme must be http or https, not {}",
            u.scheme()
        )));
    }
    if u.host_str().is_none_or(str::is_empty) {
        return Err(config_err(format!("{flag}: the URL has no host")));
    }
    if !u.username().is_empty() || u.password().is_some() {
        return Err(config_err(format!(
            "{flag}: credentials in the URL are refused (requests are signed with --http-secret)"
        )));
    }
    if u.fragment().is_some() {
        return Err(config_err(format!(
            "{flag}: the URL must not have a #fragment"
        )));
    }
    Ok(())
}

/// One endpoint's circuit and its slots (an endpoint is an origin: scheme, host and port).
struct Endpoint {
    shown: String,
    slots: Arc<Semaphore>,
    circuit: Mutex<Circuit>,
}

#[derive(Default)]
struct Circuit {
    /// Failures in a row.
    failures: u32,
    /// Open until then (no requests but the probe's).
    open_until: Option<Instant>,
    /// The next cool-down.
    cooldown: Duration,
    /// A probe is in flight since then (a probe older than twice the timeout was dropped
    /// without an outcome, and another may start).
    probe_since: Option<Instant>,
    last_used: Option<Instant>,
}

/// What the circuit lets a message do.
enum Pass {
    /// Send it (`probe`: the one message sent to find out whether the endpoint is back).
    Go { probe: bool },
    /// Do not send it: the endpoint is down; wait this long.
    Wait(Duration),
}

/// What a failure did to the circuit.
enum Verdict {
    /// The circuit is closed: the failure is this message's (counted).
    Counted,
    /// The circuit is open: the failure is the endpoint's; the message waits this long,
    /// uncounted.
    Down(Duration),
}

/// Clears the circuit's probe mark if a probe's future is dropped before its outcome (the
/// relay gave up on the round): otherwise the endpoint would wait for that probe forever.
struct ProbeGuard<'a>(Option<&'a Endpoint>);

impl Drop for ProbeGuard<'_> {
    fn drop(&mut self) {
        if let Some(ep) = self.0 {
            ep.lock().probe_since = None;
        }
    }
}

impl Endpoint {
    fn lock(&self) -> std::sync::MutexGuard<'_, Circuit> {
        self.circuit.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn pass(&self, timeout: Duration) -> Pass {
        let mut c = self.lock();
        let now = Instant::now();
        c.last_used = Some(now);
        match c.open_until {
            None => Pass::Go { probe: false },
            Some(until) if now < until => Pass::Wait(until - now),
            Some(_) if c.probe_since.is_some_and(|t| now - t < timeout * 2) => {
                Pass::Wait(PROBE_WAIT)
            }
            Some(_) => {
                c.probe_since = Some(now);
                Pass::Go { probe: true }
            }
        }
    }

    fn is_open(&self) -> bool {
        self.lock().open_until.is_some()
    }

    fn succeeded(&self) {
        let mut c = self.lock();
        if c.open_until.is_some() {
            tracing::info!(endpoint = %self.shown, "webhook endpoint answers again");
        }
        c.failures = 0;
        c.open_until = None;
        c.cooldown = COOLDOWN_MIN;
        c.probe_since = None;
    }

    /// Records a failure of a request: `down` (no connection) opens the circuit at once, as
    /// does the threshold of failures in a row, or a failed probe (with a doubled cool-down);
    /// `hint` is the endpoint's own `Retry-After`.
    fn failed(
        &self,
        down: bool,
        probe: bool,
        hint: Option<Duration>,
        threshold: u32,
        max: Duration,
        why: &str,
    ) -> Verdict {
        let max = max.max(COOLDOWN_MIN);
        let mut c = self.lock();
        c.failures = c.failures.saturating_add(1);
        if probe {
            c.probe_since = None;
        }
        let now = Instant::now();
        if let (Some(until), false) = (c.open_until, probe) {
            // Already open: one more request of the wave that opened it (sent before it
            // opened) failing too. It neither escalates the cool-down nor shortens it.
            let until = until.max(now + hint.unwrap_or_default().min(max));
            c.open_until = Some(until);
            return Verdict::Down(until.saturating_duration_since(now));
        }
        if !(down || probe || c.failures >= threshold) {
            return Verdict::Counted;
        }
        if c.cooldown.is_zero() {
            c.cooldown = COOLDOWN_MIN;
        }
        let wait = c.cooldown.max(hint.unwrap_or_default()).min(max);
        if c.open_until.is_none() {
            tracing::warn!(endpoint = %self.shown, failures = c.failures, retry_in = ?wait, error = why,
                "webhook endpoint is down: its messages wait (no attempts counted) until a probe gets through");
        }
        c.open_until = Some(now + wait);
        c.cooldown = (c.cooldown * 2).min(max);
        // A failed probe waits twice as long as the others, so that the next probe is another
        // message: a message that makes its endpoint fail cannot keep it "down" while other
        // messages would get through.
        Verdict::Down(if probe { wait * 2 } else { wait })
    }
}

/// Publishes to HTTP webhook endpoints.
pub struct HttpSink {
    config: HttpSinkConfig,
    secrets: Vec<Secret>,
    client: reqwest::Client,
    /// By origin (`scheme://host:port`).
    endpoints: Mutex<HashMap<String, Arc<Endpoint>>>,
}

impl HttpSink {
    /// Checks the settings and builds the client (no request is sent: an endpoint's first
    /// message is its first contact).
    pub async fn connect(config: HttpSinkConfig) -> Result<HttpSink, Error> {
        if config.url.is_none() && config.routes.is_empty() {
            return Err(config_err(
                "--sink http needs --http-url (the endpoint of every topic) or at least one --http-route",
            ));
        }
        if let Some(u) = &config.url {
            check_template(u, "--http-url")?;
        }
        for (pattern, url) in &config.routes {
            if pattern.is_empty() {
                return Err(config_err(
                    "--http-route: the topic pattern before = is empty",
                ));
            }
            if pattern.contains("://") || pattern.contains('/') {
                // Most likely a URL without PATTERN= (split at its query's =): not repeated.
                return Err(config_err(
                    "--http-route must be PATTERN=URL; the part before = looks like a URL",
                ));
            }
            if pattern.strip_suffix('*').unwrap_or(pattern).contains('*') {
                return Err(config_err(format!(
                    "--http-route: pattern {pattern:?} may have * only at its end"
                )));
            }
            check_template(url, &format!("--http-route {pattern}"))?;
        }
        if config.secrets.is_empty() {
            return Err(config_err(
                "--sink http needs a signing secret: --http-secret, TIDINGS_HTTP_SECRET or --http-secret-file (whsec_ + base64 of 24-64 random bytes)",
            ));
        }
        let secrets = config
            .secrets
            .iter()
            .enumerate()
            .map(|(i, s)| {
                Secret::parse(s)
                    .map_err(|e| config_err(format!("--http-secret (number {}): {e}", i + 1)))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if config.concurrency == 0 {
            return Err(config_err("--http-concurrency must be greater than 0"));
        }
        if config.failure_threshold == 0 {
            return Err(config_err(
                "--http-failure-threshold must be greater than 0",
            ));
        }
        if config.max_message_bytes == 0 {
            return Err(config_err("--http-max-message-size must be greater than 0"));
        }
        if config.timeout.is_zero() {
            return Err(config_err("the HTTP timeout must be greater than 0"));
        }
        let tls = tls_config(config.tls_ca_file.as_deref()).await?;
        let client = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .connect_timeout(config.timeout * 3 / 4)
            .timeout(config.timeout)
            .pool_max_idle_per_host(config.concurrency)
            .user_agent(concat!("tidings/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| Error::Sink(format!("cannot build the HTTP client: {}", chain(&e))))?;
        tracing::info!(
            default = ?config.url.as_deref().map(shown),
            routes = config.routes.len(),
            secrets = secrets.len(),
            "using HTTP webhooks"
        );
        Ok(HttpSink {
            config,
            secrets,
            client,
            endpoints: Mutex::new(HashMap::new()),
        })
    }

    /// The URL a topic's messages go to, if any.
    pub fn endpoint_url(&self, topic: &str) -> Option<String> {
        let template = self
            .config
            .routes
            .iter()
            .find(|(p, _)| match p.strip_suffix('*') {
                Some(prefix) => topic.starts_with(prefix),
                None => p == topic,
            })
            .map(|(_, u)| u)
            .or(self.config.url.as_ref())?;
        Some(template.replace("{topic}", &utf8_percent_encode(topic, SEGMENT).to_string()))
    }

    /// The endpoint (origin) of a URL.
    fn endpoint(&self, url: &url::Url) -> Arc<Endpoint> {
        let origin = shown(url.as_str());
        let mut map = self.endpoints.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = map.get(&origin) {
            return e.clone();
        }
        if map.len() >= 1024 {
            map.retain(|_, e| {
                let c = e.lock();
                c.open_until.is_some() || c.last_used.is_some_and(|t| t.elapsed() < ENDPOINT_IDLE)
            });
        }
        let e = Arc::new(Endpoint {
            shown: origin.clone(),
            slots: Arc::new(Semaphore::new(self.config.concurrency)),
            circuit: Mutex::new(Circuit {
                cooldown: COOLDOWN_MIN,
                ..Default::default()
            }),
        });
        map.insert(origin, e.clone());
        e
    }

    /// Whether every endpoint used lately is down (then the sink as a whole is).
    fn all_down(&self) -> bool {
        let map = self.endpoints.lock().unwrap_or_else(|p| p.into_inner());
        let mut recent = map.values().filter(|e| {
            e.lock()
                .last_used
                .is_some_and(|t| t.elapsed() < ENDPOINT_IDLE)
        });
        let mut any = false;
        let all = recent.all(|e| {
            any = true;
            e.is_open()
        });
        any && all
    }

    /// The request headers of `msg`, or why HTTP cannot carry them.
    fn headers(&self, msg: &Envelope, now: i64) -> Result<HeaderMap, SinkError> {
        let mut h = HeaderMap::with_capacity(msg.headers.len() + 12);
        for (name, value) in msg.wire_headers() {
            let n = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                SinkError::Permanent(format!("header name {name:?} is not an HTTP token").into())
            })?;
            if h.contains_key(&n) {
                return Err(SinkError::Permanent(
                    format!("headers named {name:?} twice (HTTP header names ignore case)").into(),
                ));
            }
            if value.starts_with([' ', '\t']) || value.ends_with([' ', '\t']) {
                // HTTP drops them on the way, and the receiver would see another value
                // (another biz-id or key: its metadata signature would not match).
                return Err(SinkError::Permanent(
                    format!("the value of header {name:?} starts or ends with a space or tab, which HTTP strips").into(),
                ));
            }
            let v = HeaderValue::from_bytes(value.as_bytes()).map_err(|_| {
                SinkError::Permanent(
                    format!("the value of header {name:?} cannot be carried by HTTP").into(),
                )
            })?;
            h.insert(n, v);
        }
        if !h.contains_key(CONTENT_TYPE) {
            h.insert(
                CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
        }
        let id = msg.id.to_string();
        let metadata = webhook::metadata_text(
            &msg.topic,
            msg.key.as_deref(),
            msg.biz_id.as_deref(),
            h.get(tidings_outbox::envelope::HEADER_CREATED_AT)
                .and_then(|v| v.to_str().ok()),
        );
        let sig = webhook::sign(&self.secrets, &id, now, &msg.payload);
        let meta_sig = webhook::sign_metadata(&self.secrets, &id, now, &metadata);
        let ascii =
            |s: String| HeaderValue::from_str(&s).expect("ids, numbers and base64 are ASCII");
        h.insert(webhook::WEBHOOK_ID, ascii(id.clone()));
        h.insert(webhook::WEBHOOK_TIMESTAMP, ascii(now.to_string()));
        h.insert(webhook::WEBHOOK_SIGNATURE, ascii(sig));
        h.insert(
            HeaderName::from_static("tidings-signature"),
            ascii(meta_sig),
        );
        h.insert(HeaderName::from_static("idempotency-key"), ascii(id));
        Ok(h)
    }

    async fn send(&self, msg: &Envelope) -> Result<Delivery, SinkError> {
        let started = Instant::now();
        if msg.payload.len() > self.config.max_message_bytes {
            return Err(SinkError::Permanent(
                format!(
                    "message of {} bytes is larger than the limit of {} bytes (--http-max-message-size)",
                    msg.payload.len(),
                    self.config.max_message_bytes
                )
                .into(),
            ));
        }
        let Some(url) = self.endpoint_url(&msg.topic) else {
            return Err(SinkError::Permanent(
                format!(
                    "no endpoint for topic {:?}: no --http-route matches and there is no --http-url",
                    msg.topic
                )
                .into(),
            ));
        };
        let parsed = url::Url::parse(&url).map_err(|e| {
            SinkError::Permanent(
                format!("the endpoint of topic {:?} is not a URL: {e}", msg.topic).into(),
            )
        })?;
        let ep = self.endpoint(&parsed);
        let down = |wait: Duration| {
            SinkError::Postpone(
                wait,
                format!("webhook endpoint {} is down", ep.shown).into(),
            )
        };
        let probe = match ep.pass(self.config.timeout) {
            Pass::Wait(w) => return Err(down(w)),
            Pass::Go { probe } => probe,
        };
        let _guard = ProbeGuard(probe.then_some(&*ep));
        let deadline = started + self.config.timeout;
        let permit = match tokio::time::timeout_at(
            deadline.into(),
            ep.slots.clone().acquire_owned(),
        )
        .await
        {
            Ok(Ok(p)) => p,
            _ => {
                return Err(SinkError::Postpone(
                        PROBE_WAIT,
                        format!(
                            "not sent: all {} slots of webhook endpoint {} stayed busy for {:?} (--http-concurrency)",
                            self.config.concurrency, ep.shown, self.config.timeout
                        )
                        .into(),
                    ));
            }
        };
        // It may have gone down while this message waited for a slot.
        if !probe && ep.is_open() {
            drop(permit);
            return Err(down(PROBE_WAIT));
        }
        // Signed just before sending: the timestamp is this attempt's.
        let headers = self.headers(msg, chrono::Utc::now().timestamp())?;
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        let answer = self
            .client
            .post(parsed)
            .headers(headers)
            .timeout(left)
            .body(msg.payload.clone())
            .send()
            .await;
        let (threshold, max) = (self.config.failure_threshold, self.config.cooldown_max);
        // A failure with an answer (or a timeout): the message's while the circuit is closed,
        // the endpoint's once it is open (or when it opens now).
        let failed = |hint: Option<Duration>, why: String| -> SinkError {
            match ep.failed(false, probe, hint, threshold, max, &why) {
                Verdict::Down(wait) => SinkError::Postpone(wait, why.into()),
                Verdict::Counted => match hint {
                    Some(after) => SinkError::RetryAfter(after, why.into()),
                    None => SinkError::Retryable(why.into()),
                },
            }
        };
        let resp = match answer {
            Ok(r) => r,
            Err(e) => {
                let e = e.without_url();
                let why = format!("webhook endpoint {}: {}", ep.shown, chain(&e));
                if e.is_connect() {
                    let wait = match ep.failed(true, probe, None, threshold, max, &why) {
                        Verdict::Down(w) => w,
                        Verdict::Counted => COOLDOWN_MIN,
                    };
                    return Err(SinkError::Postpone(wait, why.into()));
                }
                if e.is_timeout() {
                    return Err(failed(
                        None,
                        format!(
                            "webhook endpoint {} did not answer within {:?} (outcome unknown)",
                            ep.shown, self.config.timeout
                        ),
                    ));
                }
                return Err(failed(None, why));
            }
        };
        let status = resp.status();
        if status.is_success() {
            ep.succeeded();
            return Ok(Delivery::default());
        }
        // A hint shorter than the first cool-down is taken as that (a `Retry-After: 0` must
        // not spend every attempt within a second).
        let hint = retry_after(resp.headers().get(RETRY_AFTER)).map(|h| h.max(COOLDOWN_MIN));
        let body = read_some(resp, deadline).await;
        let why = format!("webhook endpoint {} answered {status}{body}", ep.shown);
        match status {
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => {
                Err(failed(hint, why))
            }
            StatusCode::REQUEST_TIMEOUT => Err(failed(None, why)),
            s if s.is_server_error() => Err(failed(None, why)),
            s if s.is_redirection() => {
                // The endpoint is alive; the message goes nowhere it was not configured to.
                ep.succeeded();
                Err(SinkError::Permanent(
                    format!("{why} (a redirect: tidings does not follow them; point the route at the final URL)").into(),
                ))
            }
            _ => {
                ep.succeeded();
                Err(SinkError::Permanent(why.into()))
            }
        }
    }
}
/// Up to 200 bytes of an error answer's body, as `: text` (control characters replaced), or
/// nothing; reading stops at the deadline.
async fn read_some(resp: reqwest::Response, deadline: Instant) -> String {
    let mut resp = resp;
    let mut got = Vec::new();
    while got.len() < 200 {
        match tokio::time::timeout_at(deadline.into(), resp.chunk()).await {
            Ok(Ok(Some(c))) => got.extend_from_slice(&c),
            _ => break,
        }
    }
    got.truncate(200);
    let text: String = String::from_utf8_lossy(&got)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let text = text.trim();
    if text.is_empty() {
        String::new()
    } else {
        format!(": {text}")
    }
}

/// `Retry-After` as a wait: delta-seconds or an HTTP date; capped at an hour.
fn retry_after(v: Option<&HeaderValue>) -> Option<Duration> {
    let s = v?.to_str().ok()?.trim();
    let wait = if let Ok(secs) = s.parse::<u64>() {
        Duration::from_secs(secs)
    } else {
        let at = chrono::DateTime::parse_from_rfc2822(s).ok()?;
        (at.with_timezone(&chrono::Utc) - chrono::Utc::now())
            .to_std()
            .unwrap_or_default()
    };
    Some(wait.min(RETRY_AFTER_MAX))
}

/// An error and its sources as one line.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = c.source();
    }
    s
}

/// rustls with ring, the system roots and the extra CA file.
async fn tls_config(ca: Option<&std::path::Path>) -> Result<rustls::ClientConfig, Error> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    if let Some(path) = ca {
        let pem = tokio::fs::read(path).await.map_err(|e| {
            config_err(format!(
                "--http-tls-ca: cannot read {}: {e}",
                path.display()
            ))
        })?;
        use rustls::pki_types::pem::PemObject;
        let mut n = 0;
        for cert in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|e| {
                config_err(format!("--http-tls-ca: {} is not PEM: {e}", path.display()))
            })?;
            roots.add(cert).map_err(|e| {
                config_err(format!(
                    "--http-tls-ca: a certificate in {} is refused: {e}",
                    path.display()
                ))
            })?;
            n += 1;
        }
        if n == 0 {
            return Err(config_err(format!(
                "--http-tls-ca: {} holds no PEM certificate",
                path.display()
            )));
        }
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| Error::Sink(format!("TLS set-up: {e}")))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tls)
}

impl Sink for HttpSink {
    fn name(&self) -> &'static str {
        "http"
    }

    fn publish<'a>(&'a self, msg: &'a Envelope) -> BoxFuture<'a, Result<Delivery, SinkError>> {
        Box::pin(self.send(msg))
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            // Receivers deduplicate (webhook-id, Idempotency-Key, or the inbox); HTTP itself
            // drops nothing.
            dedup_window: None,
            max_message_bytes: Some(self.config.max_message_bytes),
            ordered_in_flight: false,
        }
    }

    /// Down when every endpoint used lately is down (no request is sent: a webhook endpoint
    /// has no health check of its own): the failures that opened the circuits are then the
    /// outage's, not counted, and the relay backs off.
    fn check(&self) -> BoxFuture<'_, Result<(), SinkError>> {
        Box::pin(async move {
            if self.all_down() {
                Err(SinkError::Unavailable(
                    "every webhook endpoint is down".into(),
                ))
            } else {
                Ok(())
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_takes_seconds_and_dates() {
        let v = |s: &'static str| Some(HeaderValue::from_static(s));
        assert_eq!(retry_after(v("7").as_ref()), Some(Duration::from_secs(7)));
        assert_eq!(retry_after(v("99999").as_ref()), Some(RETRY_AFTER_MAX));
        assert_eq!(
            retry_after(v("Wed, 21 Oct 2015 07:28:00 GMT").as_ref()),
            Some(Duration::ZERO)
        );
        let later = (chrono::Utc::now() + chrono::Duration::seconds(120))
            .format("%a, %d %b %Y %H:%M:%S GMT")
            .to_string();
        let got = retry_after(Some(&HeaderValue::from_str(&later).unwrap())).unwrap();
        assert!(
            got > Duration::from_secs(110) && got <= Duration::from_secs(120),
            "{got:?}"
        );
        assert_eq!(retry_after(v("soon").as_ref()), None);
        assert_eq!(retry_after(None), None);
    }

    #[test]
    fn endpoints_are_shown_without_path_query_or_credentials() {
        assert_eq!(
            shown("https://hooks.example.com/services/T0/B0/SECRET?token=x"),
            "https://hooks.example.com:443"
        );
        assert_eq!(
            shown("http://127.0.0.1:8080/in/{topic}"),
            "http://127.0.0.1:8080"
        );
        assert_eq!(shown("https://user:pw@h/"), "https://h:443");
    }

    #[test]
    fn templates_are_checked() {
        for (bad, says) in [
            ("ftp://h/x", "scheme"),
            ("https://u:p@h/x", "credentials"),
            ("not a url", "not a URL"),
            ("https://h/x#frag", "fragment"),
        ] {
            let e = check_template(bad, "--http-url").unwrap_err().to_string();
            assert!(e.contains(says) && e.contains("--http-url"), "{bad}: {e}");
            assert!(!e.contains(":p@"), "{e}");
        }
        check_template("https://h/in/{topic}?a=1", "--http-url").unwrap();
    }
}
