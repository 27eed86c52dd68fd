//! The outbox write path, for every driver: committed messages are visible with every field,
//! rolled-back ones leave nothing, batches are one statement, bad input writes nothing.

use std::time::Duration;

use diesel::Connection as _;
use diesel_async::AsyncConnection as _;
use serde_json::json;
use tidings_outbox::{Error, Message, MessageId, Outbox, OutboxConfig};
use tidings_tests::TestDb;
use tokio_postgres::Client;

#[derive(Debug, PartialEq)]
struct Row {
    id: uuid::Uuid,
    topic: String,
    key: Option<String>,
    biz_id: Option<String>,
    payload: Vec<u8>,
    headers: serde_json::Value,
    delayed: bool,
    attempts: i32,
}

async fn rows(c: &Client) -> Vec<Row> {
    c.query(
        "SELECT id, topic, ordering_key, biz_id, payload, headers, deliver_at > now() + interval '1 minute', attempts
           FROM tidings.outbox ORDER BY seq",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| Row {
        id: r.get(0),
        topic: r.get(1),
        key: r.get(2),
        biz_id: r.get(3),
        payload: r.get(4),
        headers: r.get(5),
        delayed: r.get(6),
        attempts: r.get(7),
    })
    .collect()
}

fn sample() -> Message {
    Message::json(
        "payment.succeeded",
        &json!({"payment_id": "pay_1", "cents": 4200}),
    )
    .unwrap()
    .biz_id("pay_1")
    .key("customer_7")
    .header(
        "traceparent",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    )
}

fn assert_sample(rows: &[Row], id: MessageId) {
    assert_eq!(rows.len(), 1);
    let r = &rows[0];
    assert_eq!(r.id, id.as_uuid());
    assert_eq!(r.id.get_version_num(), 7, "ids are UUIDv7");
    assert_eq!(r.topic, "payment.succeeded");
    assert_eq!(r.key.as_deref(), Some("customer_7"));
    assert_eq!(r.biz_id.as_deref(), Some("pay_1"));
    let payload: serde_json::Value = serde_json::from_slice(&r.payload).unwrap();
    assert_eq!(payload, json!({"payment_id": "pay_1", "cents": 4200}));
    assert_eq!(
        r.headers,
        json!({"content-type": "application/json",
               "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"})
    );
    assert!(!r.delayed);
    assert_eq!(r.attempts, 0);
}

/// Counts INSERT statements on the outbox with a statement-level trigger, to prove a batch is
/// one statement rather than one round trip per message.
async fn count_statements(c: &Client) {
    c.batch_execute(
        "CREATE TABLE stmt_count (n int NOT NULL); INSERT INTO stmt_count VALUES (0);
         CREATE FUNCTION bump() RETURNS trigger LANGUAGE plpgsql AS
           $$BEGIN UPDATE stmt_count SET n = n + 1; RETURN NULL; END$$;
         CREATE TRIGGER bump AFTER INSERT ON tidings.outbox FOR EACH STATEMENT EXECUTE FUNCTION bump();",
    )
    .await
    .unwrap();
}

async fn statements(c: &Client) -> i32 {
    c.query_one("SELECT n FROM stmt_count", &[])
        .await
        .unwrap()
        .get(0)
}

fn batch(n: usize) -> Vec<Message> {
    (0..n)
        .map(|i| {
            Message::new("orders.created", format!("{i}"))
                .key(format!("k{}", i % 10))
                .biz_id(format!("order-{i}"))
        })
        .collect()
}

async fn assert_batch(c: &Client, ids: &[MessageId]) {
    let rows = rows(c).await;
    assert_eq!(rows.len(), ids.len());
    for (i, (row, id)) in rows.iter().zip(ids).enumerate() {
        assert_eq!(row.id, id.as_uuid(), "row {i} keeps batch order");
        assert_eq!(row.payload, format!("{i}").into_bytes());
    }
    assert_eq!(
        statements(c).await,
        1,
        "a batch of {} is one statement",
        ids.len()
    );
}

// ---------------------------------------------------------------- tokio-postgres

#[tokio::test]
async fn tokio_postgres_committed_message_is_visible_with_every_field() {
    let db = TestDb::migrated().await;
    let mut c = db.client().await;
    let tx = c.transaction().await.unwrap();
    let id = Outbox::default().enqueue_pg(&tx, &sample()).await.unwrap();
    tx.commit().await.unwrap();
    assert_sample(&rows(&c).await, id);
}

