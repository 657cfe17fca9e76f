//! The runtime the `tern` binary runs on: tokio's multi-thread scheduler,
//! one worker per core, with its LIFO slot turned off.
//!
//! tokio runs the task woken last by a worker before anything else in that
//! worker's queue (the LIFO slot): good for a task that hands a message to
//! another and finishes. For a broker it reverses the order of clients whose
//! bytes arrive together. When the reactor finds client B's SUBSCRIBE and,
//! a few microseconds later, client A's PUBLISH ready in one poll, it wakes
//! B, then A; A takes the slot, runs first, and its message is routed before
//! B's subscription exists. MQTT orders nothing across connections, but a
//! client that subscribes and then asks another client to publish (request
//! and response, the Paho interoperability suites) relies on the order in
//! which the broker received the two. Measured with a raw-socket probe (B
//! subscribes, A publishes at once, 200 times): with the slot, 9 to 10 of
//! the 200 messages missed B; without it, none of 400. Throughput and
//! latency did not change (docs/performance.md, "The order of clients that
//! arrive together").
//!
//! `Builder::disable_lifo_slot` is behind tokio's `tokio_unstable` cfg,
//! which `.cargo/config.toml` sets for this workspace.

/// A runtime builder with the broker's settings; the caller adds what it
/// needs (the binary: nothing; a test: a worker count) and builds it.
pub fn builder() -> tokio::runtime::Builder {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    #[cfg(tokio_unstable)]
    builder.disable_lifo_slot();
    builder
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    /// Two tasks woken one after the other by a worker run in that order.
    /// With tokio's LIFO slot the second would run first.
    #[test]
    fn tasks_woken_together_run_in_the_order_they_were_woken() {
        let runtime = super::builder().worker_threads(1).build().unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        let ran = Arc::clone(&order);
        runtime.block_on(async move {
            // On the worker: `block_on`'s own future does not run there.
            tokio::spawn(async move {
                let (first_tx, first_rx) = tokio::sync::oneshot::channel::<()>();
                let (second_tx, second_rx) = tokio::sync::oneshot::channel::<()>();
                let waiting = [(1, first_rx), (2, second_rx)].map(|(n, rx)| {
                    let ran = Arc::clone(&ran);
                    tokio::spawn(async move {
                        let _ = rx.await;
                        ran.lock().unwrap().push(n);
                    })
                });
                // Both are parked on their channel once the worker was idle.
                tokio::time::sleep(Duration::from_millis(20)).await;
                let _ = first_tx.send(());
                let _ = second_tx.send(());
                waiting
            })
            .await
            .unwrap();
        });
        runtime.block_on(async {
            tokio::time::timeout(Duration::from_secs(5), async {
                while order.lock().unwrap().len() < 2 {
                    tokio::task::yield_now().await;
                }
            })
            .await
            .unwrap();
        });
        assert_eq!(*order.lock().unwrap(), [1, 2]);
    }
}
