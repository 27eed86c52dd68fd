//! A real HTTP server for webhook tests, on 127.0.0.1 and a port of its own: it serves any axum
//! router (a recording endpoint, or the inbox's webhook receiver), and can be stopped (the port
//! refuses connections, open connections are cut), started again on the same port, and frozen
//! (requests are read but not answered until the thaw).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use tokio::sync::Notify;
use tokio::task::{JoinHandle, JoinSet};

/// One request as the recording endpoint got it.
#[derive(Debug, Clone)]
pub struct Request {
    /// The path (with the query).
    pub path: String,
    /// Header names lower-case, as HTTP delivers them.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl Request {
    /// The first value of a header (name in any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// What the recording endpoint answers to a request: status and headers.
pub type Answer = Arc<dyn Fn(&Request) -> (StatusCode, Vec<(&'static str, String)>) + Send + Sync>;

/// Requests recorded, and the answer rule.
#[derive(Clone)]
pub struct Recorder {
    requests: Arc<Mutex<Vec<Request>>>,
    seen: Arc<Mutex<Vec<Request>>>,
    answer: Arc<Mutex<Answer>>,
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder {
            requests: Arc::default(),
            seen: Arc::default(),
            answer: Arc::new(Mutex::new(Arc::new(|_| (StatusCode::OK, Vec::new())))),
        }
    }
}

impl Recorder {
    /// Every request answered 2xx so far, in arrival order.
    pub fn requests(&self) -> Vec<Request> {
        self.requests.lock().unwrap().clone()
    }

    /// Every request so far, whatever the answer.
    pub fn seen(&self) -> Vec<Request> {
        self.seen.lock().unwrap().clone()
    }

    /// Sets how requests are answered from now on (default: 200).
    pub fn answer(
        &self,
        f: impl Fn(&Request) -> (StatusCode, Vec<(&'static str, String)>) + Send + Sync + 'static,
    ) {
        *self.answer.lock().unwrap() = Arc::new(f);
    }

    /// A router recording every request (any method, any path) and answering by the rule.
    pub fn router(&self) -> axum::Router {
        let me = self.clone();
        axum::Router::new().fallback(
            move |uri: axum::http::Uri, headers: HeaderMap, body: Bytes| {
                let me = me.clone();
                async move {
                    let req = Request {
                        path: uri
                            .path_and_query()
                            .map(|p| p.as_str().to_owned())
                            .unwrap_or_default(),
                        headers: headers
                            .iter()
                            .map(|(k, v)| {
                                (
                                    k.as_str().to_owned(),
                                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                                )
                            })
                            .collect(),
                        body: body.to_vec(),
                    };
                    let rule = me.answer.lock().unwrap().clone();
                    let (status, headers) = rule(&req);
                    me.seen.lock().unwrap().push(req.clone());
                    if status.is_success() {
                        me.requests.lock().unwrap().push(req);
                    }
                    let mut r: Response = (status, "answer from the test endpoint").into_response();
                    for (k, v) in headers {
                        r.headers_mut().insert(k, v.parse().unwrap());
                    }
                    r
                }
            },
        )
    }
}

struct Freeze {
    frozen: AtomicBool,
    thaw: Notify,
}

/// An HTTP server of the test's own.
pub struct WebhookServer {
    /// `http://127.0.0.1:<port>`.
    pub url: String,
    /// The port.
    pub port: u16,
    router: axum::Router,
    freeze: Arc<Freeze>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    task: Option<JoinHandle<()>>,
}

impl WebhookServer {
    /// Serves `router` on a free port.
    pub async fn start(router: axum::Router) -> WebhookServer {
        Self::start_with(router, None).await
    }

    /// Serves `router` over TLS (`https://127.0.0.1:<port>`) with a certificate for 127.0.0.1
    /// made by the `openssl` command, self-signed; returns the server and the certificate's
    /// PEM file (the CA a client must trust).
    pub async fn start_tls(router: axum::Router) -> (WebhookServer, std::path::PathBuf) {
        let dir =
            std::env::temp_dir().join(format!("tidings-tls-{}", uuid::Uuid::now_v7().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        let ok = std::process::Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
            ])
            .args(["-nodes", "-days", "1", "-subj", "/CN=127.0.0.1"])
            .args(["-addext", "subjectAltName=IP:127.0.0.1"])
            .args(["-addext", "basicConstraints=critical,CA:FALSE"])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .output()
            .expect("the openssl command");
        assert!(
            ok.status.success(),
            "{}",
            String::from_utf8_lossy(&ok.stderr)
        );
        use rustls::pki_types::pem::PemObject;
        let certs = rustls::pki_types::CertificateDer::pem_file_iter(&cert)
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = rustls::pki_types::PrivateKeyDer::from_pem_file(&key).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let s = Self::start_with(router, Some(acceptor)).await;
        (s, cert)
    }

    async fn start_with(
        router: axum::Router,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> WebhookServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut s = WebhookServer {
            url: format!("{scheme}://127.0.0.1:{port}"),
            port,
            router,
            freeze: Arc::new(Freeze {
                frozen: AtomicBool::new(false),
                thaw: Notify::new(),
            }),
            tls,
            task: None,
        };
        s.serve(listener);
        s
    }

    fn serve(&mut self, listener: tokio::net::TcpListener) {
        let (router, freeze, tls) = (self.router.clone(), self.freeze.clone(), self.tls.clone());
        self.task = Some(tokio::spawn(async move {
            // Owned by this task: stopping it drops (aborts) every open connection too.
            let mut conns = JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (router, freeze, tls) = (router.clone(), freeze.clone(), tls.clone());
                conns.spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |req: hyper::Request<hyper::body::Incoming>| {
                            let (router, freeze) = (router.clone(), freeze.clone());
                            async move {
                                loop {
                                    let thawed = freeze.thaw.notified();
                                    if !freeze.frozen.load(Ordering::SeqCst) {
                                        break;
                                    }
                                    thawed.await;
                                }
                                let svc = hyper_util::service::TowerToHyperService::new(router);
                                hyper::service::Service::call(&svc, req).await
                            }
                        },
                    );
                    let http = hyper::server::conn::http1::Builder::new();
                    match tls {
                        None => {
                            let _ = http
                                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                                .await;
                        }
                        Some(tls) => {
                            // A client that refuses the certificate ends the handshake here.
                            if let Ok(stream) = tls.accept(stream).await {
                                let _ = http
                                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                                    .await;
                            }
                        }
                    }
                });
                while conns.try_join_next().is_some() {}
            }
        }));
    }

