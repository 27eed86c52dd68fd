-- heartbeat: register this relay instance or refresh its liveness row, adding the counters
-- accumulated since the last heartbeat. Written every heartbeat interval, never per message.
-- Parameters: $1 uuid relay id, $2 text name, $3 text host, $4 int pid, $5 text sink,
--   $6 bigint delivered, $7 bigint failed (retried), $8 bigint dead-lettered, $9 bigint broker-
--   reported duplicates, each since the last heartbeat.
INSERT INTO tidings.relays AS r (id, name, host, pid, sink, delivered, failed, dead_lettered, duplicates)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
ON CONFLICT (id) DO UPDATE
   SET heartbeat_at = now(),
       delivered = r.delivered + excluded.delivered,
       failed = r.failed + excluded.failed,
       dead_lettered = r.dead_lettered + excluded.dead_lettered,
       duplicates = r.duplicates + excluded.duplicates
