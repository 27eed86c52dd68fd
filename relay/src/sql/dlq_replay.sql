-- dlq_replay: move dead letters back into the outbox with their original id (so consumers that
-- dedup on message id still recognise them), attempts reset, due now.
-- Parameters: $1 uuid[] ids to replay; $2 bool replay all (then $1 is ignored).
-- A replayed keyed message gets a new seq, so it is delivered after messages of its key that
-- were enqueued after it (see the ordering guarantee in the README).
WITH moved AS (
    DELETE FROM tidings.dead_letters
     WHERE $2 OR id = ANY($1::uuid[])
    RETURNING id, topic, ordering_key, biz_id, payload, headers, created_at
)
INSERT INTO tidings.outbox (id, topic, ordering_key, biz_id, payload, headers, created_at)
SELECT id, topic, ordering_key, biz_id, payload, headers, created_at
  FROM moved
 ORDER BY created_at, id
-- The same id cannot be in the outbox twice (outbox_id_key); if it already is, that copy stays
-- and is delivered, so nothing is lost.
    ON CONFLICT (id) DO NOTHING
