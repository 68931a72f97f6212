//! A few threads for CPU-bound work (image decoding and encoding), at the
//! lowest CPU priority.
//!
//! Rules: the async runtime's threads never run a codec (a 2048² encode takes
//! about a second of CPU); at most `threads` jobs run at once, the rest wait
//! in order; the threads run at nice 19, so on a busy machine the scheduler
//! gives the deductions' threads (and PostgreSQL) the CPU first and image
//! work takes what is left; a job that panics is reported as an error to its
//! caller, never lost, and the thread goes on.
//!
//! Nice values only order threads within one scheduling group: with Linux's
//! session autogroups (or one cgroup per service), the API's group as a whole
//! still competes with PostgreSQL's at equal weight, so image work on a shared
//! machine slows the database down even at nice 19. `IMAGE_CPU_CGROUP` names a
//! cgroup (v1 `cpu` directory, or v2 threaded cgroup) that the threads join,
//! e.g. one with `cpu.idle = 1`: they then run only on CPU nobody else wants.

use std::{
    panic::{AssertUnwindSafe, catch_unwind},
    sync::{Arc, Mutex, mpsc},
};

type Job = Box<dyn FnOnce() + Send>;

/// A handle to the pool; cheap to clone.
#[derive(Clone)]
pub struct CpuPool {
    jobs: Arc<Mutex<mpsc::Sender<Job>>>,
}

/// Why a job gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// The job panicked (a codec bug); the detail is in the log.
    #[error("the image job panicked")]
    Panicked,
    /// The pool's threads are gone.
    #[error("the image pool has stopped")]
    Stopped,
}

impl CpuPool {
    /// Starts `threads` threads (at least one) named `<name>-<n>`; each
    /// joins `cgroup` when given.
    pub fn start(
        name: &str,
        threads: usize,
        cgroup: Option<&std::path::Path>,
    ) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for n in 0..threads.max(1) {
            let rx = rx.clone();
            let cgroup = cgroup.map(std::path::Path::to_path_buf);
            std::thread::Builder::new()
                .name(format!("{name}-{n}"))
                .spawn(move || {
                    // Best effort: without the permission to lower its
                    // priority the thread still works, at normal priority.
                    if let Err(e) = thread_priority::set_current_thread_priority(
                        thread_priority::ThreadPriority::Min,
                    ) {
                        tracing::warn!(error = ?e, "could not lower the image threads' priority");
                    }
                    if let Some(cgroup) = &cgroup {
                        match join_cgroup(cgroup) {
                            Ok(()) => tracing::debug!(cgroup = %cgroup.display(), "image thread joined its cgroup"),
                            Err(e) => tracing::warn!(cgroup = %cgroup.display(), error = %e, "image thread could not join IMAGE_CPU_CGROUP"),
                        }
                    }
                    loop {
                        let job = match rx.lock() {
                            Ok(rx) => rx.recv(),
                            Err(_) => return,
                        };
                        match job {
                            Ok(job) => job(),
                            Err(_) => return,
                        }
                    }
                })?;
        }
        Ok(Self {
            jobs: Arc::new(Mutex::new(tx)),
        })
    }

    /// Runs `f` on the pool and waits for its answer without blocking the
    /// runtime.
    pub async fn run<T, F>(&self, f: F) -> Result<T, PoolError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let result = catch_unwind(AssertUnwindSafe(f)).map_err(|_| {
                metrics::counter!("penora_image_job_panics_total").increment(1);
                tracing::error!("an image job panicked");
                PoolError::Panicked
            });
            let _ = tx.send(result);
        });
        self.jobs
            .lock()
            .map_err(|_| PoolError::Stopped)?
            .send(job)
            .map_err(|_| PoolError::Stopped)?;
        rx.await.map_err(|_| PoolError::Stopped)?
    }
}

/// Moves the calling thread into `cgroup`: its `tasks` file (cgroup v1) or
/// `cgroup.threads` (v2).
fn join_cgroup(cgroup: &std::path::Path) -> std::io::Result<()> {
    let me = std::fs::read_link("/proc/thread-self")?;
    let tid = me
        .file_name()
        .and_then(|t| t.to_str())
        .ok_or_else(|| std::io::Error::other("no thread id in /proc/thread-self"))?
        .to_owned();
    let v1 = cgroup.join("tasks");
    let file = if v1.exists() {
        v1
    } else {
        cgroup.join("cgroup.threads")
    };
    std::fs::write(file, tid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn jobs_answer_and_a_panic_is_an_error_not_a_lost_thread() {
        let pool = CpuPool::start("test", 1, None).expect("starts");
        assert_eq!(pool.run(|| 2 + 2).await.ok(), Some(4));
        let panicked = pool.run(|| -> u8 { panic!("codec bug") }).await;
        assert!(matches!(panicked, Err(PoolError::Panicked)));
        assert_eq!(pool.run(|| 7).await.ok(), Some(7), "the thread goes on");
    }

    #[tokio::test]
    async fn the_threads_run_at_the_lowest_priority() {
        let pool = CpuPool::start("nice", 1, None).expect("starts");
        // Field 19 of /proc/thread-self/stat is the nice value.
        let nice = pool
            .run(|| {
                let stat = std::fs::read_to_string("/proc/thread-self/stat").expect("stat");
                let after_name = stat.rsplit(')').next().unwrap_or_default().to_owned();
                after_name.split_whitespace().nth(16).map(str::to_owned)
            })
            .await
            .expect("ran");
        assert_eq!(nice.as_deref(), Some("19"));
    }
}
