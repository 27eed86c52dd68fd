//! Migrations as tooling: up/down/up, status, concurrent migrators, a separate ledger from the
//! host application's diesel migrations, vendored SQL.

use diesel::Connection as _;
use diesel_migrations::{FileBasedMigrations, MigrationHarness};
use tidings_migrations::{MigrationState, Status};
use tidings_tests::TestDb;
use tokio_postgres::Client;

const TABLES: &[&str] = &[
    "tidings.outbox",
    "tidings.dead_letters",
    "tidings.inbox",
    "tidings.inbox_dead_letters",
    "tidings.relays",
];

async fn tables_present(c: &Client) -> Vec<bool> {
    let mut out = Vec::new();
    for t in TABLES {
        let present: bool = c
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[t])
            .await
            .unwrap()
            .get(0);
        out.push(present);
    }
    out
}

fn all_applied(s: &Status) -> bool {
    s.migrations
        .iter()
        .all(|(_, st)| matches!(st, MigrationState::Applied(_)))
}

#[tokio::test]
async fn up_down_up_round_trips_and_status_follows() {
    let db = TestDb::empty().await;
    let mut c = db.client().await;
    let n = tidings_migrations::migrations().len();

    let s = tidings_migrations::postgres::status(&c).await.unwrap();
    assert_eq!(
        s.pending().len(),
        n,
        "status on a fresh database creates nothing"
    );
    assert!(tidings_migrations::postgres::ensure_current(&c)
        .await
        .unwrap_err()
        .to_string()
        .contains("run `tidings migrate up`"));

    assert_eq!(
        tidings_migrations::postgres::up(&mut c)
            .await
            .unwrap()
            .len(),
        n
    );
    assert!(tables_present(&c).await.iter().all(|p| *p));
    assert!(all_applied(
        &tidings_migrations::postgres::status(&c).await.unwrap()
    ));
    assert!(
        tidings_migrations::postgres::up(&mut c)
            .await
            .unwrap()
            .is_empty(),
        "idempotent"
    );

    assert_eq!(
        tidings_migrations::postgres::down(&mut c, n)
            .await
            .unwrap()
            .len(),
        n
    );
    assert!(tables_present(&c).await.iter().all(|p| !*p));
    assert_eq!(
        tidings_migrations::postgres::status(&c)
            .await
            .unwrap()
            .pending()
            .len(),
        n
    );
    assert!(tidings_migrations::postgres::down(&mut c, 1)
        .await
        .unwrap()
        .is_empty());

    assert_eq!(
        tidings_migrations::postgres::up(&mut c)
            .await
            .unwrap()
            .len(),
        n
    );
    assert!(tables_present(&c).await.iter().all(|p| *p));
    tidings_migrations::postgres::ensure_current(&c)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn diesel_sync_api_migrates_up_down_up() {
    let db = TestDb::empty().await;
    let url = db.url.clone();
    let n = tidings_migrations::migrations().len();
    tokio::task::spawn_blocking(move || {
        let mut conn = diesel::PgConnection::establish(&url).unwrap();
        assert_eq!(tidings_migrations::diesel::up(&mut conn).unwrap().len(), n);
        tidings_migrations::diesel::ensure_current(&mut conn).unwrap();
        assert_eq!(
            tidings_migrations::diesel::down(&mut conn, n)
                .unwrap()
                .len(),
            n
        );
        assert_eq!(
            tidings_migrations::diesel::status(&mut conn)
                .unwrap()
                .pending()
                .len(),
            n
        );
        assert_eq!(tidings_migrations::diesel::up(&mut conn).unwrap().len(), n);
    })
    .await
    .unwrap();
    assert!(tables_present(&db.client().await).await.iter().all(|p| *p));
}

#[tokio::test(flavor = "multi_thread")]
async fn sync_postgres_api_migrates_up_down_up_and_names_pending_ones() {
    let db = TestDb::empty().await;
    let url = db.url.clone();
    let n = tidings_migrations::migrations().len();
    tokio::task::spawn_blocking(move || {
        use tidings_migrations::sync_postgres as m;
        let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        let err = m::ensure_current(&mut c).unwrap_err().to_string();
        assert!(err.contains("tidings migrate up"), "{err}");
        assert_eq!(m::up(&mut c).unwrap().len(), n);
        m::ensure_current(&mut c).unwrap();
        assert_eq!(m::up(&mut c).unwrap().len(), 0, "nothing left to apply");
        assert_eq!(m::down(&mut c, n).unwrap().len(), n);
        assert_eq!(m::status(&mut c).unwrap().pending().len(), n);
        assert_eq!(m::up(&mut c).unwrap().len(), n);
    })
    .await
    .unwrap();
    assert!(tables_present(&db.client().await).await.iter().all(|p| *p));
}

#[tokio::test]
async fn sqlx_api_migrates_up_down_up_and_names_pending_ones() {
    use sqlx::Connection as _;
    use tidings_migrations::sqlx as m;
    let db = TestDb::empty().await;
    let n = tidings_migrations::migrations().len();
    let mut c = sqlx::PgConnection::connect(&db.url).await.unwrap();
    let err = m::ensure_current(&mut c).await.unwrap_err().to_string();
    assert!(err.contains("tidings migrate up"), "{err}");
    assert_eq!(m::up(&mut c).await.unwrap().len(), n);
    m::ensure_current(&mut c).await.unwrap();
    assert_eq!(
        m::up(&mut c).await.unwrap().len(),
        0,
        "nothing left to apply"
    );
    assert_eq!(m::down(&mut c, n).await.unwrap().len(), n);
    assert_eq!(m::status(&mut c).await.unwrap().pending().len(), n);
    assert_eq!(m::up(&mut c).await.unwrap().len(), n);
    assert!(tables_present(&db.client().await).await.iter().all(|p| *p));
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_migrators_neither_fail_nor_double_apply() {
    let db = TestDb::empty().await;
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let url = db.url.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = tidings_tests::connect(&url).await;
            tidings_migrations::postgres::up(&mut c)
                .await
                .unwrap()
                .len()
        }));
    }
    let mut applied = 0;
    for t in tasks {
        applied += t.await.unwrap();
    }
    assert_eq!(
        applied,
        tidings_migrations::migrations().len(),
        "each migration applied once"
    );
    let c = db.client().await;
    let rows: i64 = c
        .query_one("SELECT count(*) FROM tidings.schema_migrations", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows as usize, tidings_migrations::migrations().len());
}

