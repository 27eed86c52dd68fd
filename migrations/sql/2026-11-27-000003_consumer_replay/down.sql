DROP INDEX IF EXISTS tidings.inbox_dead_letters_replay_idx;
ALTER TABLE tidings.inbox_dead_letters
    DROP COLUMN IF EXISTS replay_requested_at,
    DROP COLUMN IF EXISTS created_at,
    DROP COLUMN IF EXISTS ordering_key;
