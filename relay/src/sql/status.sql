-- status: liveness signals for `tidings status` and alerts, one row.
-- backlog: rows in the outbox; ready: of those, due now; retrying: rows with failed attempts;
-- oldest_due_age: seconds since the oldest message first became due (first_due_at, kept at its
-- first failure, else deliver_at), so a message failing for hours, now waiting for its next
-- retry, still counts with its full age: the signal that delivery is stuck. Scheduled messages
-- not yet due do not count (no false alarm for a message due tomorrow).
-- Reads only; the counts scan the outbox (cheap while relays keep it small).
SELECT count(*)                                                   AS backlog,
       count(*) FILTER (WHERE deliver_at <= now())                AS ready,
       count(*) FILTER (WHERE attempts > 0)                       AS retrying,
       extract(epoch FROM now() - min(coalesce(first_due_at, deliver_at))
                                  FILTER (WHERE coalesce(first_due_at, deliver_at) <= now()))::float8
                                                                  AS oldest_ready_age,
       (SELECT count(*) FROM tidings.dead_letters)                AS dead_letters
  FROM tidings.outbox
