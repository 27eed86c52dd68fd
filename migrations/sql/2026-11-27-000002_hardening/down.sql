-- Reverts the hardening migration: the core migration's checks and enqueue function come back.
-- Rows written under the stricter rules satisfy the looser ones.
ALTER TABLE tidings.inbox DROP CONSTRAINT IF EXISTS biz_id_1_to_512_bytes_without_control_characters;
ALTER TABLE tidings.inbox ADD CONSTRAINT inbox_biz_id_check CHECK (biz_id <> '') NOT VALID;
ALTER TABLE tidings.inbox DROP CONSTRAINT IF EXISTS consumer_1_to_512_bytes_without_control_characters;
ALTER TABLE tidings.inbox ADD CONSTRAINT inbox_consumer_check CHECK (consumer <> '') NOT VALID;
ALTER TABLE tidings.relays DROP COLUMN IF EXISTS heartbeat_interval_secs;
ALTER TABLE tidings.outbox DROP COLUMN IF EXISTS first_due_at;
DROP INDEX IF EXISTS tidings.outbox_id_key;
ALTER TABLE tidings.outbox DROP CONSTRAINT IF EXISTS attempts_between_0_and_1000000;
ALTER TABLE tidings.outbox DROP CONSTRAINT IF EXISTS headers_string_values_token_names_none_reserved;
ALTER TABLE tidings.outbox ADD CONSTRAINT outbox_headers_check CHECK (jsonb_typeof(headers) = 'object') NOT VALID;
DROP FUNCTION IF EXISTS tidings.headers_are_valid(jsonb);
ALTER TABLE tidings.outbox DROP CONSTRAINT IF EXISTS ordering_key_1_to_512_bytes_without_control_characters;
ALTER TABLE tidings.outbox ADD CONSTRAINT outbox_ordering_key_check CHECK (ordering_key <> '') NOT VALID;
ALTER TABLE tidings.outbox DROP CONSTRAINT IF EXISTS biz_id_1_to_512_bytes_without_control_characters;
ALTER TABLE tidings.outbox ADD CONSTRAINT outbox_biz_id_check CHECK (biz_id <> '') NOT VALID;
ALTER TABLE tidings.outbox RENAME CONSTRAINT topic_dotted_segments_of_a_z_0_9_dash_underscore_max_200
    TO outbox_topic_check;
CREATE OR REPLACE FUNCTION tidings.enqueue(
    topic       text,
    payload     jsonb,
    biz_id      text DEFAULT NULL,
    key         text DEFAULT NULL,
    headers     jsonb DEFAULT NULL,
    deliver_at  timestamptz DEFAULT NULL
) RETURNS uuid
LANGUAGE plpgsql AS $$
DECLARE
    v_id      uuid := tidings.uuid_v7();
    v_bytes   bytea;
    v_max     bigint := coalesce(nullif(current_setting('tidings.max_payload_bytes', true), '')::bigint, 1048576);
    v_bad     text;
BEGIN
    IF topic IS NULL OR NOT tidings.topic_is_valid(topic) THEN
        RAISE EXCEPTION 'tidings: invalid topic %: use 1-200 characters of A-Z a-z 0-9 _ - in dot-separated segments', quote_nullable(topic)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF payload IS NULL THEN
        RAISE EXCEPTION 'tidings: payload must not be null' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF biz_id = '' THEN
        RAISE EXCEPTION 'tidings: biz_id must not be empty' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF key = '' THEN
        RAISE EXCEPTION 'tidings: key must not be empty' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF headers IS NOT NULL THEN
        IF jsonb_typeof(headers) <> 'object' THEN
            RAISE EXCEPTION 'tidings: headers must be a JSON object of strings' USING ERRCODE = 'invalid_parameter_value';
        END IF;
        SELECT h.key INTO v_bad FROM jsonb_each(headers) h WHERE jsonb_typeof(h.value) <> 'string' LIMIT 1;
        IF v_bad IS NOT NULL THEN
            RAISE EXCEPTION 'tidings: header % is not a string', quote_literal(v_bad) USING ERRCODE = 'invalid_parameter_value';
        END IF;
        SELECT h.key INTO v_bad FROM jsonb_each(headers) h
         WHERE h.key !~ '^[!#$%&''*+.^_`|~0-9A-Za-z-]{1,128}$' OR lower(h.key) LIKE 'tidings-%' LIMIT 1;
        IF v_bad IS NOT NULL THEN
            RAISE EXCEPTION 'tidings: invalid header name %: use token characters and no Tidings- prefix', quote_literal(v_bad)
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        SELECT h.key INTO v_bad FROM jsonb_each_text(headers) h WHERE h.value ~ '[\r\n]' LIMIT 1;
        IF v_bad IS NOT NULL THEN
            RAISE EXCEPTION 'tidings: header % contains a line break', quote_literal(v_bad) USING ERRCODE = 'invalid_parameter_value';
        END IF;
    END IF;
    v_bytes := convert_to(payload::text, 'UTF8');
    IF octet_length(v_bytes) > v_max THEN
        RAISE EXCEPTION 'tidings: payload is % bytes, over the maximum of %', octet_length(v_bytes), v_max
            USING ERRCODE = 'program_limit_exceeded';
    END IF;
    INSERT INTO tidings.outbox (id, topic, ordering_key, biz_id, payload, headers, deliver_at)
    VALUES (v_id, topic, key, biz_id, v_bytes,
            coalesce(headers, '{}'::jsonb) || '{"content-type": "application/json"}'::jsonb,
            coalesce(deliver_at, now()));
    RETURN v_id;
END
$$;
