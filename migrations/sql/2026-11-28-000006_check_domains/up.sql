-- Check cost (issue 15): the same rules, compiled once per session instead of once per statement.
--
-- PostgreSQL reads a table's CHECK expressions from their stored text, simplifies and compiles
-- them again for every INSERT or UPDATE statement (the executor keeps them only for the
-- statement), at a cost that grows with the expression's size. A domain's CHECK expressions are
-- read and simplified once per session and kept in its type cache; each statement only compiles
-- the cached form. Measured here (psql, a DO block of 50,000 single-row INSERT statements,
-- three runs each, microseconds per statement): into tidings.outbox 37.7-39.7 before this
-- migration, 21.4-22.7 after; into tidings.inbox 13.9-16.9 before, 8.1-8.4 after. Into copies
-- of the outbox: no checks at all 9.4-10.2; the rules as table CHECKs 33.9-35.7 (the headers
-- rule alone about 13, the small attempts rule 3.7: the cost follows the expression's size);
-- the columns typed as the domains 13.5-15.3 (not taken, see below); table CHECKs casting to
-- the domains (this migration) 18.4-19.1.
--
-- The columns keep their base types (text, jsonb, integer): a column typed as a domain would
-- make PostgreSQL infer the domain for an untyped parameter ($1 in a producer's own INSERT),
-- which clients that check parameter types before sending (tokio-postgres: `&str` is refused
-- for a domain) cannot bind. So each table CHECK keeps its name and now casts its column to a
-- domain that holds the rule, under the same constraint name; the cast runs the domain's cached
-- check. A value that breaks a rule still fails with SQLSTATE 23514 (check_violation) naming the
-- rule: `value for domain tidings.topic violates check constraint
-- "topic_dotted_segments_of_a_z_0_9_dash_underscore_max_200"` instead of `new row for relation
-- "outbox" violates check constraint "topic_dotted_segments_of_a_z_0_9_dash_underscore_max_200"`.
-- The rules themselves are unchanged, character for character (tests/rules.rs compares them
-- with the Rust rules and tidings.headers_are_valid).
--
-- `x IS NULL OR (x::domain) IS NOT NULL`: a domain's CHECK passes a NULL (as a table CHECK
-- does), so the cast never refuses a NULL; NOT NULL columns need no IS NULL branch. The cast is
-- inside the expression so that the planner cannot fold it away.
--
-- NOT VALID, as in migration 000002: rows already in the tables are not checked again (they
-- passed the same rules, or predate them; the relay survives either). The rules' patterns are
-- E'' literals, the same whatever standard_conforming_strings says.
--
-- A rule now lives in its domain: `ALTER DOMAIN tidings.topic DROP CONSTRAINT ...` would drop
-- it while the table's CHECK stays listed (the cast to a domain without constraints checks
-- nothing). Change rules with a migration, never by hand.

CREATE DOMAIN tidings.topic AS text
    CONSTRAINT topic_dotted_segments_of_a_z_0_9_dash_underscore_max_200
    CHECK (length(VALUE) <= 200 AND VALUE ~ E'^[A-Za-z0-9_-]+(\\.[A-Za-z0-9_-]+)*$');
CREATE DOMAIN tidings.ordering_key AS text
    CONSTRAINT ordering_key_1_to_512_bytes_without_control_characters
    CHECK (octet_length(VALUE) BETWEEN 1 AND 512 AND VALUE !~ E'[\\x01-\\x1f\\x7f-\\x9f]');
CREATE DOMAIN tidings.biz_id AS text
    CONSTRAINT biz_id_1_to_512_bytes_without_control_characters
    CHECK (octet_length(VALUE) BETWEEN 1 AND 512 AND VALUE !~ E'[\\x01-\\x1f\\x7f-\\x9f]');
CREATE DOMAIN tidings.consumer AS text
    CONSTRAINT consumer_1_to_512_bytes_without_control_characters
    CHECK (octet_length(VALUE) BETWEEN 1 AND 512 AND VALUE !~ E'[\\x01-\\x1f\\x7f-\\x9f]');
CREATE DOMAIN tidings.attempts AS integer
    CONSTRAINT attempts_between_0_and_1000000
    CHECK (VALUE BETWEEN 0 AND 1000000);
-- Migration 000004's rule, with its shortcuts, unchanged (see the comments there).
CREATE DOMAIN tidings.headers AS jsonb
    CONSTRAINT headers_string_values_token_names_none_reserved
    CHECK (CASE
             WHEN VALUE = '{}'::jsonb THEN true
             WHEN jsonb_typeof(VALUE) <> 'object' THEN false
             WHEN VALUE - '{content-type,content-encoding,traceparent,tracestate,baggage}'::text[]
                      = '{}'::jsonb
                  AND length(VALUE::text) < 4096
                  AND VALUE::text !~ E'[^ -~]|\\\\[^"\\\\t]|": [^"]' THEN true
             ELSE tidings.headers_are_valid(VALUE)
           END);

ALTER TABLE tidings.outbox
    DROP CONSTRAINT topic_dotted_segments_of_a_z_0_9_dash_underscore_max_200,
    ADD CONSTRAINT topic_dotted_segments_of_a_z_0_9_dash_underscore_max_200
        CHECK ((topic::tidings.topic) IS NOT NULL) NOT VALID,
    DROP CONSTRAINT ordering_key_1_to_512_bytes_without_control_characters,
    ADD CONSTRAINT ordering_key_1_to_512_bytes_without_control_characters
        CHECK (ordering_key IS NULL OR (ordering_key::tidings.ordering_key) IS NOT NULL) NOT VALID,
    DROP CONSTRAINT biz_id_1_to_512_bytes_without_control_characters,
    ADD CONSTRAINT biz_id_1_to_512_bytes_without_control_characters
        CHECK (biz_id IS NULL OR (biz_id::tidings.biz_id) IS NOT NULL) NOT VALID,
    DROP CONSTRAINT headers_string_values_token_names_none_reserved,
    ADD CONSTRAINT headers_string_values_token_names_none_reserved
        CHECK ((headers::tidings.headers) IS NOT NULL) NOT VALID,
    DROP CONSTRAINT attempts_between_0_and_1000000,
    ADD CONSTRAINT attempts_between_0_and_1000000
        CHECK ((attempts::tidings.attempts) IS NOT NULL) NOT VALID;

-- The inbox: the consumer's own transaction pays for these on every record.
ALTER TABLE tidings.inbox
    DROP CONSTRAINT consumer_1_to_512_bytes_without_control_characters,
    ADD CONSTRAINT consumer_1_to_512_bytes_without_control_characters
        CHECK ((consumer::tidings.consumer) IS NOT NULL) NOT VALID,
    DROP CONSTRAINT biz_id_1_to_512_bytes_without_control_characters,
    ADD CONSTRAINT biz_id_1_to_512_bytes_without_control_characters
        CHECK ((biz_id::tidings.biz_id) IS NOT NULL) NOT VALID;
