//! Handing the runtime's worker to every other ready task before a connection's less urgent work
//! (its bookkeeping, its end): [`behind_ready`]. Why `tokio::task::yield_now` alone does not:
//! `docs/benchmarks.md` (tunnel, the second yield).

/// Let every other task that is ready, including those the worker's next poll for I/O finds
/// ready, run before the caller goes on.
pub async fn behind_ready() {
    // Woken after the next I/O poll, ahead of what that poll found ready (the LIFO slot)...
    tokio::task::yield_now().await;
    // ...and now behind it: those tasks are in the run queue, this one waits for the next poll.
    tokio::task::yield_now().await;
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tokio::{io::AsyncReadExt as _, net::UnixStream};

    use crate::tunnel::chunk::poll_once;

    /// Who ran in which order, when the caller yields in `yield_in` while a socket another task
    /// waits on has become readable (known to the kernel, not yet to the runtime).
    async fn order_with(yield_in: impl AsyncFnOnce()) -> Vec<&'static str> {
        let order = Arc::new(Mutex::new(Vec::new()));
        let (mut reader, writer) = UnixStream::pair().expect("socket pair");
        let (parked_tx, parked_rx) = tokio::sync::oneshot::channel();
        let waiter = tokio::spawn({
            let order = order.clone();
            async move {
                let mut byte = [0u8; 1];
                let read = reader.read(&mut byte);
                tokio::pin!(read);
                // Polled once (nothing to read yet, so registered with the reactor), then waits.
                assert!(poll_once(read.as_mut()).await.is_pending());
                parked_tx.send(()).expect("test alive");
                read.await.expect("read");
                order.lock().expect("lock").push("reader");
            }
        });
        parked_rx.await.expect("reader parked");
        writer.try_write(b"x").expect("write");
        yield_in().await;
        order.lock().expect("lock").push("yielder");
        waiter.await.expect("reader task");
        order.lock().expect("lock").clone()
    }

    /// Run `f` as a task on a one-worker multi-threaded runtime, as the agent's data path runs.
    fn on_worker<T: Send + 'static>(f: impl Future<Output = T> + Send + 'static) -> T {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let task = runtime.spawn(f);
        runtime.block_on(task).expect("task on the worker")
    }

    #[test]
    fn behind_ready_lets_a_task_woken_by_io_go_first() {
        let order = on_worker(order_with(async || super::behind_ready().await));
        assert_eq!(order, ["reader", "yielder"]);
    }

    /// Why [`super::behind_ready`] exists: one `yield_now` comes back ahead of the I/O.
    #[test]
    fn a_single_yield_comes_back_first() {
        let order = on_worker(order_with(async || tokio::task::yield_now().await));
        assert_eq!(order, ["yielder", "reader"]);
    }
}
