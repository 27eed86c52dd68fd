-- grants: least-privilege access to the Tidings schema, one section per kind of role.
-- Printed by `tidings grants` (tidings_migrations::Grants::sql), which fills in the role names.
--
-- Run it as the owner of the tidings schema (the role that ran `tidings migrate up`), and again
-- after every `tidings migrate up`: it is idempotent and converges. Every role named is first
-- stripped of all its privileges on the tidings tables and its Tidings policies, then given
-- exactly those of its sections, in one transaction (no moment without them). It creates no
-- roles and sets no passwords; the roles must exist.
--
-- Placeholders, filled by the generator only with names it validated (never raw input):
--   {role}      a role name, double-quoted ("card_service")
--   {name}      the same name unquoted, inside a quoted policy name ("consumer_card_service")
--   {consumers} the consumer names a consumer role may use, as quoted literals ('card', 'card-refunds')
--
-- Row-level security: the inbox tables are shared by every consuming service, keyed by consumer
-- name. With RLS on, a consumer role sees and writes only the rows of its own consumer names
-- (one policy per role, "consumer_<role>"); the pruner's policy lets it read and delete every
-- inbox row and write none; the operator's lets it read, delete and ask to replay every parked
-- message, and (by its column grants) change nothing else. The table owner bypasses RLS (it is not FORCEd), superusers too; any
-- other role with privileges granted by hand sees no inbox rows at all.
-- Column lists: producers and the operator name the columns they may INSERT, so no one but the
-- database chooses seq (GENERATED ALWAYS; OVERRIDING SYSTEM VALUE needs INSERT on seq) or the
-- delivery state; the relay may UPDATE only the delivery state, never topic, payload or headers.

--- section: begin
BEGIN;
-- Quiet the "policy ... does not exist, skipping" notices of a first run; warnings still show.
SET LOCAL client_min_messages = warning;
ALTER TABLE tidings.inbox ENABLE ROW LEVEL SECURITY;
ALTER TABLE tidings.inbox_dead_letters ENABLE ROW LEVEL SECURITY;
-- Vacuum: in PostgreSQL 15 only the owner (or a superuser) may VACUUM a table, so a relay role
-- granted here never vacuums the outbox itself (it checks, and warns once); autovacuum must,
-- with the outbox's own thresholds from the core migration. Only reads settings: warns, never
-- fails, when autovacuum cannot do that job.
DO $$
BEGIN
    IF NOT (current_setting('autovacuum')::bool AND current_setting('track_counts')::bool) THEN
        RAISE WARNING 'tidings: autovacuum is off on this server (autovacuum = %, track_counts = %); with least-privilege relays nothing vacuums tidings.outbox and claiming slows down as dead rows pile up',
            current_setting('autovacuum'), current_setting('track_counts');
    END IF;
    IF EXISTS (SELECT 1 FROM pg_class c, pg_options_to_table(c.reloptions) o
                WHERE c.oid = 'tidings.outbox'::regclass AND o.option_name = 'autovacuum_enabled'
                  AND lower(o.option_value) IN ('false', 'off', 'no', '0', 'f', 'n')) THEN
        RAISE WARNING 'tidings: autovacuum is disabled for tidings.outbox (autovacuum_enabled = off); with least-privilege relays nothing vacuums it: ALTER TABLE tidings.outbox RESET (autovacuum_enabled)';
    END IF;
END
$$;

--- section: reset
-- {role}: start from nothing. Revoking a table privilege revokes its column privileges too,
-- so a table-wide grant made by hand earlier (e.g. INSERT on the whole outbox) goes as well.
REVOKE ALL ON ALL TABLES IN SCHEMA tidings FROM {role};
REVOKE ALL ON ALL SEQUENCES IN SCHEMA tidings FROM {role};
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA tidings FROM {role};
DROP POLICY IF EXISTS "consumer_{name}" ON tidings.inbox;
DROP POLICY IF EXISTS "consumer_{name}" ON tidings.inbox_dead_letters;
DROP POLICY IF EXISTS "pruner_{name}" ON tidings.inbox;
DROP POLICY IF EXISTS "operator_{name}" ON tidings.inbox_dead_letters;
GRANT USAGE ON SCHEMA tidings TO {role};

