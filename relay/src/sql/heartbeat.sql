-- heartbeat: register this relay instance or refresh its liveness row, adding the counters
-- accumulated since the last heartbeat. Written every heartbeat interval, never per message.
-- Also removes the rows of relays that died without deregistering (SIGKILL, lost host) once
-- they have missed their heartbeat for 20 intervals and at least an hour: `tidings status`
-- shows them as dead until then.
-- Parameters: $1 uuid relay id, $2 text name, $3 text host, $4 int pid, $5 text sink,
--   $6 bigint delivered, $7 bigint failed (retried), $8 bigint dead-lettered, $9 bigint broker-
--   reported duplicates, each since the last heartbeat; $10 float8 heartbeat interval seconds.
WITH gone AS (
    DELETE FROM tidings.relays
     WHERE id <> $1
       AND heartbeat_at < now() - greatest(interval '1 hour',
                                           20 * heartbeat_interval_secs * interval '1 second')
)
INSERT INTO tidings.relays AS r (id, name, host, pid, sink, delivered, failed, dead_lettered,
                                 duplicates, heartbeat_interval_secs)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
ON CONFLICT (id) DO UPDATE
   SET heartbeat_at = now(),
       heartbeat_interval_secs = excluded.heartbeat_interval_secs,
       delivered = r.delivered + excluded.delivered,
       failed = r.failed + excluded.failed,
       dead_lettered = r.dead_lettered + excluded.dead_lettered,
       duplicates = r.duplicates + excluded.duplicates
