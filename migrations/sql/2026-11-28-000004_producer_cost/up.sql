-- Producer cost (issue 15): the same rules, paid for only where they have work to do. Measured
-- with the bench's row anatomy (`cargo run --release -p tidings-bench -- --only anatomy`) and
-- producer floors; figures in the README, "Performance".

-- The headers rule runs a plpgsql function (its loop over jsonb_each is a query of its own:
-- 21 us per row here) on every row, even on the default '{}'. Two shortcuts accept, before the
-- function runs, header sets that obviously pass it (together about 1.5 us per row):
--   * no headers at all ('{}': the Rust API's Message::new, a direct INSERT's default);
--   * only the names content-type, content-encoding, traceparent, tracestate and baggage, in
--     lower case (what Message::json, tidings.enqueue and the opentelemetry feature add), with
--     string values of printable ASCII (TAB allowed), the whole set under 4,096 characters.
--     Judged on jsonb's canonical text, where control characters are always escaped (\n, \u0001,
--     ...) and a non-string value follows `": ` without a quote: the regex finds any character
--     outside printable ASCII, any escape other than \" \\ \t, and any unquoted value. It may
--     also find a harmless sequence inside a value (a literal backslash-n, say): that only sends
--     the set to the function.
-- Anything else (other names, upper case, non-ASCII, non-string values) is judged by
-- tidings.headers_are_valid as before: a shortcut never accepts what the function refuses
-- (tests/rules.rs checks the constraint against the Rust rules and the function). CASE, not
-- AND/OR, so that the order is guaranteed: the object test comes before the `-` operator
-- (which raises on a scalar). The regex is an E'' literal (the same whatever
-- standard_conforming_strings says), compiled once per session and cached.
-- A regex matching the whole canonical text instead (names as alternatives, anchored) was
-- measured at 7.5 us per row: PostgreSQL's regex engine is slow on anchored alternations.
ALTER TABLE tidings.outbox DROP CONSTRAINT headers_string_values_token_names_none_reserved;
ALTER TABLE tidings.outbox ADD CONSTRAINT headers_string_values_token_names_none_reserved
    CHECK (CASE
             WHEN headers = '{}'::jsonb THEN true
             WHEN jsonb_typeof(headers) <> 'object' THEN false
             WHEN headers - '{content-type,content-encoding,traceparent,tracestate,baggage}'::text[]
                      = '{}'::jsonb
                  AND length(headers::text) < 4096
                  AND headers::text !~ E'[^ -~]|\\\\[^"\\\\t]|": [^"]' THEN true
             ELSE tidings.headers_are_valid(headers)
           END) NOT VALID;

-- The NOTIFY trigger fired (a plpgsql call queued and run after every INSERT statement) even
-- with NOTIFY off, the default, only to find the setting off: about 10% of a one-INSERT producer
-- transaction at 8 clients. A WHEN condition is evaluated by the executor before anything is
-- queued, so with NOTIFY off the trigger costs one setting lookup. Same setting, same moment
-- (the end of the INSERT statement), same one notification per transaction.
DROP TRIGGER outbox_notify ON tidings.outbox;
CREATE TRIGGER outbox_notify AFTER INSERT ON tidings.outbox
    FOR EACH STATEMENT
    WHEN (current_setting('tidings.notify', true) = 'on')
    EXECUTE FUNCTION tidings.notify_outbox();
