-- claim_batch: lock up to $1 due outbox rows for this relay's transaction, with what the relay
-- needs to tell which of them may be published now without breaking per-key order.
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
-- Keyed rows with an older row of their key that is not due yet (a retry in backoff, or a
--   message scheduled ahead) are not claimed at all: they could not be published and would
--   crowd the window. Such waiting rows have deliver_at > created_at, and the partial index
--   outbox_key_waiting_idx holds only those, by key and due time, so the question is one range
--   probe per keyed row that reads only its key's rows not due yet, usually none (migration
--   000005: it replaced a probe of the key's oldest row, an index scan plus a heap fetch per
--   row). prev_seq below, not this filter, is what keeps the order.
-- prev_seq: what the relay needs to tell which keyed rows may go now without breaking their
--   key's order: a keyed row may go only if every older row of its key is in this same claim
--   (it is then published after them, in seq order). prev_seq is the key's row just before
--   this one (any row this statement sees, claimed or not: held by another relay, not due, or
--   behind a waiting row), NULL if there is none. The relay walks the batch in seq order: a
--   keyed row is eligible if its prev_seq is NULL, or is a row of this claim that is eligible
--   itself (a break anywhere carries down the rest of the key). Each is one backward probe of
--   outbox_key_idx.
--   Most claims need none: when the claimed rows are the oldest rows in the table and no row
--   between the first and the last claimed one was left out (whole.ok: the table's first seq
--   is the claim's first, and the rows in the claim's seq range are exactly the claimed
--   ones), every older row of every claimed key is in the claim, and prev_seq is NULL for all.
--   That costs two probes of the primary key per claim instead of one probe per keyed row
--   (about 4 us each here; a claim of 500 keyed rows took 1.6 ms instead of 3.5-3.9 ms with
--   the probes and the windows of the previous form). A row that another relay holds, that is
--   not due, or that was deleted by a transaction that committed after this statement began
--   counts as left out (this statement still sees it): the check errs towards probing.
--   Rows of still-open producer transactions are invisible here; they commit later and are
--   delivered later, so delivery follows commit order. Ineligible rows stay locked, untouched,
--   until this transaction ends.
-- Cost: unkeyed rows are never probed. The previous form ran every keyed row through a sort,
--   two window passes and a probe whatever the claim looked like.
-- ctid: where the locked row is; finish_batch deletes delivered rows by it.
-- Planning: the relay sets jit = off for this transaction; the planner's cost estimate for the
--   correlated probes is high enough to trigger JIT compilation, which cost ~90 ms per claim.
WITH claimed AS (
    SELECT o.seq, o.ctid, o.id, o.topic, o.ordering_key, o.biz_id, o.payload, o.headers,
           o.created_at, o.attempts
      FROM tidings.outbox o
     WHERE o.deliver_at <= now()
       AND (o.ordering_key IS NULL OR NOT EXISTS (
                SELECT 1 FROM tidings.outbox w
                 WHERE w.ordering_key = o.ordering_key
                   AND w.deliver_at > now()
                   AND w.deliver_at > w.created_at
                   AND w.seq < o.seq))
     ORDER BY o.seq
     LIMIT $1
       FOR UPDATE OF o SKIP LOCKED
),
span AS (
    SELECT min(c.seq) AS lo, max(c.seq) AS hi, count(*) AS n FROM claimed c
),
whole AS (
    SELECT (SELECT min(x.seq) FROM tidings.outbox x) = s.lo
           AND (SELECT count(*) FROM tidings.outbox x WHERE x.seq BETWEEN s.lo AND s.hi) = s.n
           AS ok
      FROM span s
)
SELECT c.seq, c.ctid, c.id, c.topic, c.ordering_key, c.biz_id, c.payload, c.headers,
       c.created_at, c.attempts,
       CASE WHEN c.ordering_key IS NOT NULL AND NOT (SELECT w.ok FROM whole w) THEN (
            SELECT e.seq FROM tidings.outbox e
             WHERE e.ordering_key = c.ordering_key AND e.seq < c.seq
             ORDER BY e.seq DESC
             LIMIT 1) END AS prev_seq
  FROM claimed c
