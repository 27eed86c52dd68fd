-- claim_batch: lock up to $1 due outbox rows for this relay's transaction and say which of them
-- may be published now without breaking per-key order.
--
-- Parameters: $1 bigint batch size.
-- Locking: FOR UPDATE SKIP LOCKED, held until the relay's transaction ends. Rows another relay
--   holds are skipped, so two relays never publish the same row at once; a relay that dies drops
--   its connection and PostgreSQL releases its rows at once; a relay that hangs is cut off by
--   idle_in_transaction_session_timeout / statement_timeout (the claim timeout), set with
--   SET LOCAL before this statement. No claim column is written: claiming costs no row update.
-- Visibility: only committed rows are seen (READ COMMITTED). There is no "seq > last seen"
--   cursor: rows commit out of seq order, and a cursor would skip the late ones.
-- Order: FIFO by seq, walking the primary key and skipping rows not yet due (retry backoff or
--   a scheduled time). Seq order, not due time, so that the oldest message of every key is
--   always at the front of the window: ordering by due time let retried heads drift behind
--   their own key's later rows and starve (found by the two-relay ordering test).
--   Rows waiting for a retry or a schedule are re-read by each claim; very many messages
--   scheduled far ahead therefore slow claiming (see README, "Limits").
-- Keyed rows behind a not-yet-due older row of their key are not claimed at all (they could
--   not be published, and would crowd the window); uses outbox_key_idx.
-- eligible: a keyed row may go only if every older row of its key is in this same claim (it is
--   then published after them, in seq order). An older row held by another relay or left out of
--   this claim holds it back. Rows of still-open producer transactions are invisible here; they
--   commit later and are delivered later, so delivery follows commit order. Ineligible rows stay
--   locked, untouched, until this transaction ends.
WITH claimed AS (
    SELECT o.seq, o.id, o.topic, o.ordering_key, o.biz_id, o.payload, o.headers, o.created_at,
           o.attempts
      FROM tidings.outbox o
     WHERE o.deliver_at <= now()
       AND (o.ordering_key IS NULL OR NOT EXISTS (
                SELECT 1 FROM tidings.outbox w
                 WHERE w.ordering_key = o.ordering_key
                   AND w.seq < o.seq
                   AND w.deliver_at > now()))
     ORDER BY o.seq
     LIMIT $1
       FOR UPDATE OF o SKIP LOCKED
)
SELECT c.seq, c.id, c.topic, c.ordering_key, c.biz_id, c.payload, c.headers, c.created_at,
       c.attempts,
       (c.ordering_key IS NULL OR NOT EXISTS (
            SELECT 1 FROM tidings.outbox e
             WHERE e.ordering_key = c.ordering_key
               AND e.seq < c.seq
               AND e.seq NOT IN (SELECT seq FROM claimed))) AS eligible
  FROM claimed c
 ORDER BY c.seq
