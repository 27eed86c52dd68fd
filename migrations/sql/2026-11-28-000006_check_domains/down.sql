-- Back to migration 000004's table CHECKs. The topic rule comes back NOT VALID (it was
-- validated before 000006): every row in the table passed the same rule on its way in.
ALTER TABLE tidings.inbox
    DROP CONSTRAINT consumer_1_to_512_bytes_without_control_characters,
    ADD CONSTRAINT consumer_1_to_512_bytes_without_control_characters
        CHECK (octet_length(consumer) BETWEEN 1 AND 512 AND consumer !~ '[\x01-\x1f\x7f-\x9f]') NOT VALID,
    DROP CONSTRAINT biz_id_1_to_512_bytes_without_control_characters,
    ADD CONSTRAINT biz_id_1_to_512_bytes_without_control_characters
        CHECK (octet_length(biz_id) BETWEEN 1 AND 512 AND biz_id !~ '[\x01-\x1f\x7f-\x9f]') NOT VALID;
ALTER TABLE tidings.outbox
    DROP CONSTRAINT topic_dotted_segments_of_a_z_0_9_dash_underscore_max_200,
    ADD CONSTRAINT topic_dotted_segments_of_a_z_0_9_dash_underscore_max_200
        CHECK (length(topic) <= 200 AND topic ~ '^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$') NOT VALID,
    DROP CONSTRAINT ordering_key_1_to_512_bytes_without_control_characters,
    ADD CONSTRAINT ordering_key_1_to_512_bytes_without_control_characters
        CHECK (octet_length(ordering_key) BETWEEN 1 AND 512
               AND ordering_key !~ '[\x01-\x1f\x7f-\x9f]') NOT VALID,
    DROP CONSTRAINT biz_id_1_to_512_bytes_without_control_characters,
    ADD CONSTRAINT biz_id_1_to_512_bytes_without_control_characters
        CHECK (octet_length(biz_id) BETWEEN 1 AND 512 AND biz_id !~ '[\x01-\x1f\x7f-\x9f]') NOT VALID,
    DROP CONSTRAINT headers_string_values_token_names_none_reserved,
    ADD CONSTRAINT headers_string_values_token_names_none_reserved
        CHECK (CASE
                 WHEN headers = '{}'::jsonb THEN true
                 WHEN jsonb_typeof(headers) <> 'object' THEN false
                 WHEN headers - '{content-type,content-encoding,traceparent,tracestate,baggage}'::text[]
                          = '{}'::jsonb
                      AND length(headers::text) < 4096
                      AND headers::text !~ E'[^ -~]|\\\\[^"\\\\t]|": [^"]' THEN true
                 ELSE tidings.headers_are_valid(headers)
               END) NOT VALID,
    DROP CONSTRAINT attempts_between_0_and_1000000,
    ADD CONSTRAINT attempts_between_0_and_1000000
        CHECK (attempts BETWEEN 0 AND 1000000) NOT VALID;
DROP DOMAIN tidings.topic, tidings.ordering_key, tidings.biz_id, tidings.consumer,
    tidings.attempts, tidings.headers;