/// A host application with its own diesel migrations, one of which shares Tidings' version
/// string, is unaffected by Tidings migrating up and down, and the other way round.
#[tokio::test(flavor = "multi_thread")]
async fn host_app_diesel_migrations_with_a_colliding_version_are_unaffected() {
    let db = TestDb::empty().await;
    let tidings_version = tidings_migrations::migrations()[0].version;
    // diesel's folder layout: "2026-11-27-000001_host_app" has version "20261127000001".
    let dir = std::env::temp_dir().join(format!("host_migrations_{}", db.name));
    let folder = dir.join(format!(
        "{}-{}-{}-{}_host_app",
        &tidings_version[..4],
        &tidings_version[4..6],
        &tidings_version[6..8],
        &tidings_version[8..]
    ));
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::write(folder.join("up.sql"), "CREATE TABLE host_things (id int);").unwrap();
    std::fs::write(folder.join("down.sql"), "DROP TABLE host_things;").unwrap();

    let url = db.url.clone();
    let dir2 = dir.clone();
    tokio::task::spawn_blocking(move || {
        let host = FileBasedMigrations::from_path(&dir2).unwrap();
        let mut conn = diesel::PgConnection::establish(&url).unwrap();
        let applied = conn.run_pending_migrations(host.clone()).unwrap();
        assert_eq!(
            applied[0].to_string(),
            tidings_version,
            "the versions really collide"
        );

        tidings_migrations::diesel::up(&mut conn).unwrap();
        // The host still sees exactly its own migration as applied, nothing pending.
        assert_eq!(conn.applied_migrations().unwrap().len(), 1);
        assert!(!conn.has_pending_migration(host.clone()).unwrap());
        // Reverting Tidings leaves the host's table and ledger alone.
        tidings_migrations::diesel::down(&mut conn, usize::MAX).unwrap();
        assert_eq!(conn.applied_migrations().unwrap().len(), 1);
        tidings_migrations::diesel::up(&mut conn).unwrap();
        // Reverting the host runs the host's down.sql only: Tidings stays current.
        conn.revert_last_migration(host).unwrap();
        tidings_migrations::diesel::ensure_current(&mut conn).unwrap();
    })
    .await
    .unwrap();
    std::fs::remove_dir_all(dir).unwrap();

    let c = db.client().await;
    assert!(tables_present(&c).await.iter().all(|p| *p));
    let host_table: bool = c
        .query_one("SELECT to_regclass('host_things') IS NOT NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert!(!host_table, "the host's own down.sql ran");
}

#[tokio::test]
async fn edited_migration_is_refused() {
    let db = TestDb::migrated().await;
    let mut c = db.client().await;
    c.execute(
        "UPDATE tidings.schema_migrations SET checksum = 'edited'",
        &[],
    )
    .await
    .unwrap();
    let err = tidings_migrations::postgres::up(&mut c).await.unwrap_err();
    assert!(
        err.to_string().contains("changed after it was applied"),
        "{err}"
    );
    c.execute("INSERT INTO tidings.schema_migrations (version, name, checksum) VALUES ('99990101000000', 'future', 'x')", &[])
        .await
        .unwrap();
    let err = tidings_migrations::postgres::ensure_current(&c)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("unknown to this build"), "{err}");
}

