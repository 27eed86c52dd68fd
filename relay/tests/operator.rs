//! The `tidings` binary in an operator's hands: shutdown that never blocks on output, no secret
//! at any log level, escaped message fields, guarded destructive commands.

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tidings_outbox::Message;
use tidings_tests::{eventually, KillOnDrop, NatsServer, TestDb};

const BIN: &str = env!("CARGO_BIN_EXE_tidings");
const DB_PASSWORD: &str = "Db5ecretPw";
const NATS_PASSWORD: &str = "Nat5ecretPw";

fn kill(child: &Child, signal: &str) {
    let ok = Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
}

/// Waits for the process to exit, at most `limit`; kills it and fails the test otherwise.
fn exit_within(child: &mut Child, limit: Duration) -> i32 {
    let end = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code().unwrap_or(-1);
        }
        if Instant::now() > end {
            let _ = child.kill();
            panic!("the relay did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The test database's URL with a password (trust auth ignores it; it must never be shown).
fn url_with_password(db: &TestDb) -> String {
    db.url
        .replacen("postgres@", &format!("postgres:{DB_PASSWORD}@"), 1)
}

async fn claim_open(db: &TestDb) -> bool {
    let c = tidings_tests::connect(&format!("{}/postgres", tidings_tests::server_url())).await;
    let name = db.url.rsplit('/').next().unwrap().to_owned();
    let n: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND state LIKE 'idle in transaction%'",
            &[&name],
        )
        .await
        .unwrap()
        .get(0);
    n > 0
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_with_a_batch_in_flight_and_nobody_reading_the_output_exits_in_time() {
    let db = TestDb::migrated().await;
    // 2,000 messages of 1 KiB fill a 64 KiB pipe within the first batch.
    db.enqueue(
        (0..2000)
            .map(|i| Message::new("t", format!("{i:0>1024}")))
            .collect(),
    )
    .await;
    let mut child = Command::new(BIN)
        .args([
            "relay",
            "--sink",
            "stdout",
            "--publish-timeout",
            "2s",
            "--shutdown-timeout",
            "10s",
        ])
        .env("DATABASE_URL", &db.url)
        .env("TIDINGS_LOG", "trace") // floods stderr, which nobody reads either
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    eventually(
        "a claim to be open while output is blocked",
        Duration::from_secs(20),
        || claim_open(&db),
    )
    .await;
    let sent = Instant::now();
    kill(&child, "-TERM");
    let code = exit_within(&mut child, Duration::from_secs(12));
    assert!(code == 0 || code == 1, "exit code {code}");
    assert!(
        sent.elapsed() < Duration::from_secs(11),
        "{:?}",
        sent.elapsed()
    );
    // Nothing was lost: what the relay did not record as delivered is still in the outbox.
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let printed = out.lines().count() as i64;
    assert!(db.outbox_count().await + printed >= 2000);
}

#[tokio::test(flavor = "multi_thread")]
async fn no_password_in_any_subcommands_output_at_trace_level_and_url_credentials_work() {
    let db = TestDb::migrated().await;
    let nats = NatsServer::start_with(&["--user", "relayuser", "--pass", NATS_PASSWORD]).await;
    let port = nats.port();
    db.enqueue((0..50).map(|i| Message::new("t", format!("{i}"))).collect())
        .await;
    let url = url_with_password(&db);
    let mut outputs = Vec::new();
    // The relay, with credentials in a comma-separated, partly scheme-less URL list: it must
    // authenticate (the outbox drains) and never show the password.
    for (format, nats_url) in [
        (
            "text",
            format!("relayuser:{NATS_PASSWORD}@127.0.0.1:{port},nats://relayuser:{NATS_PASSWORD}@127.0.0.1:{port}"),
        ),
        ("json", format!("nats://relayuser:{NATS_PASSWORD}@127.0.0.1:{port}")),
    ] {
        db.enqueue(vec![Message::new("t", format)]).await;
        let mut child = Command::new(BIN)
            .args(["relay", "--sink", "nats", "--log-format", format])
            .env("DATABASE_URL", &url)
            .env("TIDINGS_NATS_URL", &nats_url)
            .env("TIDINGS_LOG", "trace")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = std::io::BufReader::new(stderr).read_to_string(&mut s);
            s
        });
        eventually("the relay to deliver with URL credentials", Duration::from_secs(30), || async {
            db.outbox_count().await == 0
        })
        .await;
        kill(&child, "-TERM");
        assert_eq!(exit_within(&mut child, Duration::from_secs(20)), 0);
        outputs.push(reader.join().unwrap());
    }
    let dead: i64 = db
        .client()
        .await
        .query_one("SELECT count(*) FROM tidings.dead_letters", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        dead, 0,
        "all 52 delivered through the authenticated connection"
    );
    // Every admin subcommand, in both log formats, also with an unreachable NATS and database.
    let bad_db = format!("postgres://app:{DB_PASSWORD}@127.0.0.1:1/x");
    for format in ["text", "json"] {
        for (args, db_url) in [
            (vec!["status"], url.as_str()),
            (vec!["status", "--json"], url.as_str()),
            (vec!["dlq", "list"], url.as_str()),
            (vec!["migrate", "status"], url.as_str()),
            (vec!["inbox", "prune"], url.as_str()),
            (vec!["inbox", "dlq", "list"], url.as_str()),
            (vec!["status"], bad_db.as_str()),
            (vec!["migrate", "up"], bad_db.as_str()),
            (vec!["relay", "--sink", "nats", "--nats-url"], url.as_str()),
        ] {
            let mut cmd = Command::new(BIN);
            cmd.args(&args);
            if args[0] == "relay" {
                cmd.arg(format!("nats://relayuser:{NATS_PASSWORD}@127.0.0.1:1"));
            }
            let o = cmd
                .args(["--log-format", format])
                .env("DATABASE_URL", db_url)
                .env("TIDINGS_LOG", "trace")
                .output()
                .unwrap();
            outputs.push(format!(
                "{args:?}\n{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ));
        }
    }
    for out in &outputs {
        assert!(
            !out.contains(DB_PASSWORD),
            "database password shown:\n{out}"
        );
        assert!(!out.contains(NATS_PASSWORD), "NATS password shown:\n{out}");
        assert!(
            !out.contains('\u{1b}'),
            "no ANSI colour when stderr is not a terminal"
        );
    }
    // The trace output was really there (so the check above means something).
    assert!(
        outputs[0].contains("TRACE") || outputs[0].contains("DEBUG"),
        "{}",
        &outputs[0][..outputs[0].len().min(500)]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn operator_commands_escape_control_characters_from_messages() {
    let db = TestDb::migrated().await;
    let c = db.client().await;
    c.batch_execute(
        "INSERT INTO tidings.dead_letters (id, topic, biz_id, ordering_key, payload, headers, created_at, attempts, last_error, reason)
         VALUES (gen_random_uuid(), 't', E'pay\\x1b[2J\\x1b[Hforged', E'k\\u202e', '', '{}', now(), 1, E'line1\\nERROR forged line', 'permanent');
         INSERT INTO tidings.relays (id, name, host, pid, sink) VALUES (gen_random_uuid(), E'evil\\rname', 'h', 1, 'nats');",
    )
    .await
    .unwrap();
    for args in [["dlq", "list"], ["status", "--log-format=text"]] {
        let o = Command::new(BIN)
            .args(args)
            .env("DATABASE_URL", &db.url)
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        assert!(o.status.success(), "{args:?}: {out}");
        assert!(
            !out.chars().any(|c| c.is_control() && c != '\n') && !out.contains('\u{202e}'),
            "{args:?}: raw control characters reach the terminal: {out:?}"
        );
        if args[0] == "dlq" {
            assert!(
                out.contains("pay\\u{1b}[2J") && out.contains("line1\\nERROR"),
                "{out}"
            );
            assert_eq!(out.lines().count(), 1, "one line per dead letter: {out}");
        } else {
            assert!(out.contains("evil\\rname"), "{out}");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn migrate_down_refuses_to_drop_undelivered_messages_without_force() {
    let db = TestDb::migrated().await;
    db.enqueue(vec![Message::new("t", "keep me")]).await;
    let o = Command::new(BIN)
        .args(["migrate", "down", "--all"])
        .env("DATABASE_URL", &db.url)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{text}");
    assert!(
        text.contains("1 undelivered messages") && text.contains("--force"),
        "{text}"
    );
    assert_eq!(db.outbox_count().await, 1, "nothing dropped");
    let o = Command::new(BIN)
        .args(["migrate", "down", "--all", "--force"])
        .env("DATABASE_URL", &db.url)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Inbox retention below the floor is refused too, and allowed with --force.
    let db = TestDb::migrated().await;
    let o = Command::new(BIN)
        .args(["inbox", "prune", "--older-than", "10m"])
        .env("DATABASE_URL", &db.url)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--force"));
    let o = Command::new(BIN)
        .args(["inbox", "prune", "--older-than", "10m", "--force"])
        .env("DATABASE_URL", &db.url)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stream_dedup_window_shorter_than_the_retry_horizon_exits_2_naming_both() {
    let db = TestDb::migrated().await;
    let nats = NatsServer::start().await;
    let o = Command::new(BIN)
        .args(["relay", "--sink", "nats", "--nats-url", &nats.url])
        .args(["--nats-duplicate-window", "30s"])
        .env("DATABASE_URL", &db.url)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{text}");
    for want in [
        "dedup window",
        "30s",
        "--claim-timeout",
        "--publish-timeout",
        "--backoff-max",
        "--nats-duplicate-window",
    ] {
        assert!(text.contains(want), "{want}: {text}");
    }
    // The same stream with a retry horizon inside its window: the relay starts.
    let mut child = Command::new(BIN)
        .args(["relay", "--sink", "nats", "--nats-url", &nats.url])
        .args(["--backoff-max", "5s"])
        .env("DATABASE_URL", &db.url)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    while !line.contains("relay started") {
        line.clear();
        let n = std::io::BufRead::read_line(&mut stderr, &mut line).unwrap();
        assert!(n > 0, "the relay stopped before it started");
    }
    kill(&child, "-TERM");
    assert_eq!(exit_within(&mut child, Duration::from_secs(20)), 0);
}

/// Runs `tidings` against `db`; returns the exit code, stdout and stderr.
fn tidings(db: &TestDb, args: &[&str]) -> (i32, String, String) {
    let o = Command::new(BIN)
        .args(args)
        .env("DATABASE_URL", &db.url)
        .env("TIDINGS_LOG", "warn")
        .output()
        .unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Parks `ids` for `consumer` as a runner would (the test database's owner bypasses RLS).
async fn park(db: &TestDb, consumer: &str, ids: &[uuid::Uuid]) {
    db.client()
        .await
        .execute(
            "INSERT INTO tidings.inbox_dead_letters
                    (consumer, message_id, biz_id, topic, ordering_key, payload, headers,
                     created_at, deliveries, last_error)
             SELECT $1, id, 'pay-' || id, 'payment.succeeded', 'cust-1', 'p', '{}',
                    now() - interval '1 hour', 5, 'card declined'
               FROM unnest($2::uuid[]) id",
            &[&consumer, &ids],
        )
        .await
        .unwrap();
}

/// (consumer, message_id) of the parked rows with a replay requested, sorted.
async fn requested(db: &TestDb) -> Vec<(String, uuid::Uuid)> {
    db.client()
        .await
        .query(
            "SELECT consumer, message_id FROM tidings.inbox_dead_letters
              WHERE replay_requested_at IS NOT NULL ORDER BY consumer, message_id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// (consumer, message_id) of every parked row, sorted.
async fn parked(db: &TestDb) -> Vec<(String, uuid::Uuid)> {
    db.client()
        .await
        .query(
            "SELECT consumer, message_id FROM tidings.inbox_dead_letters ORDER BY 1, 2",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn inbox_dlq_list_shows_parked_messages_escaped_and_pending_replays_and_json_parses() {
    let db = TestDb::migrated().await;
    let (hostile, plain) = (uuid::Uuid::now_v7(), uuid::Uuid::now_v7());
    db.client()
        .await
        .execute(
            "INSERT INTO tidings.inbox_dead_letters
                    (consumer, message_id, biz_id, topic, ordering_key, payload, headers,
                     deliveries, last_error, dead_at)
             VALUES ('card', $1, E'pay\\x1b[2J\\x1b[Hforged', E't\\x07', E'k\\u202e', 'p', '{}', 5,
                     E'line1\\nERROR forged line', now() - interval '1 minute')",
            &[&hostile],
        )
        .await
        .unwrap();
    park(&db, "audit", &[plain]).await;
    db.client()
        .await
        .batch_execute("UPDATE tidings.inbox_dead_letters SET replay_requested_at = now() WHERE consumer = 'audit'")
        .await
        .unwrap();

    let (code, out, err) = tidings(&db, &["inbox", "dlq", "list"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        !out.chars().any(|c| c.is_control() && c != '\n') && !out.contains('\u{202e}'),
        "raw control characters reach the terminal: {out:?}"
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "one line per parked message: {out}");
    // Newest first: audit's was parked now, card's a minute ago.
    assert!(
        lines[0].starts_with(&plain.to_string())
            && lines[0].contains("consumer=audit")
            && lines[0].contains("replay requested at"),
        "{out}"
    );
    for want in [
        "consumer=card",
        "pay\\u{1b}[2J\\u{1b}[Hforged",
        "t\\u{7}",
        "k\\u{202e}",
        "line1\\nERROR forged line",
    ] {
        assert!(lines[1].contains(want), "{want}: {out}");
    }
    assert!(!lines[1].contains("replay requested"), "{out}");

    let (code, out, err) = tidings(
        &db,
        &["inbox", "dlq", "list", "--consumer", "card", "--json"],
    );
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let rows = v.as_array().unwrap();
    assert_eq!(rows.len(), 1, "{out}");
    assert_eq!(rows[0]["message_id"], hostile.to_string());
    assert_eq!(
        rows[0]["biz_id"], "pay\u{1b}[2J\u{1b}[Hforged",
        "JSON keeps the raw value"
    );
    assert_eq!(rows[0]["deliveries"], 5);
    assert!(rows[0]["replay_requested_at"].is_null());
    assert!(rows[0].get("payload").is_none(), "no payload: {out}");

    let (code, out, _) = tidings(&db, &["inbox", "dlq", "list", "--limit", "1"]);
    assert_eq!((code, out.lines().count()), (0, 1), "{out}");
    let (code, _, err) = tidings(&db, &["inbox", "dlq", "list", "--limit", "0"]);
    assert_eq!(code, 2, "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn inbox_dlq_replay_asks_only_for_the_named_rows_of_the_named_consumer() {
    let db = TestDb::migrated().await;
    let (a, b) = (uuid::Uuid::now_v7(), uuid::Uuid::now_v7());
    park(&db, "card", &[a, b]).await;
    // The same message parked by another consumer is that consumer's business.
    park(&db, "audit", &[a]).await;

    let a_s = a.to_string();
    let (code, out, err) = tidings(&db, &["inbox", "dlq", "replay", "--consumer", "card", &a_s]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("requested replay of 1 parked messages of consumer card"),
        "{out}"
    );
    assert_eq!(requested(&db).await, [("card".to_owned(), a)]);
    // Nothing is published or deleted: the consumer's runner does the replay.
    assert_eq!(parked(&db).await.len(), 3);
    assert_eq!(db.outbox_count().await, 0);

    let (code, out, err) = tidings(
        &db,
        &["inbox", "dlq", "replay", "--consumer", "card", "--all"],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("requested replay of 2 parked"), "{out}");
    let mut want = vec![("card".to_owned(), a), ("card".to_owned(), b)];
    want.sort();
    assert_eq!(requested(&db).await, want);

    // A consumer with nothing parked: nothing to ask for.
    let (code, out, _) = tidings(
        &db,
        &["inbox", "dlq", "replay", "--consumer", "nobody", "--all"],
    );
    assert_eq!(code, 0);
    assert!(out.contains("requested replay of 0"), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn inbox_dlq_purge_deletes_the_named_rows_or_all_of_one_consumer() {
    let db = TestDb::migrated().await;
    let (a, b, c) = (
        uuid::Uuid::now_v7(),
        uuid::Uuid::now_v7(),
        uuid::Uuid::now_v7(),
    );
    park(&db, "card", &[a, b, c]).await;
    park(&db, "audit", &[a]).await;

    let (code, out, err) = tidings(
        &db,
        &[
            "inbox",
            "dlq",
            "purge",
            "--consumer",
            "card",
            &a.to_string(),
            &b.to_string(),
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("purged 2 parked messages of consumer card"),
        "{out}"
    );
    let mut want = vec![("audit".to_owned(), a), ("card".to_owned(), c)];
    want.sort();
    assert_eq!(parked(&db).await, want);

    let (code, out, err) = tidings(
        &db,
        &["inbox", "dlq", "purge", "--consumer", "card", "--all"],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("purged 1 parked"), "{out}");
    assert_eq!(parked(&db).await, [("audit".to_owned(), a)]);
}

#[tokio::test(flavor = "multi_thread")]
async fn inbox_dlq_replay_and_purge_without_a_consumer_or_ids_exit_2_naming_the_flag() {
    let db = TestDb::migrated().await;
    let id = uuid::Uuid::now_v7();
    park(&db, "card", &[id]).await;
    let id = id.to_string();
    for action in ["replay", "purge"] {
        let (code, _, err) = tidings(&db, &["inbox", "dlq", action, &id]);
        assert_eq!(code, 2, "{action}: {err}");
        assert!(err.contains("--consumer"), "{action}: {err}");

        let (code, _, err) = tidings(&db, &["inbox", "dlq", action, "--consumer", "card"]);
        assert_eq!(code, 2, "{action}: {err}");
        assert!(
            err.contains("--all") && err.contains("ids"),
            "{action}: {err}"
        );

        let (code, _, err) = tidings(
            &db,
            &["inbox", "dlq", action, "--consumer", "card", "--all", &id],
        );
        assert_eq!(code, 2, "{action}: ids and --all together: {err}");
    }
    assert_eq!(parked(&db).await.len(), 1, "nothing purged");
    assert!(requested(&db).await.is_empty(), "no replay requested");
}

#[tokio::test(flavor = "multi_thread")]
async fn inbox_dlq_on_an_unmigrated_database_says_to_migrate() {
    let db = TestDb::empty().await;
    for args in [
        &["inbox", "dlq", "list"][..],
        &["inbox", "dlq", "replay", "--consumer", "card", "--all"],
        &["inbox", "dlq", "purge", "--consumer", "card", "--all"],
    ] {
        let (code, _, err) = tidings(&db, args);
        assert_eq!(code, 1, "{args:?}: {err}");
        assert!(err.contains("run `tidings migrate up`"), "{args:?}: {err}");
    }
}

/// Starts `tidings relay --sink stdout --admin-listen` on `db` (with `token` as the admin token
/// if any), its log (warn) going to `log`; returns the process and the admin port.
async fn admin_relay(db: &TestDb, token: Option<&str>, log: &std::path::Path) -> (KillOnDrop, u16) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cmd = Command::new(BIN);
    cmd.env("DATABASE_URL", &db.url)
        .env("TIDINGS_LOG", "warn")
        .env_remove("TIDINGS_ADMIN_TOKEN")
        .args(["relay", "--sink", "stdout"])
        .args(["--admin-listen", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap());
    if let Some(t) = token {
        cmd.env("TIDINGS_ADMIN_TOKEN", t);
    }
    let child = KillOnDrop(cmd.spawn().unwrap());
    tidings_tests::wait_for_port(port, "the relay's admin listener").await;
    (child, port)
}

/// The operator page's API beyond what the browser test clicks: dead-letter filters (topic,
/// error text in any case, time range, the list bound), purge and replay of everything matching
/// a filter in bounded batches (at most 100,000 rows a request), the id-list bound, the parked
/// messages' list, filters, content (token only) and actions, an inbox lookup that finds a
/// record and its time, read-only mode without a token (403), and every action in the log.
#[tokio::test(flavor = "multi_thread")]
async fn the_console_api_filters_and_acts_on_dead_letters_and_parked_messages_in_bounds() {
    use serde_json::{json, Value};
    use tidings_tests::http;
    const TOKEN: &str = "console-test-token";
    let db = TestDb::migrated().await;
    let c = db.client().await;
    // Dead letters: 'a' 1,100 ("boom A", an hour ago), 'b' 103 ("Timeout B", now), and 100,250
    // 'bulk' ones for the per-request bound.
    c.batch_execute(
        "INSERT INTO tidings.dead_letters (id, topic, payload, headers, created_at, attempts, last_error, reason, dead_at)
         SELECT gen_random_uuid(), 'a', 'p', '{}', now(), 3, 'boom A', 'max_attempts', now() - interval '1 hour'
           FROM generate_series(1, 1100);
         INSERT INTO tidings.dead_letters (id, topic, payload, headers, created_at, attempts, last_error, reason)
         SELECT gen_random_uuid(), 'b', 'p', '{}', now(), 1, 'Timeout B', 'permanent'
           FROM generate_series(1, 103);
         INSERT INTO tidings.dead_letters (id, topic, payload, headers, created_at, attempts, last_error, reason)
         SELECT gen_random_uuid(), 'bulk', 'p', '{}', now(), 1, 'x', 'permanent'
           FROM generate_series(1, 100250);",
    )
    .await
    .unwrap();
    let parked_ids: Vec<uuid::Uuid> = (0..5).map(|_| uuid::Uuid::now_v7()).collect();
    park(&db, "c1", &parked_ids[..3]).await;
    park(&db, "c2", &parked_ids[3..]).await;
    c.execute(
        "INSERT INTO tidings.inbox (consumer, biz_id, message_id, processed_at)
         VALUES ('card-service', 'pay-7', $1, '2026-01-02T03:04:05Z')",
        &[&parked_ids[0]],
    )
    .await
    .unwrap();
    let dir = tempfile_dir();
    let (mut relay, port) = admin_relay(&db, Some(TOKEN), &dir.join("relay.log")).await;
    let auth = format!("Bearer {TOKEN}");
    let get = |path: String| async move {
        let (code, body) = http(port, "GET", &path, &[], "").await;
        assert_eq!(code, 200, "{path}: {body}");
        serde_json::from_str::<Value>(&body).unwrap()
    };
    let act = |path: &'static str, body: Value, token: bool| {
        let auth = auth.clone();
        async move {
            let mut headers = vec![("content-type", "application/json")];
            if token {
                headers.push(("authorization", auth.as_str()));
            }
            let (code, text) = http(port, "POST", path, &headers, &body.to_string()).await;
            (
                code,
                serde_json::from_str::<Value>(&text).unwrap_or(Value::Null),
            )
        }
    };
    let count = |sql: &'static str| {
        let c = &c;
        async move { c.query_one(sql, &[]).await.unwrap().get::<_, i64>(0) }
    };

    // Filters and the list bound.
    let n = |v: Value| v.as_array().unwrap().len();
    assert_eq!(
        n(get("/api/dead-letters?topic=b".into()).await),
        100,
        "default limit"
    );
    assert_eq!(
        n(get("/api/dead-letters?topic=b&limit=500".into()).await),
        103
    );
    assert_eq!(
        n(get("/api/dead-letters?error=tIMEOUT&limit=500".into()).await),
        103
    );
    assert_eq!(
        n(get("/api/dead-letters?limit=100000".into()).await),
        500,
        "clamped"
    );
    let hour_ago = (chrono::Utc::now() - chrono::Duration::minutes(30)).to_rfc3339();
    let q = format!(
        "/api/dead-letters?until={}&limit=500",
        hour_ago.replace('+', "%2B")
    );
    let old = get(q).await;
    assert_eq!(n(old.clone()), 500);
    assert!(old.as_array().unwrap().iter().all(|r| r["topic"] == "a"));
    let q = format!(
        "/api/dead-letters?since={}&topic=a",
        hour_ago.replace('+', "%2B")
    );
    assert_eq!(n(get(q).await), 0);

    // Actions: refused without the token; an id list over the bound is refused.
    let (code, _) = act(
        "/api/dead-letters/purge",
        json!({"filter": {"topic": "b"}}),
        false,
    )
    .await;
    assert_eq!(code, 401);
    let many: Vec<uuid::Uuid> = (0..501).map(|_| uuid::Uuid::now_v7()).collect();
    let (code, body) = act("/api/dead-letters/purge", json!({"ids": many}), true).await;
    assert_eq!(code, 400, "{body}");
    assert!(body.to_string().contains("at most 500 ids"), "{body}");
    assert_eq!(
        count("SELECT count(*) FROM tidings.dead_letters WHERE topic = 'b'").await,
        103
    );

    // Everything matching a filter: purge 'b' (error text), replay 'a' (1,100 rows, three
    // batches of at most 500), purge 'bulk' (stops at 100,000 a request).
    let (code, body) = act(
        "/api/dead-letters/purge",
        json!({"filter": {"error": "timeout b"}}),
        true,
    )
    .await;
    assert_eq!((code, body["rows"].as_u64()), (200, Some(103)), "{body}");
    let (code, body) = act(
        "/api/dead-letters/replay",
        json!({"filter": {"topic": "a"}}),
        true,
    )
    .await;
    assert_eq!((code, body["rows"].as_u64()), (200, Some(1100)), "{body}");
    assert_eq!(
        count("SELECT count(*) FROM tidings.dead_letters WHERE topic IN ('a', 'b')").await,
        0
    );
    let (code, body) = act(
        "/api/dead-letters/purge",
        json!({"filter": {"topic": "bulk"}}),
        true,
    )
    .await;
    assert_eq!(
        (code, body["rows"].as_u64()),
        (200, Some(100_000)),
        "{body}"
    );
    assert_eq!(
        count("SELECT count(*) FROM tidings.dead_letters WHERE topic = 'bulk'").await,
        250
    );

    // Parked messages: list and filter, content only with the token, replay by id, purge by
    // filter.
    assert_eq!(n(get("/api/parked".into()).await), 5);
    let c1 = get("/api/parked?consumer=c1".into()).await;
    assert_eq!(n(c1.clone()), 3);
    assert!(c1
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["consumer"] == "c1" && r["deliveries"] == 5));
    assert_eq!(
        n(get("/api/parked?error=DECLINED&topic=payment.succeeded".into()).await),
        5
    );
    assert_eq!(n(get("/api/parked?consumer=nobody".into()).await), 0);
    let one = format!("/api/parked/c1/{}", parked_ids[0]);
    assert_eq!(http(port, "GET", &one, &[], "").await.0, 401);
    let (code, body) = http(port, "GET", &one, &[("authorization", &auth)], "").await;
    assert_eq!(code, 200, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["payload"]["text"], "p");
    assert_eq!(body["biz_id"], format!("pay-{}", parked_ids[0]));
    let (code, body) = act(
        "/api/parked/replay",
        json!({"consumer": "c1", "ids": [parked_ids[1]]}),
        true,
    )
    .await;
    assert_eq!((code, body["rows"].as_u64()), (200, Some(1)), "{body}");
    assert_eq!(requested(&db).await, vec![("c1".to_owned(), parked_ids[1])]);
    let (code, body) = act(
        "/api/parked/purge",
        json!({"filter": {"consumer": "c2"}}),
        true,
    )
    .await;
    assert_eq!((code, body["rows"].as_u64()), (200, Some(2)), "{body}");
    assert_eq!(parked(&db).await.len(), 3);
    assert!(parked(&db).await.iter().all(|(c, _)| c == "c1"));

    // The inbox lookup finds a record and says when.
    let found = get("/api/inbox?consumer=card-service&biz_id=pay-7".into()).await;
    assert_eq!(found["processed"], true, "{found}");
    assert_eq!(found["message_id"], parked_ids[0].to_string());
    assert!(
        found["processed_at"]
            .as_str()
            .unwrap()
            .starts_with("2026-01-02T03:04:05"),
        "{found}"
    );
    let missing = get("/api/inbox?consumer=card-service&biz_id=pay-8".into()).await;
    assert_eq!(missing["processed"], false);

    // Every action and every refusal is in the log (written once the relay has stopped: its
    // log writer flushes on a graceful exit).
    kill(&relay, "-TERM");
    assert_eq!(exit_within(&mut relay, Duration::from_secs(20)), 0);
    let log = std::fs::read_to_string(dir.join("relay.log")).unwrap();
    assert_eq!(log.matches("console action refused").count(), 2, "{log}");
    assert_eq!(
        log.matches("console action on dead letters").count(),
        3,
        "{log}"
    );
    assert_eq!(
        log.matches("console action on parked messages").count(),
        2,
        "{log}"
    );

    // Without a token the page is read-only: actions are refused with 403, content is shown.
    let (_relay, port) = admin_relay(&db, None, &dir.join("readonly.log")).await;
    let (code, body) = http(
        port,
        "POST",
        "/api/dead-letters/purge",
        &[("content-type", "application/json")],
        &json!({"filter": {"topic": "bulk"}}).to_string(),
    )
    .await;
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("read-only"), "{body}");
    assert_eq!(http(port, "GET", &one, &[], "").await.0, 200);
    assert_eq!(
        count("SELECT count(*) FROM tidings.dead_letters WHERE topic = 'bulk'").await,
        250
    );
}

/// A fresh directory under the target directory for one test's files.
fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("operator-{}", uuid::Uuid::now_v7()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
