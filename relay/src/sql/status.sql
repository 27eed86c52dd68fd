-- status: liveness signals for `tidings status` and alerts, one row.
-- backlog: rows in the outbox; ready: of those, due now; oldest_ready_age: seconds the oldest
-- due row has waited (the signal that a relay is stuck); retrying: rows with failed attempts.
-- Reads only; the counts scan the outbox (cheap while relays keep it small).
SELECT count(*)                                                   AS backlog,
       count(*) FILTER (WHERE deliver_at <= now())                AS ready,
       count(*) FILTER (WHERE attempts > 0)                       AS retrying,
       extract(epoch FROM now() - min(deliver_at) FILTER (WHERE deliver_at <= now()))::float8
                                                                  AS oldest_ready_age,
       (SELECT count(*) FROM tidings.dead_letters)                AS dead_letters
  FROM tidings.outbox