--- section: producer
-- {role} produces: insert messages (Rust API, tidings.enqueue or a plain INSERT of these
-- columns) inside its own transactions. It cannot read, change or delete any message.
-- tidings.enqueue runs with the caller's rights (not SECURITY DEFINER): these column grants
-- are all it needs, and it cannot be used to reach further.
GRANT INSERT (id, topic, ordering_key, biz_id, payload, headers, deliver_at) ON tidings.outbox TO {role};
GRANT EXECUTE ON FUNCTION tidings.enqueue(text, jsonb, text, text, jsonb, timestamptz),
                          tidings.uuid_v7(), tidings.topic_is_valid(text) TO {role};

--- section: consumer
-- {role} consumes as: {consumers}. Record biz-ids in the inbox, park messages, and run the
-- replays an operator asked for (delete the parked row with the effect, or park it again), for
-- those consumer names only (the policies below).
GRANT SELECT, INSERT (consumer, biz_id, message_id) ON tidings.inbox TO {role};
GRANT SELECT, INSERT (consumer, message_id, biz_id, topic, ordering_key, payload, headers,
                      created_at, deliveries, last_error),
      UPDATE (deliveries, last_error, dead_at, replay_requested_at), DELETE
      ON tidings.inbox_dead_letters TO {role};
CREATE POLICY "consumer_{name}" ON tidings.inbox TO {role}
    USING (consumer IN ({consumers})) WITH CHECK (consumer IN ({consumers}));
CREATE POLICY "consumer_{name}" ON tidings.inbox_dead_letters TO {role}
    USING (consumer IN ({consumers})) WITH CHECK (consumer IN ({consumers}));

--- section: relay
-- {role} relays: claim (SELECT ... FOR UPDATE, which needs UPDATE on some column), delete
-- delivered rows, record failures (the delivery-state columns only), dead-letter, heartbeat,
-- and check the schema version at start. It cannot insert messages or rewrite their content.
GRANT SELECT ON tidings.schema_migrations TO {role};
GRANT SELECT, DELETE ON tidings.outbox TO {role};
GRANT UPDATE (attempts, last_error, last_attempt_at, deliver_at, first_due_at) ON tidings.outbox TO {role};
GRANT SELECT, INSERT ON tidings.dead_letters TO {role};
-- A message that dies again replaces its dead-letter row's bookkeeping, never its content.
GRANT UPDATE (attempts, last_error, reason, dead_at) ON tidings.dead_letters TO {role};
GRANT SELECT, INSERT, UPDATE, DELETE ON tidings.relays TO {role};

--- section: pruner
-- {role} prunes the inbox (`tidings inbox prune`): reads and deletes any consumer's records,
-- writes none.
GRANT SELECT ON tidings.schema_migrations TO {role};
GRANT SELECT, DELETE ON tidings.inbox TO {role};
CREATE POLICY "pruner_{name}" ON tidings.inbox TO {role} USING (true) WITH CHECK (false);

--- section: operator
-- {role} operates (`tidings status`, `tidings dlq list|replay|purge`): reads the outbox without
-- its payloads and headers, reads and deletes dead letters, and replays them into the outbox
-- (same id, so INSERT of id and created_at too). It cannot change or delete outbox rows.
-- `tidings inbox dlq list|replay|purge`: reads and deletes every consumer's parked messages and
-- asks for their replay (replay_requested_at is the only column it may set; the consumer's own
-- runner does the replay). Its policy admits every consumer's rows; it has no INSERT privilege
-- there, so it cannot park (forge) a message.
GRANT SELECT ON tidings.schema_migrations TO {role};
GRANT SELECT (seq, id, topic, ordering_key, biz_id, created_at, deliver_at, attempts, last_error,
              last_attempt_at, first_due_at) ON tidings.outbox TO {role};
GRANT INSERT (id, topic, ordering_key, biz_id, payload, headers, created_at) ON tidings.outbox TO {role};
GRANT SELECT, DELETE ON tidings.dead_letters TO {role};
GRANT SELECT ON tidings.relays TO {role};
GRANT SELECT, UPDATE (replay_requested_at), DELETE ON tidings.inbox_dead_letters TO {role};
CREATE POLICY "operator_{name}" ON tidings.inbox_dead_letters TO {role}
    USING (true) WITH CHECK (true);

--- section: commit
COMMIT;