#[tokio::test]
async fn tokio_postgres_rolled_back_message_leaves_no_row() {
    let db = TestDb::migrated().await;
    let mut c = db.client().await;
    let tx = c.transaction().await.unwrap();
    tx.batch_execute("CREATE TABLE payments (id text)")
        .await
        .unwrap();
    Outbox::default().enqueue_pg(&tx, &sample()).await.unwrap();
    tx.rollback().await.unwrap();
    assert!(rows(&c).await.is_empty());
}

#[tokio::test]
async fn tokio_postgres_batch_of_1000_is_one_statement() {
    let db = TestDb::migrated().await;
    let mut c = db.client().await;
    count_statements(&c).await;
    let tx = c.transaction().await.unwrap();
    let ids = Outbox::default()
        .enqueue_batch_pg(&tx, &batch(1000))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_batch(&c, &ids).await;
}

#[tokio::test]
async fn deadpool_postgres_objects_enqueue_in_their_transaction() {
    let db = TestDb::migrated().await;
    let mut cfg = deadpool_postgres::Config::new();
    cfg.url = Some(db.url.clone());
    let pool = cfg
        .create_pool(
            Some(deadpool_postgres::Runtime::Tokio1),
            tokio_postgres::NoTls,
        )
        .unwrap();
    let mut obj = pool.get().await.unwrap();
    let tx = obj.transaction().await.unwrap();
    let id = Outbox::default().enqueue_pg(&*tx, &sample()).await.unwrap();
    tx.commit().await.unwrap();
    // A pooled client outside a transaction: the statement commits on its own.
    Outbox::default()
        .enqueue_pg(&**obj, &Message::new("x", "y"))
        .await
        .unwrap();
    let r = rows(&db.client().await).await;
    assert_eq!(r.len(), 2);
    assert_sample(&r[..1], id);
}

#[tokio::test]
async fn deadpool_cached_statement_enqueues_in_the_callers_transaction() {
    let db = TestDb::migrated().await;
    let c = db.client().await;
    count_statements(&c).await;
    let pool = tidings_tests::pool(&db, 1);
    let mut obj = pool.get().await.unwrap();
    // Twice on the same pooled connection: the second use hits the cached statement.
    for round in 0..2 {
        let tx = obj.transaction().await.unwrap();
        let id = Outbox::default()
            .enqueue_deadpool(&tx, &sample())
            .await
            .unwrap();
        if round == 0 {
            tx.rollback().await.unwrap();
            assert!(rows(&c).await.is_empty(), "rolled back");
        } else {
            tx.commit().await.unwrap();
            assert_sample(&rows(&c).await, id);
        }
    }
    c.batch_execute("TRUNCATE tidings.outbox; UPDATE stmt_count SET n = 0")
        .await
        .unwrap();
    let tx = obj.transaction().await.unwrap();
    let ids = Outbox::default()
        .enqueue_batch_deadpool(&tx, &batch(1000))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_batch(&c, &ids).await;
    let err = Outbox::default()
        .enqueue_deadpool(&obj, &Message::new("bad topic", "x"))
        .await
        .unwrap_err();
    assert!(err.to_string().starts_with("invalid topic"), "{err}");
}

// ---------------------------------------------------------------- diesel sync