#[tokio::test]
async fn vendored_sql_script_leaves_a_current_schema() {
    let db = TestDb::empty().await;
    let c = db.client().await;
    c.batch_execute(&tidings_migrations::script())
        .await
        .unwrap();
    tidings_migrations::postgres::ensure_current(&c)
        .await
        .unwrap();
    assert!(tables_present(&c).await.iter().all(|p| *p));
}

#[tokio::test]
async fn upgrading_a_database_that_holds_poison_rows_succeeds_and_keeps_them() {
    let db = TestDb::migrated().await;
    let mut c = db.client().await;
    // Back to the core schema, as an install before the hardening migration, holding rows that
    // migration's rules refuse: two rows sharing an id, a biz-id with a line break.
    let later = tidings_migrations::migrations()
        .iter()
        .position(|m| m.name == "hardening")
        .map(|i| tidings_migrations::migrations().len() - i)
        .unwrap();
    tidings_migrations::postgres::down(&mut c, later)
        .await
        .unwrap();
    c.batch_execute(
        "INSERT INTO tidings.outbox (id, topic, biz_id, payload) VALUES
           ('0190a000-0000-7000-8000-000000000001', 't', 'a', 'first'),
           ('0190a000-0000-7000-8000-000000000001', 't', 'b', 'second'),
           (gen_random_uuid(), 't', E'pay_1\\nX', 'poison');",
    )
    .await
    .unwrap();
    let applied = tidings_migrations::postgres::up(&mut c).await.unwrap();
    assert_eq!(
        applied.len(),
        later,
        "the hardening migration and later ones apply"
    );
    let rows = c
        .query(
            "SELECT id::text, convert_from(payload, 'UTF8') FROM tidings.outbox ORDER BY seq",
            &[],
        )
        .await
        .unwrap();
    let rows: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(rows.len(), 3, "nothing lost: {rows:?}");
    assert_eq!(
        rows[0].0, "0190a000-0000-7000-8000-000000000001",
        "the oldest keeps its id"
    );
    assert_ne!(rows[1].0, rows[0].0, "the later one got a fresh id");
    // New rows are held to the rules; the old poison row is left for the relay to dead-letter.
    assert!(c
        .batch_execute("SELECT tidings.enqueue('t', '1', biz_id => E'x\\ny')")
        .await
        .is_err());
}
