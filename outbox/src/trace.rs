//! W3C trace context across the outbox (feature `opentelemetry`): `enqueue` stores the current
//! span's context as the message's `traceparent` (and `tracestate`) header unless the message
//! sets its own, and the relay and the consumers make their spans children of it, so one trace
//! runs from the producer's span through the relay's publish to the consumer's effect.

use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The current tracing span's OpenTelemetry context as `(traceparent, tracestate)`, when it
/// has a valid one (a tracing-opentelemetry layer is installed and a span is entered).
pub fn current() -> Option<(String, Option<String>)> {
    let cx = tracing::Span::current().context();
    let span = cx.span();
    let sc = span.span_context();
    if !sc.is_valid() {
        return None;
    }
    let parent = format!(
        "00-{}-{}-{:02x}",
        sc.trace_id(),
        sc.span_id(),
        sc.trace_flags().to_u8()
    );
    let state = sc.trace_state().header();
    Some((parent, (!state.is_empty()).then_some(state)))
}

/// Makes `span` a child of the remote span named by a W3C `traceparent`
/// (`00-<trace id>-<parent span id>-<flags>`) with its `tracestate`; ignores a malformed one.
pub fn set_parent(span: &tracing::Span, traceparent: &str, tracestate: Option<&str>) {
    let parts: Vec<&str> = traceparent.trim().split('-').collect();
    let [_, trace, parent, flags, ..] = parts[..] else {
        return;
    };
    let (Ok(trace), Ok(parent), Ok(flags)) = (
        TraceId::from_hex(trace),
        SpanId::from_hex(parent),
        u8::from_str_radix(flags, 16),
    ) else {
        return;
    };
    if trace == TraceId::INVALID || parent == SpanId::INVALID {
        return;
    }
    let state = tracestate
        .and_then(|s| s.parse::<TraceState>().ok())
        .unwrap_or_default();
    let remote = SpanContext::new(trace, parent, TraceFlags::new(flags), true, state);
    let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(remote));
}
