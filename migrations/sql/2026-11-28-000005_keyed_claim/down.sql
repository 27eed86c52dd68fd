DROP INDEX tidings.outbox_key_waiting_idx;