fn diesel_conn(db: &TestDb) -> diesel::PgConnection {
    diesel::PgConnection::establish(&db.url).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn diesel_committed_message_is_visible_with_every_field() {
    let db = TestDb::migrated().await;
    let url_db = db.url.clone();
    let id = tokio::task::spawn_blocking(move || {
        let mut conn = diesel::PgConnection::establish(&url_db).unwrap();
        conn.transaction::<_, Error, _>(|conn| Outbox::default().enqueue(conn, &sample()))
            .unwrap()
    })
    .await
    .unwrap();
    assert_sample(&rows(&db.client().await).await, id);
}

#[tokio::test(flavor = "multi_thread")]
async fn diesel_rolled_back_message_leaves_no_row() {
    let db = TestDb::migrated().await;
    let mut conn = diesel_conn(&db);
    let res = conn.transaction::<(), Error, _>(|conn| {
        Outbox::default().enqueue(conn, &sample())?;
        Err(Error::Config("business rule failed"))
    });
    assert!(res.is_err());
    assert!(rows(&db.client().await).await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn diesel_batch_of_1000_is_one_statement() {
    let db = TestDb::migrated().await;
    let c = db.client().await;
    count_statements(&c).await;
    let mut conn = diesel_conn(&db);
    let ids = conn
        .transaction::<_, Error, _>(|conn| Outbox::default().enqueue_batch(conn, &batch(1000)))
        .unwrap();
    assert_batch(&c, &ids).await;
}

// ---------------------------------------------------------------- diesel-async

#[tokio::test]
async fn diesel_async_committed_message_is_visible_with_every_field() {
    let db = TestDb::migrated().await;
    let mut conn = diesel_async::AsyncPgConnection::establish(&db.url)
        .await
        .unwrap();
    let id = conn
        .transaction::<_, Error, _>(async |conn| {
            Outbox::default().enqueue_async(conn, &sample()).await
        })
        .await
        .unwrap();
    assert_sample(&rows(&db.client().await).await, id);
}

#[tokio::test]
async fn diesel_async_rolled_back_message_leaves_no_row() {
    let db = TestDb::migrated().await;
    let mut conn = diesel_async::AsyncPgConnection::establish(&db.url)
        .await
        .unwrap();
    let res = conn
        .transaction::<(), Error, _>(async |conn| {
            Outbox::default().enqueue_async(conn, &sample()).await?;
            Err(Error::Config("business rule failed"))
        })
        .await;
    assert!(res.is_err());
    assert!(rows(&db.client().await).await.is_empty());
}

#[tokio::test]
async fn diesel_async_pooled_batch_of_1000_is_one_statement() {
    use diesel_async::pooled_connection::deadpool::Pool;
    use diesel_async::pooled_connection::AsyncDieselConnectionManager;
    let db = TestDb::migrated().await;
    let c = db.client().await;
    count_statements(&c).await;
    let pool = Pool::builder(AsyncDieselConnectionManager::<
        diesel_async::AsyncPgConnection,
    >::new(&db.url))
    .build()
    .unwrap();
    let mut obj = pool.get().await.unwrap();
    let ids = obj
        .transaction::<_, Error, _>(async |conn| {
            Outbox::default()
                .enqueue_batch_async(conn, &batch(1000))
                .await
        })
        .await
        .unwrap();
    assert_batch(&c, &ids).await;
}

// ---------------------------------------------------------------- bad input

#[tokio::test]
async fn bad_input_is_refused_before_anything_is_written() {
    let db = TestDb::migrated().await;
    let c = db.client().await;
    let outbox = Outbox::new(OutboxConfig {
        max_payload_bytes: 16,
        ..Default::default()
    })
    .unwrap();
    let cases: Vec<(Message, &str)> = vec![
        (Message::new("", "x"), "invalid topic \"\": it is empty"),
        (
            Message::new("orders..created", "x"),
            "invalid topic \"orders..created\": it has an empty segment",
        ),
        (
            Message::new("orders created", "x"),
            "invalid topic \"orders created\": only",
        ),
        (
            Message::new("t", vec![0u8; 17]),
            "payload is 17 bytes, over the maximum of 16",
        ),
        (
            Message::new("t", "x").headers_json(&json!({"retries": 3})),
            "header \"retries\" is not a string",
        ),
        (
            Message::new("t", "x").biz_id(""),
            "invalid biz-id: it is empty",
        ),
        (
            Message::new("t", "x").header("Tidings-Biz-Id", "spoof"),
            "invalid header \"Tidings-Biz-Id\"",
        ),
    ];
    for (msg, want) in cases {
        let err = outbox.enqueue_pg(&c, &msg).await.unwrap_err();
        assert!(
            err.to_string().starts_with(want),
            "{err} should start with {want}"
        );
    }
    let mut msgs = batch(3);
    msgs.push(Message::new("bad topic", "x"));
    let err = outbox.enqueue_batch_pg(&c, &msgs).await.unwrap_err();
    assert!(
        err.to_string()
            .starts_with("message 3 of the batch: invalid topic"),
        "{err}"
    );
    assert!(rows(&c).await.is_empty(), "nothing was written");
    assert!(Outbox::new(OutboxConfig {
        max_payload_bytes: 0,
        ..Default::default()
    })
    .is_err());
}

#[tokio::test(flavor = "multi_thread")]
async fn unmigrated_database_error_names_the_migrate_command_for_every_driver() {
    let db = TestDb::empty().await;
    let want = "run `tidings migrate up`";
    let outbox = Outbox::default();

    let c = db.client().await;
    let err = outbox.enqueue_pg(&c, &sample()).await.unwrap_err();
    assert!(
        matches!(err, Error::NotMigrated(_)) && err.to_string().contains(want),
        "{err}"
    );

    let mut conn = diesel_async::AsyncPgConnection::establish(&db.url)
        .await
        .unwrap();
    let err = outbox
        .enqueue_async(&mut conn, &sample())
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::NotMigrated(_)) && err.to_string().contains(want),
        "{err}"
    );

    let url = db.url.clone();
    let err = tokio::task::spawn_blocking(move || {
        let mut conn = diesel::PgConnection::establish(&url).unwrap();
        Outbox::default().enqueue(&mut conn, &sample()).unwrap_err()
    })
    .await
    .unwrap();
    assert!(
        matches!(err, Error::NotMigrated(_)) && err.to_string().contains(want),
        "{err}"
    );
}

#[tokio::test]
async fn delayed_and_scheduled_messages_carry_their_delivery_time() {
    let db = TestDb::migrated().await;
    let c = db.client().await;
    let later = chrono::Utc::now() + chrono::Duration::hours(1);
    Outbox::default()
        .enqueue_batch_pg(
            &c,
            &[
                Message::new("a", "1").delay(Duration::from_secs(3600)),
                Message::new("a", "2").deliver_at(later),
                Message::new("a", "3"),
            ],
        )
        .await
        .unwrap();
    let delayed: Vec<bool> = rows(&c).await.iter().map(|r| r.delayed).collect();
    assert_eq!(delayed, [true, true, false]);
}

// ---------------------------------------------------------------- SQL function

#[tokio::test]
async fn sql_enqueue_function_writes_a_v7_message_in_the_callers_transaction() {
    let db = TestDb::migrated().await;
    let mut c = db.client().await;
    let tx = c.transaction().await.unwrap();
    let id: uuid::Uuid = tx
        .query_one(
            "SELECT tidings.enqueue('payment.succeeded', '{\"payment_id\":\"pay_1\",\"cents\":4200}',
                     biz_id => 'pay_1', key => 'customer_7',
                     headers => '{\"traceparent\":\"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\"}')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let id2: uuid::Uuid = tx
        .query_one("SELECT tidings.enqueue('a', '1')", &[])
        .await
        .unwrap()
        .get(0);
    tx.commit().await.unwrap();
    assert_eq!(id.get_version_num(), 7);
    assert!(id2 > id, "UUIDv7 from SQL are time-ordered");
    let r = rows(&c).await;
    assert_sample(&r[..1], MessageId::from_uuid(id));

    let tx = c.transaction().await.unwrap();
    tx.query_one("SELECT tidings.enqueue('b', '1')", &[])
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(
        rows(&c).await.len(),
        2,
        "rolled back SQL enqueue leaves nothing"
    );
}

#[tokio::test]
async fn sql_enqueue_function_refuses_bad_input_by_name() {
    let db = TestDb::migrated().await;
    let c = db.client().await;
    for (sql, want) in [
        (
            "SELECT tidings.enqueue('a..b', '1')",
            "topic_dotted_segments_of_a_z_0_9_dash_underscore_max_200",
        ),
        (
            "SELECT tidings.enqueue('a', '1', headers => '{\"n\": 1}')",
            "headers_string_values_token_names_none_reserved",
        ),
        (
            "SELECT tidings.enqueue('a', '1', biz_id => '')",
            "biz_id_1_to_512_bytes_without_control_characters",
        ),
        (
            "SELECT tidings.enqueue('a', '1', biz_id => E'pay_1\\nX')",
            "biz_id_1_to_512_bytes_without_control_characters",
        ),
        (
            "SELECT tidings.enqueue('a', '1', headers => '{\"Nats-Rollup\": \"all\"}')",
            "headers_string_values_token_names_none_reserved",
        ),
        (
            "SET tidings.max_payload_bytes = 4; SELECT tidings.enqueue('a', '\"hello\"')",
            "payload is 7 bytes, over the maximum of 4",
        ),
    ] {
        let err = c.batch_execute(sql).await.unwrap_err();
        let msg = err.as_db_error().unwrap().message();
        assert!(msg.contains(want), "{msg} should contain {want}");
    }
    assert!(rows(&c).await.is_empty());
    // Direct INSERTs are held to the topic rule by a CHECK constraint too.
    let err = c
        .batch_execute(
            "INSERT INTO tidings.outbox (id, topic, payload) VALUES (gen_random_uuid(), 'a b', '')",
        )
        .await
        .unwrap_err();
    assert!(
        err.as_db_error()
            .unwrap()
            .message()
            .contains("topic_dotted_segments"),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn every_driver_refuses_bad_input_and_writes_nothing() {
    let db = TestDb::migrated().await;
    let bad = vec![Message::new("ok", "1"), Message::new("not ok", "2")];
    let want = "message 1 of the batch: invalid topic \"not ok\"";

    let mut conn = diesel_async::AsyncPgConnection::establish(&db.url)
        .await
        .unwrap();
    let err = Outbox::default()
        .enqueue_batch_async(&mut conn, &bad)
        .await
        .unwrap_err();
    assert!(err.to_string().starts_with(want), "{err}");

    let url = db.url.clone();
    let (bad2, want2) = (bad.clone(), want.to_owned());
    tokio::task::spawn_blocking(move || {
        let mut conn = diesel::PgConnection::establish(&url).unwrap();
        let err = Outbox::default()
            .enqueue_batch(&mut conn, &bad2)
            .unwrap_err();
        assert!(err.to_string().starts_with(&want2), "{err}");
    })
    .await
    .unwrap();

    let c = db.client().await;
    let err = Outbox::default()
        .enqueue_batch_pg(&c, &bad)
        .await
        .unwrap_err();
    assert!(err.to_string().starts_with(want), "{err}");
    assert!(rows(&c).await.is_empty());
}

// ---------------------------------------------------------------- sync postgres

/// Runs `f` with a sync `postgres` client on a thread of its own (the sync client runs its own
/// runtime and must not be called on the test's).
async fn with_sync<T: Send + 'static>(
    url: &str,
    f: impl FnOnce(&mut postgres::Client) -> T + Send + 'static,
) -> T {
    let url = url.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        f(&mut c)
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn sync_postgres_committed_message_is_visible_with_every_field() {
    let db = TestDb::migrated().await;
    let id = with_sync(&db.url, |c| {
        let mut tx = c.transaction().unwrap();
        let id = Outbox::default().enqueue_sync(&mut tx, &sample()).unwrap();
        tx.commit().unwrap();
        id
    })
    .await;
    assert_sample(&rows(&db.client().await).await, id);
}

#[tokio::test]
async fn sync_postgres_rolled_back_message_leaves_no_row() {
    let db = TestDb::migrated().await;
    with_sync(&db.url, |c| {
        let mut tx = c.transaction().unwrap();
        tx.batch_execute("CREATE TABLE payments (id text)").unwrap();
        Outbox::default().enqueue_sync(&mut tx, &sample()).unwrap();
        tx.rollback().unwrap();
    })
    .await;
    assert!(rows(&db.client().await).await.is_empty());
}

#[tokio::test]
async fn sync_postgres_batch_of_1000_is_one_statement_and_bad_input_writes_nothing() {
    let db = TestDb::migrated().await;
    let c = db.client().await;
    count_statements(&c).await;
    let ids = with_sync(&db.url, |c| {
        let mut tx = c.transaction().unwrap();
        let ids = Outbox::default()
            .enqueue_batch_sync(&mut tx, &batch(1000))
            .unwrap();
        tx.commit().unwrap();
        ids
    })
    .await;
    assert_batch(&c, &ids).await;
    let err = with_sync(&db.url, |c| {
        let mut msgs = batch(3);
        msgs.push(Message::new("bad topic", "x"));
        Outbox::default()
            .enqueue_batch_sync(c, &msgs)
            .unwrap_err()
            .to_string()
    })
    .await;
    assert!(
        err.starts_with("message 3 of the batch: invalid topic"),
        "{err}"
    );
    assert_eq!(rows(&c).await.len(), 1000, "nothing more was written");
}

#[tokio::test]
async fn sync_postgres_unmigrated_database_names_the_migrate_command() {
    let db = TestDb::empty().await;
    let err = with_sync(&db.url, |c| {
        Outbox::default().enqueue_sync(c, &sample()).unwrap_err()
    })
    .await;
    assert!(
        matches!(err, Error::NotMigrated(_))
            && err.to_string().contains("run `tidings migrate up`"),
        "{err}"
    );
}

// ---------------------------------------------------------------- sqlx

async fn sqlx_conn(db: &TestDb) -> sqlx::PgConnection {
    use sqlx::Connection as _;
    sqlx::PgConnection::connect(&db.url).await.unwrap()
}

#[tokio::test]
async fn sqlx_committed_message_is_visible_with_every_field() {
    use sqlx::Connection as _;
    let db = TestDb::migrated().await;
    let mut conn = sqlx_conn(&db).await;
    let mut tx = conn.begin().await.unwrap();
    let id = Outbox::default()
        .enqueue_sqlx(&mut tx, &sample())
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_sample(&rows(&db.client().await).await, id);
}

#[tokio::test]
async fn sqlx_rolled_back_message_leaves_no_row() {
    use sqlx::Connection as _;
    let db = TestDb::migrated().await;
    let mut conn = sqlx_conn(&db).await;
    let mut tx = conn.begin().await.unwrap();
    sqlx::query("CREATE TABLE payments (id text)")
        .execute(&mut *tx)
        .await
        .unwrap();
    Outbox::default()
        .enqueue_sqlx(&mut tx, &sample())
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    assert!(rows(&db.client().await).await.is_empty());
}

#[tokio::test]
async fn sqlx_batch_of_1000_is_one_statement_and_bad_input_writes_nothing() {
    use sqlx::Connection as _;
    let db = TestDb::migrated().await;
    let c = db.client().await;
    count_statements(&c).await;
    let mut conn = sqlx_conn(&db).await;
    let mut tx = conn.begin().await.unwrap();
    let ids = Outbox::default()
        .enqueue_batch_sqlx(&mut tx, &batch(1000))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_batch(&c, &ids).await;
    let mut msgs = batch(3);
    msgs.push(Message::new("bad topic", "x"));
    let err = Outbox::default()
        .enqueue_batch_sqlx(&mut conn, &msgs)
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("message 3 of the batch: invalid topic"),
        "{err}"
    );
    // Through PgBouncer in transaction mode: no statement kept prepared on the connection.
    let unprepared = Outbox::new(OutboxConfig {
        statement_cache: false,
        ..Default::default()
    })
    .unwrap();
    unprepared.enqueue_sqlx(&mut conn, &sample()).await.unwrap();
    assert_eq!(
        rows(&c).await.len(),
        1001,
        "nothing of the bad batch was written"
    );
}

#[tokio::test]
async fn sqlx_unmigrated_database_names_the_migrate_command() {
    let db = TestDb::empty().await;
    let mut conn = sqlx_conn(&db).await;
    let err = Outbox::default()
        .enqueue_sqlx(&mut conn, &sample())
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::NotMigrated(_))
            && err.to_string().contains("run `tidings migrate up`"),
        "{err}"
    );
}