    /// Stops serving: the port refuses connections and open ones are cut.
    pub async fn stop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = t.await;
        }
    }

    /// Serves again on the same port.
    pub async fn restart(&mut self) {
        self.stop().await;
        let addr = format!("127.0.0.1:{}", self.port);
        let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let listener = loop {
            match tokio::net::TcpListener::bind(&addr).await {
                Ok(l) => break l,
                Err(e) if std::time::Instant::now() < end => {
                    let _ = e;
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
                Err(e) => panic!("cannot bind {addr} again: {e}"),
            }
        };
        self.serve(listener);
    }

    /// Requests are read but not answered until [`WebhookServer::thaw`].
    pub fn freeze(&self) {
        self.freeze.frozen.store(true, Ordering::SeqCst);
    }

    /// Answers again (requests held meanwhile are answered now).
    pub fn thaw(&self) {
        self.freeze.frozen.store(false, Ordering::SeqCst);
        self.freeze.thaw.notify_waiters();
    }
}

impl Drop for WebhookServer {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// The headers of a recorded request as the conformance suite reads them: the `Tidings-*`
/// names in their canonical case, the producer's as HTTP delivered them (lower case), and
/// without the request's own (host, content-length, user-agent, accept, webhook-*,
/// Idempotency-Key, Tidings-Signature).
pub fn message_headers(req: &Request) -> BTreeMap<String, String> {
    use tidings_outbox::envelope::*;
    let canonical = [
        HEADER_MESSAGE_ID,
        HEADER_BIZ_ID,
        HEADER_KEY,
        HEADER_TOPIC,
        HEADER_CREATED_AT,
        HEADER_ATTEMPT,
    ];
    req.headers
        .iter()
        .filter(|(k, _)| {
            !matches!(
                k.as_str(),
                "host"
                    | "content-length"
                    | "user-agent"
                    | "accept"
                    | "idempotency-key"
                    | "tidings-signature"
                    | "content-type"
            ) && !k.starts_with("webhook-")
        })
        .map(|(k, v)| {
            let name = canonical
                .iter()
                .find(|c| c.eq_ignore_ascii_case(k))
                .map(|c| (*c).to_owned())
                .unwrap_or_else(|| k.clone());
            (name, v.clone())
        })
        .collect()
}

/// Verifies every request's `webhook-signature` with the Python `standardwebhooks` package (the
/// Standard Webhooks authors' own library, an implementation independent of Tidings), and its
/// `Tidings-Signature` the same way over the metadata text the module documentation of
/// `tidings_outbox::webhook` defines, rebuilt in Python from the headers. `secret` is one
/// secret the requests were signed with. Panics naming the first request that fails.
pub fn verify_with_standardwebhooks(secret: &str, requests: &[Request]) {
    let items: Vec<serde_json::Value> = requests
        .iter()
        .map(|r| {
            serde_json::json!({
                "headers": r.headers.iter().cloned().collect::<BTreeMap<_, _>>(),
                "body": String::from_utf8(r.body.clone()).expect("the test payloads are UTF-8"),
            })
        })
        .collect();
    let dir = std::env::temp_dir().join(format!("tidings-sw-{}", uuid::Uuid::now_v7().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let input = dir.join("requests.json");
    std::fs::write(&input, serde_json::to_vec(&items).unwrap()).unwrap();
    let script = r#"
import hmac, json, sys
from datetime import datetime, timezone
from standardwebhooks import Webhook
secret, path = sys.argv[1], sys.argv[2]
wh = Webhook(secret)
items = json.load(open(path))
for i, it in enumerate(items):
    h = it["headers"]
    try:
        wh.verify(it["body"], h, json_parse=False)
    except Exception as e:
        print(f"request {i}: webhook-signature: {e!r}"); sys.exit(1)
    # Tidings-Signature: the same HMAC over "tidings-metadata-v1.{id}.{ts}.{metadata}", which
    # is what the library signs for the message id "tidings-metadata-v1.{id}".
    meta = "\n".join(h.get(n, "") for n in
                     ("tidings-topic", "tidings-key", "tidings-biz-id", "tidings-created-at"))
    ts = datetime.fromtimestamp(int(h["webhook-timestamp"]), tz=timezone.utc)
    want = wh.sign("tidings-metadata-v1." + h["webhook-id"], ts, meta)
    if not any(hmac.compare_digest(want, s) for s in h["tidings-signature"].split(" ")):
        print(f"request {i}: Tidings-Signature does not match"); sys.exit(1)
print(f"verified {len(items)}")
"#;
    let out = std::process::Command::new("python3")
        .args(["-c", script, secret, input.to_str().unwrap()])
        .output()
        .expect("python3 runs (bash .ci/test installs the standardwebhooks package)");
    let _ = std::fs::remove_dir_all(&dir);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains(&format!("verified {}", requests.len())),
        "standardwebhooks (Python) refused a signature: {stdout}{stderr}\n\
         (if the module is missing: python3 -m pip install standardwebhooks==1.1.0, as bash .ci/test does)"
    );
}
