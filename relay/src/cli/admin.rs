//! The admin subcommands: `migrate`, `status`, `dlq`, `grants` and `inbox prune|dlq`.

use std::time::Duration;

use uuid::Uuid;

use super::{
    usage, Db, DlqAction, Failure, GrantsArgs, InboxAction, InboxDlqAction, MigrateAction,
};

/// `tidings inbox prune` refuses a retention below this unless --force.
const PRUNE_FLOOR: Duration = Duration::from_secs(3600);

/// `tidings grants`: prints the script; needs no database.
pub(super) fn grants(a: GrantsArgs) -> Result<(), Failure> {
    let grants = tidings_migrations::Grants {
        producers: a.producer,
        consumers: a.consumer,
        relay: a.relay,
        pruner: a.pruner,
        operator: a.operator,
    };
    if grants.producers.is_empty()
        && grants.consumers.is_empty()
        && [&grants.relay, &grants.pruner, &grants.operator]
            .iter()
            .all(|r| r.is_none())
    {
        return Err(usage(
            "name at least one role (--producer, --consumer, --relay, --pruner, --operator)",
        ));
    }
    out_raw!("{}", grants.sql().map_err(|e| usage(e.to_string()))?);
    Ok(())
}

pub(super) async fn migrate(
    client: &mut tokio_postgres::Client,
    action: MigrateAction,
) -> Result<(), Failure> {
    use tidings_migrations::postgres as m;
    match action {
        MigrateAction::Up => {
            let done = m::up(client).await?;
            for mig in &done {
                out!("applied {} {}", mig.version, mig.name);
            }
            if done.is_empty() {
                out!("schema is current; nothing to apply");
            }
        }
        MigrateAction::Down { steps, all, force } => {
            if !force {
                guard_down(client).await?;
            }
            let done = m::down(client, if all { usize::MAX } else { steps }).await?;
            for mig in &done {
                out!("reverted {} {}", mig.version, mig.name);
            }
            if done.is_empty() {
                out!("nothing to revert");
            }
        }
        MigrateAction::Status => {
            let s = m::status(client).await?;
            for (mig, state) in &s.migrations {
                let state = match state {
                    tidings_migrations::MigrationState::Pending => "pending".to_owned(),
                    tidings_migrations::MigrationState::Applied(t) => format!("applied {t}"),
                    tidings_migrations::MigrationState::Modified(t) => {
                        format!("applied {t}, but CHANGED since (checksum mismatch)")
                    }
                };
                out!("{} {:<24} {state}", mig.version, mig.name);
            }
            for v in &s.unknown {
                out!("{v} (unknown to this build: applied by a newer tidings)");
            }
        }
        // `run` prints the script without connecting; nothing to do here either way.
        MigrateAction::Sql => out_raw!("{}", tidings_migrations::script()),
    }
    Ok(())
}

/// Refuses a revert while Tidings tables hold rows it could drop.
async fn guard_down(client: &tokio_postgres::Client) -> Result<(), Failure> {
    let mut held = Vec::new();
    for (table, what) in [
        ("outbox", "undelivered messages"),
        ("dead_letters", "dead letters"),
        ("inbox", "inbox records"),
        ("inbox_dead_letters", "parked consumer messages"),
    ] {
        // Table names come from the list above, never from input.
        let sql = format!(
            "SELECT CASE WHEN to_regclass('tidings.{table}') IS NULL THEN 0 \
             ELSE (SELECT count(*) FROM (SELECT 1 FROM tidings.{table} LIMIT 1000000) t) END"
        );
        // to_regclass makes a missing table count 0; any other failure stops the revert.
        let n: i64 = client
            .query_typed(&sql, &[])
            .await?
            .first()
            .map_or(Ok(0), |row| row.try_get(0))?;
        if n > 0 {
            held.push(format!("{n} {what}"));
        }
    }
    if held.is_empty() {
        return Ok(());
    }
    Err(usage(format!(
        "refusing to revert: tidings tables hold {}; a revert may drop them. Deliver or purge them first, or pass --force",
        held.join(", ")
    )))
}