// ---------------------------------------------------------------- pipelined commit

/// A TCP stream that counts flights: bursts of writes with no read between them. A request and
/// its answer is one flight; requests sent together before any answer is read are one flight.
struct Flights {
    inner: tokio::net::TcpStream,
    flights: std::sync::Arc<std::sync::atomic::AtomicU64>,
    read_since_write: bool,
}

impl tokio::io::AsyncRead for Flights {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.read_since_write = true;
        }
        r
    }
}

impl tokio::io::AsyncWrite for Flights {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, std::task::Poll::Ready(Ok(n)) if n > 0) && self.read_since_write {
            self.read_since_write = false;
            self.flights
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        r
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A tokio-postgres client whose round trips are counted.
async fn counted_client(db: &TestDb) -> (Client, std::sync::Arc<std::sync::atomic::AtomicU64>) {
    let config: tokio_postgres::Config = db.url.parse().unwrap();
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let flights = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let stream = Flights {
        inner: tcp,
        flights: flights.clone(),
        read_since_write: true,
    };
    let (client, conn) = config
        .connect_raw(stream, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    (client, flights)
}

#[tokio::test]
async fn pipelined_commit_writes_the_messages_in_the_commits_round_trip() {
    use std::sync::atomic::Ordering::SeqCst;
    let db = TestDb::migrated().await;
    let observer = db.client().await;
    observer
        .batch_execute("CREATE TABLE payments (id text PRIMARY KEY)")
        .await
        .unwrap();
    let (mut c, flights) = counted_client(&db).await;
    let outbox = Outbox::default();

    // The ordinary way, for comparison: the INSERT is a round trip of its own.
    let tx = c.transaction().await.unwrap();
    let start = flights.load(SeqCst);
    outbox
        .enqueue_pg(&tx, &Message::new("x", "y"))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(flights.load(SeqCst) - start, 2, "enqueue_pg, then COMMIT");
    observer
        .batch_execute("TRUNCATE tidings.outbox")
        .await
        .unwrap();

    let mut tx = outbox.begin_pg(&mut c).await.unwrap();
    tx.execute("INSERT INTO payments VALUES ('pay_1')", &[])
        .await
        .unwrap();
    let id = tx.enqueue(&sample()).unwrap();
    assert_eq!(tx.pending(), 1);
    // Nothing is written before the commit, not even inside the transaction.
    let n: i64 = tx
        .query_one("SELECT count(*) FROM tidings.outbox", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
    let start = flights.load(SeqCst);
    tx.commit().await.unwrap();
    assert_eq!(
        flights.load(SeqCst) - start,
        1,
        "the INSERT and the COMMIT in one round trip"
    );
    assert_sample(&rows(&observer).await, id);
    let paid: i64 = observer
        .query_one("SELECT count(*) FROM payments", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(paid, 1, "the business row committed with the message");

    // A batch: one statement, in order, with the commit.
    observer
        .batch_execute("TRUNCATE tidings.outbox")
        .await
        .unwrap();
    count_statements(&observer).await;
    let mut tx = outbox.begin_pg(&mut c).await.unwrap();
    let mut ids = tx.enqueue_batch(&batch(400)).unwrap();
    ids.extend(tx.enqueue_batch(&batch(1000)[400..]).unwrap());
    let start = flights.load(SeqCst);
    tx.commit().await.unwrap();
    assert_eq!(flights.load(SeqCst) - start, 1);
    assert_batch(&observer, &ids).await;

    // No message: a commit all the same. The connection is clean afterwards: no transaction
    // left open (outside one, each statement is its own: its transaction starts with it).
    let tx = outbox.begin_pg(&mut c).await.unwrap();
    tx.execute("INSERT INTO payments VALUES ('pay_2')", &[])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_outside_a_transaction(&c).await;
    let paid: i64 = observer
        .query_one("SELECT count(*) FROM payments", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(paid, 2);
}

/// Fails if `c` is inside a transaction block: a statement there started after its transaction.
async fn assert_outside_a_transaction(c: &Client) {
    // Simple protocol: outside a transaction block the statement's own transaction starts
    // with it; inside one, the block started before the sleep.
    c.batch_execute("SELECT pg_sleep(0.01)").await.unwrap();
    let rows = c
        .simple_query("SELECT now() = statement_timestamp()")
        .await
        .unwrap();
    let fresh = rows.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(|v| v == "t"),
        _ => None,
    });
    assert_eq!(
        fresh,
        Some(true),
        "the connection was left inside a transaction"
    );
}

#[tokio::test]
async fn pipelined_commit_that_fails_commits_nothing_and_says_why() {
    let db = TestDb::migrated().await;
    let observer = db.client().await;
    // A rule only the server knows: the message passes the Rust checks, its INSERT fails.
    observer
        .batch_execute(
            "CREATE TABLE payments (id text PRIMARY KEY);
             ALTER TABLE tidings.outbox ADD CONSTRAINT no_forbidden CHECK (topic <> 'forbidden')",
        )
        .await
        .unwrap();
    let mut c = db.client().await;
    let outbox = Outbox::default();
    let mut tx = outbox.begin_pg(&mut c).await.unwrap();
    tx.execute("INSERT INTO payments VALUES ('pay_1')", &[])
        .await
        .unwrap();
    tx.enqueue(&Message::new("forbidden", "x")).unwrap();
    let err = tx.commit().await.unwrap_err();
    assert!(
        matches!(&err, Error::Database(_)) && format!("{err:?}").contains("no_forbidden"),
        "{err:?}"
    );
    let paid: i64 = observer
        .query_one("SELECT count(*) FROM payments", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(paid, 0, "the business row rolled back with the message");

    // An earlier statement failed and its error was ignored: tokio-postgres' own commit would
    // report success for the server's ROLLBACK; this one reports the abort.
    let mut tx = outbox.begin_pg(&mut c).await.unwrap();
    tx.execute("INSERT INTO payments VALUES ('pay_2')", &[])
        .await
        .unwrap();
    assert!(tx.execute("SELECT 1 / 0", &[]).await.is_err());
    tx.enqueue(&Message::new("payments.paid", "x")).unwrap();
    assert!(tx.commit().await.is_err());
    assert!(rows(&observer).await.is_empty());
    assert_outside_a_transaction(&c).await;
    // The same without a message: the abort is reported, not committed as a ROLLBACK.
    let tx = outbox.begin_pg(&mut c).await.unwrap();
    assert!(tx.execute("SELECT 1 / 0", &[]).await.is_err());
    assert!(tx.commit().await.is_err());
    assert_outside_a_transaction(&c).await;

    // Rolled back or dropped: nothing written, the connection usable.
    let mut tx = outbox.begin_pg(&mut c).await.unwrap();
    tx.enqueue(&Message::new("payments.paid", "x")).unwrap();
    tx.rollback().await.unwrap();
    let mut tx = outbox.begin_pg(&mut c).await.unwrap();
    tx.enqueue(&Message::new("payments.paid", "x")).unwrap();
    drop(tx);
    c.execute("INSERT INTO payments VALUES ('pay_3')", &[])
        .await
        .unwrap();
    assert!(rows(&observer).await.is_empty());
    let paid: Vec<String> = observer
        .query("SELECT id FROM payments", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        paid,
        ["pay_3"],
        "the connection is usable and committing after a drop"
    );
    // A bad message is refused at enqueue, before anything is sent; the others stay.
    let mut tx = outbox.begin_pg(&mut c).await.unwrap();
    tx.enqueue(&Message::new("ok", "x")).unwrap();
    assert!(tx.enqueue(&Message::new("bad topic", "x")).is_err());
    assert!(tx
        .enqueue_batch(&[Message::new("ok", "x"), Message::new("bad topic", "x")])
        .is_err());
    assert_eq!(tx.pending(), 1);
    tx.commit().await.unwrap();
    assert_eq!(rows(&observer).await.len(), 1);
}

#[tokio::test]
async fn pipelined_commit_on_deadpool_caches_its_statements() {
    let db = TestDb::migrated().await;
    let observer = db.client().await;
    count_statements(&observer).await;
    let pool = tidings_tests::pool(&db, 1);
    let mut obj = pool.get().await.unwrap();
    let outbox = Outbox::default();
    for round in 0..2 {
        let mut tx = outbox.begin_deadpool(&mut obj).await.unwrap();
        let id = tx.enqueue(&sample()).unwrap();
        tx.commit().await.unwrap();
        assert_sample(&rows(&observer).await, id);
        observer
            .batch_execute("TRUNCATE tidings.outbox; UPDATE stmt_count SET n = 0")
            .await
            .unwrap();
        assert_eq!(
            obj.statement_cache.size(),
            2,
            "round {round}: the one-message and the batch INSERT, prepared once"
        );
    }
    let mut tx = outbox.begin_deadpool(&mut obj).await.unwrap();
    let ids = tx.enqueue_batch(&batch(1000)).unwrap();
    tx.commit().await.unwrap();
    assert_batch(&observer, &ids).await;

    let uncached = Outbox::new(OutboxConfig {
        statement_cache: false,
        ..OutboxConfig::default()
    })
    .unwrap();
    let err = uncached.begin_deadpool(&mut obj).await.err().unwrap();
    assert!(matches!(err, Error::Config(_)), "{err:?}");
    // begin_pg works through any pooler (unnamed statements).
    let mut tx = uncached.begin_pg(&mut obj).await.unwrap();
    tx.enqueue(&Message::new("x", "y")).unwrap();
    tx.commit().await.unwrap();
}
