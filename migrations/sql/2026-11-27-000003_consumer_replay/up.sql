-- Consumer-side replay of parked messages (`tidings inbox dlq replay`).
--
-- A parked message keeps what the consumer's handler needs to run it again without the broker:
-- its ordering key and its enqueue time join the payload, headers and topic already kept. An
-- operator asks for a replay by setting replay_requested_at; the consumer's runner picks its own
-- requested rows up (a partial index keeps that poll cheap), runs the handler with the inbox
-- record in one transaction and deletes the parked row in that same transaction, or parks it
-- again with the new error and clears the request.
ALTER TABLE tidings.inbox_dead_letters
    ADD COLUMN ordering_key text,
    ADD COLUMN created_at timestamptz,
    ADD COLUMN replay_requested_at timestamptz;
CREATE INDEX inbox_dead_letters_replay_idx
    ON tidings.inbox_dead_letters (consumer, replay_requested_at)
    WHERE replay_requested_at IS NOT NULL;