pub(super) async fn status(client: &tokio_postgres::Client, json: bool) -> Result<(), Failure> {
    tidings_migrations::postgres::ensure_current(client).await?;
    let s = crate::status(client).await?;
    if json {
        out!("{}", serde_json::to_string_pretty(&s).unwrap_or_default());
        return Ok(());
    }
    out_raw!("{s}");
    Ok(())
}

/// The ids a replay or purge names: `None` for --all; neither is a usage error.
fn pick(ids: Vec<Uuid>, all: bool, what: &str) -> Result<Option<Vec<Uuid>>, Failure> {
    match (all, ids.is_empty()) {
        (true, _) => Ok(None),
        (false, false) => Ok(Some(ids)),
        (false, true) => Err(usage(format!("name {what} ids, or pass --all"))),
    }
}

pub(super) async fn dlq(client: &tokio_postgres::Client, action: DlqAction) -> Result<(), Failure> {
    tidings_migrations::postgres::ensure_current(client).await?;
    match action {
        DlqAction::List { limit } => {
            for d in crate::dlq_list(client, limit).await? {
                out!("{d}");
            }
        }
        DlqAction::Replay { ids, all } => {
            let ids = pick(ids, all, "message")?;
            let n = crate::dlq_replay(client, ids.as_deref()).await?;
            out!("replayed {n} messages");
        }
        DlqAction::Purge { ids, all } => {
            let ids = pick(ids, all, "message")?;
            let n = crate::dlq_purge(client, ids.as_deref()).await?;
            out!("purged {n} messages");
        }
    }
    Ok(())
}

/// `tidings inbox ...`: usage is checked before connecting.
pub(super) async fn inbox(pg: Result<Db, Failure>, action: InboxAction) -> Result<(), Failure> {
    match action {
        InboxAction::Prune {
            older_than,
            consumer,
            batch,
            force,
        } => {
            if batch < 1 {
                return Err(usage("--batch must be at least 1"));
            }
            if older_than < PRUNE_FLOOR && !force {
                return Err(usage(format!(
                    "--older-than {older_than:?} would forget messages that may still be redelivered (the floor is 1h); pass --force if you mean it"
                )));
            }
            pg?.admin(async |client| {
                tidings_migrations::postgres::ensure_current(client).await?;
                let n =
                    tidings_inbox::prune(client, consumer.as_deref(), older_than, batch).await?;
                out!("pruned {n} inbox records older than {older_than:?}");
                Ok(())
            })
            .await
        }
        InboxAction::Dlq { action } => {
            // Usage first: a command missing its ids fails the same with or without a database.
            let ids = match &action {
                InboxDlqAction::List { .. } => None,
                InboxDlqAction::Replay { ids, all, .. }
                | InboxDlqAction::Purge { ids, all, .. } => {
                    pick(ids.clone(), *all, "parked message")?
                }
            };
            pg?.admin(async |client| {
                tidings_migrations::postgres::ensure_current(client).await?;
                inbox_dlq(client, action, ids.as_deref()).await
            })
            .await
        }
    }
}

async fn inbox_dlq(
    client: &tokio_postgres::Client,
    action: InboxDlqAction,
    ids: Option<&[Uuid]>,
) -> Result<(), Failure> {
    match action {
        InboxDlqAction::List {
            consumer,
            limit,
            json,
        } => {
            let parked = crate::inbox_dlq_list(client, consumer.as_deref(), limit).await?;
            if json {
                out!(
                    "{}",
                    serde_json::to_string_pretty(&parked).unwrap_or_default()
                );
                return Ok(());
            }
            for p in &parked {
                out!("{p}");
            }
        }
        InboxDlqAction::Replay { consumer, .. } => {
            let n = crate::inbox_dlq_replay(client, &consumer, ids).await?;
            out!(
                "requested replay of {n} parked messages of consumer {}; its runner picks them up within its replay poll interval (it must be running)",
                crate::shown(&consumer)
            );
        }
        InboxDlqAction::Purge { consumer, .. } => {
            let n = crate::inbox_dlq_purge(client, &consumer, ids).await?;
            out!(
                "purged {n} parked messages of consumer {}",
                crate::shown(&consumer)
            );
        }
    }
    Ok(())
}
