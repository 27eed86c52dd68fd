//! The story behind Tidings, as code both the demo and the chaos test run: a payment service
//! that charges payments and enqueues `payment.succeeded` in the same transaction, and a card
//! service that issues exactly one membership card per payment, however often the message is
//! delivered.

use futures::future::BoxFuture;
use tidings_inbox::nats::{Delivered, Handler, HandlerError};
use tidings_outbox::{Message, MessageId, Outbox};
use tokio_postgres::{GenericClient, Transaction};

/// The business tables of both services (they share one database in the demo).
/// `cards` has deliberately no unique constraint on `payment_id`: a second card would be
/// stored, not refused, so counting cards per payment really tests the inbox.
/// `absorbed` records each redelivery the inbox recognised (durable across crashes).
pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS payments (
    id       text PRIMARY KEY,
    customer text NOT NULL,
    n        bigint NOT NULL,   -- per-customer sequence, to check per-key order
    cents    bigint NOT NULL
);
CREATE TABLE IF NOT EXISTS cards (
    id         bigserial PRIMARY KEY,
    payment_id text NOT NULL,
    customer   text NOT NULL,
    n          bigint NOT NULL,
    issued_at  timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS absorbed (message_id uuid NOT NULL, at timestamptz NOT NULL DEFAULT now());
";

/// The event the payment service publishes.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct PaymentSucceeded {
    /// The payment id (also the message's biz-id).
    pub payment_id: String,
    /// The customer (also the ordering key).
    pub customer: String,
    /// The customer's payment number, 0, 1, 2, ...
    pub n: i64,
    /// Amount.
    pub cents: i64,
}

/// Topic of the event.
pub const TOPIC: &str = "payment.succeeded";

/// The payment service: charge (business row) and enqueue the event, in ONE transaction.
pub async fn charge(
    tx: &Transaction<'_>,
    outbox: &Outbox,
    event: &PaymentSucceeded,
) -> Result<MessageId, Box<dyn std::error::Error + Send + Sync>> {
    tx.execute(
        "INSERT INTO payments (id, customer, n, cents) VALUES ($1, $2, $3, $4)",
        &[&event.payment_id, &event.customer, &event.n, &event.cents],
    )
    .await?;
    let msg = Message::json(TOPIC, event)?
        .biz_id(event.payment_id.as_str())
        .key(event.customer.as_str());
    Ok(outbox.enqueue_pg(tx, &msg).await?)
}

/// The card service's handler: issue one membership card per payment.
pub struct IssueCard;

impl Handler for IssueCard {
    fn handle<'a>(
        &'a self,
        tx: &'a Transaction<'a>,
        msg: &'a Delivered,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            let e: PaymentSucceeded = serde_json::from_slice(&msg.payload)?;
            tx.execute(
                "INSERT INTO cards (payment_id, customer, n) VALUES ($1, $2, $3)",
                &[&e.payment_id, &e.customer, &e.n],
            )
            .await?;
            Ok(())
        })
    }

    fn duplicate<'a>(
        &'a self,
        tx: &'a Transaction<'a>,
        msg: &'a Delivered,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            tx.execute(
                "INSERT INTO absorbed (message_id) VALUES ($1)",
                &[&msg.id.as_uuid()],
            )
            .await?;
            Ok(())
        })
    }
}

/// What the demo and the chaos test check at the end.
#[derive(Debug, PartialEq, Eq)]
pub struct Verdict {
    /// Committed payments.
    pub payments: i64,
    /// Cards issued.
    pub cards: i64,
    /// Payments with no card.
    pub without_card: i64,
    /// Payments with more than one card.
    pub with_several: i64,
    /// Cards whose payment does not exist.
    pub orphan_cards: i64,
    /// Redeliveries the inbox absorbed.
    pub absorbed: i64,
}

impl Verdict {
    /// Reads the verdict from the database.
    pub async fn read(c: &impl GenericClient) -> Result<Verdict, tokio_postgres::Error> {
        let r = c
            .query_one(
                "SELECT (SELECT count(*) FROM payments),
                        (SELECT count(*) FROM cards),
                        (SELECT count(*) FROM payments p WHERE NOT EXISTS (SELECT 1 FROM cards c WHERE c.payment_id = p.id)),
                        (SELECT count(*) FROM (SELECT 1 FROM cards GROUP BY payment_id HAVING count(*) > 1) s),
                        (SELECT count(*) FROM cards c WHERE NOT EXISTS (SELECT 1 FROM payments p WHERE p.id = c.payment_id)),
                        (SELECT count(*) FROM absorbed)",
                &[],
            )
            .await?;
        Ok(Verdict {
            payments: r.get(0),
            cards: r.get(1),
            without_card: r.get(2),
            with_several: r.get(3),
            orphan_cards: r.get(4),
            absorbed: r.get(5),
        })
    }

    /// Every payment has exactly one card and every card a payment.
    pub fn exactly_once(&self) -> bool {
        self.payments == self.cards
            && self.without_card == 0
            && self.with_several == 0
            && self.orphan_cards == 0
    }
}
