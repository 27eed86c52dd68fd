//! The payments story over HTTP webhooks (`--broker http`, cargo feature `http`): the card
//! service is a web service with the inbox's webhook receiver on a local port; the relay posts
//! every message to it, signed (Standard Webhooks). The relay dies after posting, before
//! recording, so its successor posts again; the card service answers those with 200 and issues
//! nothing (the inbox knows them). Then the card service loses some answers: it commits the
//! card, and the relay never hears back (its request times out), so it posts again later;
//! absorbed too.
//!
//! No broker: the card service listens on a free port of 127.0.0.1 for the run.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, Uri};
use tidings_examples::{IssueCard, Verdict};
use tidings_inbox::runner::postgres::PgStore;
use tidings_inbox::webhook::{Received, WebhookConfig, WebhookReceiver};
use tidings_outbox::webhook::Secret;
use tidings_relay::sink::{HttpSink, HttpSinkConfig};

use super::{demo_pool, relay_crashes_then_a_new_one_resends, BoxError};

/// Once half the payments have their card, the card service loses its answer for every this
/// many effects it commits (50 of 1,000 payments): late, so that the relay's crash comes first.
const LOSE_EVERY: usize = 10;

pub(crate) async fn run(
    db_url: &str,
    db: &tokio_postgres::Client,
    payments: usize,
) -> Result<bool, BoxError> {
    // One secret shared by the relay (signs) and the card service (verifies), fresh per run.
    let secret = Secret::generate();
    let pool = demo_pool(db_url)?;
    let receiver = WebhookReceiver::new(
        PgStore::new(pool.clone(), Arc::new(IssueCard)),
        WebhookConfig {
            consumer: "card-service-demo".into(),
            secrets: vec![secret.clone()],
            ..Default::default()
        },
    )?;

    // The card service: the receiver behind a route that, for every 10th card it commits in the
    // second half, never answers (as if it died between COMMIT and the answer): the relay
    // times out.
    let committed = Arc::new(AtomicUsize::new(0));
    let lost = Arc::new(AtomicUsize::new(0));
    let app = axum::Router::new().route(
        "/cards/{topic}",
        axum::routing::post({
            let (receiver, committed, lost) = (receiver.clone(), committed.clone(), lost.clone());
            move |uri: Uri, headers: HeaderMap, body: Bytes| {
                let (receiver, committed, lost) =
                    (receiver.clone(), committed.clone(), lost.clone());
                async move {
                    let (got, answer) = receiver.receive(uri.path(), &headers, body).await;
                    let n = if got == Received::Processed {
                        committed.fetch_add(1, Ordering::SeqCst) + 1
                    } else {
                        0
                    };
                    if n > payments / 2 && n % LOSE_EVERY == 0 {
                        lost.fetch_add(1, Ordering::SeqCst);
                        std::future::pending::<()>().await;
                    }
                    answer
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    println!("card service listening on {base}/cards/{{topic}}");

    let sink = || async {
        HttpSink::connect(HttpSinkConfig {
            url: Some(format!("{base}/cards/{{topic}}")),
            secrets: vec![secret.clone()],
            // A lost answer costs the relay this long before it counts as "outcome unknown".
            timeout: Duration::from_secs(1),
            ..Default::default()
        })
        .await
    };
    let (crashed_after, delivered, _) = relay_crashes_then_a_new_one_resends(
        &pool,
        db,
        Arc::new(sink().await?),
        Arc::new(sink().await?),
        payments,
    )
    .await?;
    server.abort();
    println!(
        "relay crashed after {crashed_after} answered POSTs (more were in flight), before recording any delivery"
    );
    println!(
        "relay restarted: delivered {delivered}; the card service lost {} answers after committing (the relay timed out and posted again)",
        lost.load(Ordering::SeqCst)
    );

    let stats = receiver.stats();
    let (processed, duplicates) = (
        stats.processed.load(Ordering::SeqCst),
        stats.duplicates.load(Ordering::SeqCst),
    );
    let v = Verdict::read(db).await?;
    // The database is the judge. The receiver's counter is checked only as a bound: when the
    // relay gives up on an answer (its 1 s timeout on a busy machine), the server drops that
    // request; its work finishes in a task of its own and counts a moment after its commit,
    // which may be after this line reads the counter. It can never count more effects than
    // payments.
    let ok = v.exactly_once()
        && v.payments as usize == payments
        && processed as usize <= payments
        && v.orphan_cards == 0;
    println!("payments charged:                        {}", v.payments);
    println!("requests answered: {processed} effects committed, {duplicates} duplicates (200, nothing run)");
    println!("membership cards issued:                 {}", v.cards);
    println!(
        "payments without a card / with several:  {} / {}",
        v.without_card, v.with_several
    );
    println!(
        "duplicates absorbed by the inbox (relay re-sends and posts whose answer was lost): {}",
        v.absorbed
    );
    println!(
        "cards for a payment never committed (the rolled-back one): {}",
        v.orphan_cards
    );
    println!(
        "{}",
        if ok {
            "OK: every payment has exactly one membership card"
        } else {
            "FAILED: not exactly one card per payment"
        }
    );
    Ok(ok)
}
