-- Reverts the core schema. Drops every Tidings table and function but leaves the schema and
-- the migration ledger, which belong to the runner.
DROP FUNCTION IF EXISTS tidings.enqueue(text, jsonb, text, text, jsonb, timestamptz);
DROP TRIGGER IF EXISTS outbox_notify ON tidings.outbox;
DROP FUNCTION IF EXISTS tidings.notify_outbox();
DROP TABLE IF EXISTS tidings.relays;
DROP TABLE IF EXISTS tidings.inbox_dead_letters;
DROP TABLE IF EXISTS tidings.inbox;
DROP TABLE IF EXISTS tidings.dead_letters;
DROP TABLE IF EXISTS tidings.outbox;
DROP FUNCTION IF EXISTS tidings.uuid_v7();
DROP FUNCTION IF EXISTS tidings.topic_is_valid(text);
