-- Keyed claim cost (issue 15). The claim keeps keyed rows whose key has an older message that
-- is not due (a retry waiting out its backoff, or a message scheduled ahead) out of the batch:
-- they could not be published before it and would crowd the window. It asked, for every keyed
-- row it read, when its key's oldest row is due: an index scan plus a heap fetch per row, most
-- of the claim's time (about 6 us a row; a claim of 500 keyed rows took 4-5 times as long as
-- one of unkeyed rows).
-- Rows that wait are few and can be told by their own columns: a message is due when it is
-- written (deliver_at = created_at = the transaction's time) unless it was scheduled ahead
-- (deliver_at later than created_at), and a retry or a postponement moves deliver_at past
-- created_at. This partial index holds exactly those keyed rows, so the claim's question is a
-- probe of an index that is usually empty. A row written with deliver_at later than created_at
-- but already due (clock_timestamp() as its time, say) is in it too and is simply found due.
-- The index is not what keeps a key's order: the claim's chain check still refuses any row
-- whose older rows are not all in the same batch (claim_batch.sql). A row that is not due but
-- not in this index (written with a created_at after its deliver_at) therefore only lets its
-- key's later rows be claimed and held back, as before this index.
-- Writes: an unkeyed or an immediately due row is not in it (PostgreSQL checks the predicate
-- only); a retried keyed row is updated outside HOT (deliver_at is now indexed for it).
CREATE INDEX outbox_key_waiting_idx ON tidings.outbox (ordering_key, seq)
    WHERE ordering_key IS NOT NULL AND deliver_at > created_at;
