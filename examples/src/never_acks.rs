//! A consumer that dies before acknowledging, for the stories on brokers whose consumer runs on
//! the runner core: it handles messages (effect and inbox record committed) but never acks
//! (Kafka: never commits an offset; RabbitMQ: never basic_acks), as a crash between the two would.

use std::time::Duration;

use futures::future::BoxFuture;
use futures::StreamExt;
use tidings_inbox::runner::{Adapter, AdapterError, Decoded, Deliveries, Delivery};

/// `A`, whose deliveries are never acknowledged.
pub(crate) struct NeverAcks<A>(pub A);

/// A delivery whose ack does nothing.
pub(crate) struct Unacked<D>(D);

impl<D: Delivery> Delivery for Unacked<D> {
    fn decode(&self) -> Decoded {
        self.0.decode()
    }
    fn ack(&self) -> BoxFuture<'_, Result<(), AdapterError>> {
        Box::pin(async { Ok(()) })
    }
    fn hold(&self) -> BoxFuture<'_, ()> {
        self.0.hold()
    }
    fn retry_later(&self, delay: Duration) -> BoxFuture<'_, ()> {
        self.0.retry_later(delay)
    }
}

impl<A: Adapter> Adapter for NeverAcks<A> {
    type Delivery = Unacked<A::Delivery>;
    fn open(&self) -> BoxFuture<'_, Result<Deliveries<'_, Self::Delivery>, AdapterError>> {
        Box::pin(async move {
            let s = self.0.open().await?;
            Ok(s.map(|d| d.map(Unacked)).boxed())
        })
    }
    fn close(&self) -> BoxFuture<'_, ()> {
        self.0.close()
    }
    fn hold_interval(&self) -> Option<Duration> {
        self.0.hold_interval()
    }
}
