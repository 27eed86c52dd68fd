DROP TRIGGER outbox_notify ON tidings.outbox;
CREATE TRIGGER outbox_notify AFTER INSERT ON tidings.outbox
    FOR EACH STATEMENT EXECUTE FUNCTION tidings.notify_outbox();
ALTER TABLE tidings.outbox DROP CONSTRAINT headers_string_values_token_names_none_reserved;
ALTER TABLE tidings.outbox ADD CONSTRAINT headers_string_values_token_names_none_reserved
    CHECK (tidings.headers_are_valid(headers)) NOT VALID;
