-- finish_batch: record the outcome of a published batch, in the claim's transaction, in one
-- round trip. Rows neither delivered nor failed (released: broker unavailable, or held behind a
-- failed message of the same key) are not mentioned and keep their state.
--
-- Parameters: $1 tid[] the delivered rows' ctids, as claim_batch returned them (deleted:
--   delivered rows leave the hot table at once; by TID, a Tid Scan with no index descent per
--   row, which cost a tenth of the relay's database time by seq; a claimed row is locked by this
--   transaction, so its ctid cannot change before this statement);
--   $2 bigint[] failed seqs, with the same positions in $3 text[] last error, $4 float8[] backoff
--   seconds, $5 text[] dead-letter reason (NULL = retry later, else 'max_attempts'/'permanent'),
--   $6 bool[] whether the failure counts as an attempt (false: the message's destination was
--   down, not the message at fault; the row only waits; NULL counts).
-- Locking: every row named is locked by this transaction's claim_batch, so nothing else can
--   have changed it.
-- Retries: attempts + 1, last_error, and deliver_at = now + backoff, stored on the row so a
--   restarted relay keeps the schedule; first_due_at keeps when the message first became due
--   (`tidings status` measures the oldest due message from there). attempts + 1 is computed
--   from at most 2^31 - 2, so a row written with an absurd count (before the schema bounded it)
--   cannot overflow the statement. Dead letters move to tidings.dead_letters with their last
--   error; a replayed message dying again replaces its old dead-letter row (same id).
WITH delivered AS (
    DELETE FROM tidings.outbox WHERE ctid = ANY($1::tid[])
),
failed AS (
    SELECT * FROM unnest($2::bigint[], $3::text[], $4::float8[], $5::text[], $6::bool[])
        AS f(seq, error, backoff, dead_reason, counted)
),
dead AS (
    DELETE FROM tidings.outbox o USING failed f
     WHERE o.seq = f.seq AND f.dead_reason IS NOT NULL
    RETURNING o.id, o.topic, o.ordering_key, o.biz_id, o.payload, o.headers, o.created_at,
              least(o.attempts, 2147483646) + 1 AS attempts, f.error, f.dead_reason
),
buried AS (
    INSERT INTO tidings.dead_letters
           (id, topic, ordering_key, biz_id, payload, headers, created_at, attempts, last_error, reason)
    SELECT * FROM dead
    ON CONFLICT (id) DO UPDATE
       SET attempts = excluded.attempts, last_error = excluded.last_error,
           reason = excluded.reason, dead_at = now()
),
retried AS (
    UPDATE tidings.outbox o
       SET attempts = least(greatest(o.attempts, 0), 999999)
                      + CASE WHEN f.counted IS FALSE THEN 0 ELSE 1 END,
           first_due_at = coalesce(o.first_due_at, o.deliver_at),
           last_error = f.error,
           last_attempt_at = clock_timestamp(),
           deliver_at = clock_timestamp() + f.backoff * interval '1 second'
      FROM failed f
     WHERE o.seq = f.seq AND f.dead_reason IS NULL
)
SELECT 1
