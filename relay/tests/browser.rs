//! The operator's page in a real browser: Debian's headless Chromium, driven through
//! chromedriver (W3C WebDriver over HTTP), against the page a real `tidings relay
//! --admin-listen` serves on a real database. Needs `chromium` and `chromium-driver`
//! (`.ci/test` installs them).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tidings_outbox::Message;
use tidings_tests::{http, KillOnDrop, TestDb};

const BIN: &str = env!("CARGO_BIN_EXE_tidings");
const TOKEN: &str = "s3cret-admin-token";
/// Hostile content where a person reads it: must show as text, never run or render.
const PAYLOAD: &str = r#"<img src=x onerror="document.title='pwned'">"#;
const ERROR: &str = "permanent: <b id=bold>endpoint refused</b>";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A WebDriver session on a chromedriver of the test's own.
struct Browser {
    port: u16,
    session: String,
    _driver: KillOnDrop,
    _profile: std::path::PathBuf,
}

impl Browser {
    async fn start() -> Browser {
        let port = free_port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver (Debian's chromium-driver; bash .ci/test installs it)");
        let driver = KillOnDrop(driver);
        let end = Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(Instant::now() < end, "chromedriver did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let profile = std::env::temp_dir().join(format!(
            "tidings-chromium-{}",
            uuid::Uuid::now_v7().simple()
        ));
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless", "--no-sandbox", "--disable-gpu",
                         "--disable-background-networking", "--disable-component-update",
                         "--disable-sync", "--no-first-run", "--window-size=1280,900",
                         format!("--user-data-dir={}", profile.display())]
            }
        }}});
        let (code, body) = http(
            port,
            "POST",
            "/session",
            &[("content-type", "application/json")],
            &caps.to_string(),
        )
        .await;
        assert_eq!(code, 200, "new session: {body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        let session = v["value"]["sessionId"].as_str().unwrap().to_owned();
        Browser {
            port,
            session,
            _driver: driver,
            _profile: profile,
        }
    }

    async fn cmd(&self, method: &str, path: &str, body: Value) -> Value {
        let path = format!("/session/{}{path}", self.session);
        let body = if body.is_null() {
            String::new()
        } else {
            body.to_string()
        };
        let (code, text) = http(
            self.port,
            method,
            &path,
            &[("content-type", "application/json")],
            &body,
        )
        .await;
        assert_eq!(code, 200, "{method} {path}: {text}");
        serde_json::from_str::<Value>(&text).unwrap()["value"].clone()
    }

    async fn go(&self, url: &str) {
        self.cmd("POST", "/url", json!({ "url": url })).await;
    }

    async fn find(&self, css: &str) -> String {
        let v = self
            .cmd(
                "POST",
                "/element",
                json!({"using": "css selector", "value": css}),
            )
            .await;
        v.as_object()
            .unwrap()
            .values()
            .next()
            .unwrap()
            .as_str()
            .unwrap()
            .to_owned()
    }

    async fn click(&self, css: &str) {
        let e = self.find(css).await;
        self.cmd("POST", &format!("/element/{e}/click"), json!({}))
            .await;
    }

    async fn type_into(&self, css: &str, text: &str) {
        let e = self.find(css).await;
        self.cmd(
            "POST",
            &format!("/element/{e}/value"),
            json!({ "text": text }),
        )
        .await;
    }

    async fn js(&self, script: &str) -> Value {
        self.cmd(
            "POST",
            "/execute/sync",
            json!({"script": script, "args": []}),
        )
        .await
    }

    /// Waits (30 s at most) until `script` returns true.
    async fn until(&self, what: &str, script: &str) {
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            if self.js(script).await == json!(true) {
                return;
            }
            if Instant::now() > end {
                let page = self.js("return document.body.innerText").await;
                panic!("timed out waiting for {what}; the page shows: {page}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn screenshot(&self, to: &std::path::Path) {
        use base64::Engine;
        let png = self.cmd("GET", "/screenshot", Value::Null).await;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(png.as_str().unwrap())
            .unwrap();
        std::fs::write(to, bytes).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self._profile);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_operator_page_shows_the_backlog_and_replays_a_dead_letter_only_with_the_token() {
    let db = TestDb::migrated().await;
    // A backlog that stays: 3 messages due in an hour.
    db.enqueue(
        (0..3)
            .map(|i| Message::new("orders.later", format!("{i}")).delay(Duration::from_secs(3600)))
            .collect(),
    )
    .await;
    // A dead letter with hostile content.
    let dead = uuid::Uuid::now_v7();
    db.client()
        .await
        .execute(
            "INSERT INTO tidings.dead_letters (id, topic, biz_id, payload, headers, created_at, attempts, last_error, reason) \
             VALUES ($1, 'orders.created', 'o-1', convert_to($2, 'UTF8'), $3, now(), 10, $4, 'permanent')",
            &[&dead, &PAYLOAD, &json!({"x-evil": "<script>document.title='pwned'</script>"}), &ERROR],
        )
        .await
        .unwrap();
    let port = free_port();
    let _relay = KillOnDrop(
        Command::new(BIN)
            .env("DATABASE_URL", &db.url)
            .env("TIDINGS_LOG", "warn")
            .env("TIDINGS_ADMIN_TOKEN", TOKEN)
            .args(["relay", "--sink", "stdout", "--heartbeat-interval", "1s"])
            .args(["--admin-listen", &format!("127.0.0.1:{port}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let end = Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(
            Instant::now() < end,
            "the relay's admin listener did not start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Actions are refused without the token, or without a JSON body, whoever asks.
    let body = json!({"ids": [dead]}).to_string();
    let (code, text) = http(
        port,
        "POST",
        "/api/dead-letters/replay",
        &[("content-type", "application/json")],
        &body,
    )
    .await;
    assert_eq!(code, 401, "{text}");
    let (code, _) = http(
        port,
        "POST",
        "/api/dead-letters/replay",
        &[
            ("authorization", &format!("Bearer {TOKEN}")),
            ("content-type", "text/plain"),
        ],
        &body,
    )
    .await;
    assert_eq!(code, 415, "a form post (no JSON) is refused");
    // A page reached through another host name (DNS rebinding) answers nothing.
    let (code, _) = http(
        port,
        "GET",
        "/api/dead-letters",
        &[("host", "evil.example")],
        "",
    )
    .await;
    assert_eq!(code, 421, "a foreign host name is refused");
    let (code, _) = http(port, "GET", &format!("/api/dead-letters/{dead}"), &[], "").await;
    assert_eq!(code, 401, "payloads need the token when one is set");

    let b = Browser::start().await;
    b.go(&format!("http://127.0.0.1:{port}/")).await;
    b.until(
        "the backlog of 3",
        "return document.querySelector('#card-backlog .v')?.textContent === '3'",
    )
    .await;
    b.until(
        "one dead letter",
        "return document.querySelector('#card-dead .v')?.textContent === '1'",
    )
    .await;
    b.until(
        "one relay alive",
        "return [...document.querySelectorAll('#relays td')].some(td => td.textContent === 'yes')",
    )
    .await;
    let screenshot =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/operator-overview.png");
    b.screenshot(&screenshot).await;

    // The dead letter: listed; its payload and headers need the token; replay without it is
    // refused and leaves it dead.
    b.click("nav button[data-tab=dead]").await;
    b.until(
        "the dead letter listed",
        "return document.querySelectorAll('#dead-list tbody tr').length === 1",
    )
    .await;
    b.click("#dead-list .inspect").await;
    b.until(
        "the content refused",
        "return document.querySelector('#msg').textContent.includes('need the admin token')",
    )
    .await;
    b.click("#dead-list input[type=checkbox]").await;
    b.click("#dead-replay").await;
    b.until(
        "the refusal",
        "return document.querySelector('#msg').textContent.includes('replay refused')",
    )
    .await;
    let still: i64 = db
        .client()
        .await
        .query_one("SELECT count(*) FROM tidings.dead_letters", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(still, 1, "not replayed without the token");

    // With the token: inspected, hostile fields shown as text; then replayed.
    b.type_into("#token", TOKEN).await;
    b.click("#dead-list .inspect").await;
    b.until(
        "its payload shown",
        "return !!document.querySelector('#dead-detail pre.payload')",
    )
    .await;
    assert_eq!(
        b.js("return document.querySelector('#dead-detail pre.payload').textContent")
            .await,
        json!(PAYLOAD)
    );
    assert_eq!(
        b.js("return document.querySelector('#dead-detail pre.last-error').textContent")
            .await,
        json!(ERROR)
    );
    let headers = b
        .js("return document.querySelector('#dead-detail pre.headers').textContent")
        .await;
    assert!(headers.as_str().unwrap().contains("<script>"), "{headers}");
    assert_eq!(
        b.js("return [document.querySelectorAll('main img').length, document.querySelectorAll('#bold').length, document.querySelectorAll('main script').length, document.title]").await,
        json!([0, 0, 0, "Tidings"]),
        "nothing from the message became HTML"
    );
    b.click("#dead-list input[type=checkbox]").await;
    b.click("#dead-replay").await;
    b.until(
        "the replay",
        "return document.querySelector('#msg').textContent === 'replay: 1 message(s)'",
    )
    .await;
    b.click("nav button[data-tab=overview]").await;
    b.until(
        "no dead letter",
        "return document.querySelector('#card-dead .v')?.textContent === '0'",
    )
    .await;
    b.until(
        "the relay's delivered count to show it",
        "return [...document.querySelectorAll('#relays tbody tr')].some(tr => tr.children[6].textContent === '1')",
    )
    .await;
    let left: i64 = db
        .client()
        .await
        .query_one(
            "SELECT count(*) FROM tidings.outbox WHERE id = $1",
            &[&dead],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0, "delivered");
    assert_eq!(
        b.js("return document.querySelector('#card-backlog .v').textContent")
            .await,
        json!("3")
    );

    // The inbox lookup answers for a biz-id nobody processed.
    b.click("nav button[data-tab=inbox]").await;
    b.type_into("#inbox-form input[name=consumer]", "card-service")
        .await;
    b.type_into("#inbox-form input[name=biz_id]", "o-1").await;
    b.click("#inbox-form button").await;
    b.until("the lookup", "return document.querySelector('#inbox-result').textContent === 'not processed by this consumer'").await;
    b.cmd("DELETE", "", Value::Null).await;
}
