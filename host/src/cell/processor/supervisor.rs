//! The processor's supervisor: the cell's thread that keeps one thread running per (handler,
//! partition) task. It starts threads for new tasks, stops and joins those of removed or re-created
//! handlers (then has the writer delete their storage), hands dead-letter replays to the task they are
//! for, and sets each partition's lag flag (the lag watermark admission reads) from its handlers' lag.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use tokio::sync::oneshot;

use super::{IDLE_PARK, ProcessorContext, Runner, Task};
use crate::catalog::HandlerDef;
use crate::cell::{CellError, Command, ReplayRequest};
use crate::log::ConsumerLog;

/// The cell's processor: a supervisor thread that runs one thread per (handler, partition) task, so
/// a task that is slow, loops until its deadline or halves a poisoned batch never holds up another
/// partition or handler. It starts threads for new tasks, stops those of removed handlers (and, once
/// their threads have finished, deletes their storage), and hands dead-letter replays to the task they
/// are for.
pub(in crate::cell) struct Supervisor {
    ctx: ProcessorContext,
    tasks: BTreeMap<(Arc<str>, u32), TaskHandle>,
    /// Tasks told to quit whose threads have not finished yet: a step in progress ends first (a
    /// looping handler's can last many deadlines), and nothing else here waits for it.
    retiring: Vec<((Arc<str>, u32), TaskHandle)>,
}

/// The supervisor's handle on one task thread.
struct TaskHandle {
    incarnation: u64,
    /// Tells the task's thread to finish.
    quit: Arc<AtomicBool>,
    /// Dead-letter replays for this task.
    replays: Arc<Mutex<Vec<ReplayRequest>>>,
    thread: JoinHandle<Option<ConsumerLog>>,
}

impl Supervisor {
    pub(in crate::cell) fn new(ctx: ProcessorContext) -> Self {
        Self {
            ctx,
            tasks: BTreeMap::new(),
            retiring: Vec::new(),
        }
    }

    pub(in crate::cell) fn run(mut self) {
        let _span =
            tracing::info_span!("procd.cell.processor", cell = self.ctx.shared.index).entered();
        while !self.ctx.stop.load(Ordering::Acquire) {
            let defs = self.ctx.catalog.handlers();
            self.sync_tasks(&defs);
            self.route_replays();
            self.update_watermarks(&defs);
            std::thread::park_timeout(IDLE_PARK);
        }
        for (_, task) in std::mem::take(&mut self.tasks) {
            task.quit.store(true, Ordering::Release);
            task.thread.thread().unpark();
            let _ = task.thread.join();
        }
        // Their storage is deleted when the cell next opens (or a later incarnation of the handler starts).
        for (_, task) in std::mem::take(&mut self.retiring) {
            let _ = task.thread.join();
        }
    }

    /// Sets or clears each of the cell's partitions' lag flag from its handlers' lag (the live end
    /// offset minus the committed one; paused and tripped handlers do not count: they lag on purpose,
    /// and producers should not pay for it).
    fn update_watermarks(&self, defs: &HashMap<String, Arc<HandlerDef>>) {
        let Some((high, low)) = self.ctx.options.lag_watermarks else {
            return;
        };
        let shared = &self.ctx.shared;
        let mut lag: HashMap<(&str, u32), u64> = HashMap::new();
        if let Ok(statuses) = shared.statuses.lock() {
            for ((handler, partition), status) in statuses.iter() {
                if matches!(status.status, "paused" | "tripped") {
                    continue;
                }
                let Some(def) = defs.get(handler) else {
                    continue;
                };
                let Some(view) = shared.view(&def.input, *partition) else {
                    continue;
                };
                let behind = view.end_offset().saturating_sub(status.committed_offset);
                let worst = lag.entry((def.input.as_str(), *partition)).or_insert(0);
                *worst = (*worst).max(behind);
            }
        }
        for (name, topic) in shared.topics.load().iter() {
            for (p, view) in &topic.by_partition {
                let behind = lag.get(&(&**name, *p)).copied().unwrap_or(0);
                let refusing = view.lagging().is_some();
                let next = crate::backpressure::lag_watermark(refusing, behind, high, low);
                view.set_lagging(next.then_some(behind.max(1)));
            }
        }
    }

    /// Hands each waiting dead-letter replay to its task's thread, or answers it if there is none.
    fn route_replays(&mut self) {
        let requests = match self.ctx.shared.replays.lock() {
            Ok(mut replays) => std::mem::take(&mut *replays),
            Err(_) => return,
        };
        for request in requests {
            let key = (
                Arc::<str>::from(request.handler.as_str()),
                request.partition,
            );
            match self.tasks.get(&key) {
                Some(task) => {
                    if let Ok(mut queue) = task.replays.lock() {
                        queue.push(request);
                    }
                    task.thread.thread().unpark();
                }
                None => {
                    let _ = request.reply.send(Err(CellError::Unavailable {
                        cell: self.ctx.shared.index,
                        reason: format!(
                            "handler {:?} is not running on partition {}",
                            request.handler, request.partition
                        ),
                    }));
                }
            }
        }
    }

    /// Opens the storage of `def` on `partition` for a new task. Storage a former incarnation of the
    /// handler left (it was removed and deployed again before its storage was deleted, or the server
    /// stopped in between) is deleted first: the new one starts from its own start position, with
    /// empty state.
    fn open_consumer(&self, def: &HandlerDef, partition: u32) -> Result<ConsumerLog, String> {
        let store = &self.ctx.shared.store;
        let consumer = store
            .consumer(&def.name, partition)
            .map_err(|e| e.to_string())?;
        let stored = consumer.stored_incarnation().map_err(|e| e.to_string())?;
        if stored.is_some_and(|stored| stored != def.incarnation) {
            tracing::info!(handler = %def.name, partition, "deleting the storage of the handler's former incarnation");
            self.drop_consumer(consumer)?;
            return store
                .consumer(&def.name, partition)
                .map(|c| c.for_incarnation(def.incarnation))
                .map_err(|e| e.to_string());
        }
        Ok(consumer.for_incarnation(def.incarnation))
    }

    /// Deletes a consumer's storage through the cell writer (which owns every write) and waits for it.
    fn drop_consumer(&self, consumer: ConsumerLog) -> Result<(), String> {
        let (reply, rx) = oneshot::channel();
        self.ctx
            .tx
            .send(Command::DropConsumer { consumer, reply })
            .map_err(|_| "the cell writer is gone".to_string())?;
        match rx.blocking_recv() {
            Ok(result) => result.map_err(|e| e.to_string()),
            Err(_) => Err("the cell writer is gone".to_string()),
        }
    }

    /// Starts threads for new tasks; stops those of removed handlers and deletes their storage.
    fn sync_tasks(&mut self, defs: &HashMap<String, Arc<HandlerDef>>) {
        let gone: Vec<(Arc<str>, u32)> = self
            .tasks
            .iter()
            .filter(|((name, _), t)| {
                defs.get(&**name)
                    .is_none_or(|d| d.incarnation != t.incarnation)
            })
            .map(|(k, _)| k.clone())
            .collect();
        let changed = !gone.is_empty();
        for key in gone {
            let Some(task) = self.tasks.remove(&key) else {
                continue;
            };
            task.quit.store(true, Ordering::Release);
            task.thread.thread().unpark();
            if let Ok(mut statuses) = self.ctx.shared.statuses.lock() {
                statuses.remove(&(key.0.to_string(), key.1));
            }
            self.retiring.push((key, task));
        }
        let (finished, running) = std::mem::take(&mut self.retiring)
            .into_iter()
            .partition(|(_, task)| task.thread.is_finished());
        self.retiring = running;
        for (key, task) in finished {
            if let Some(consumer) = task.thread.join().ok().flatten()
                && let Err(e) = self.drop_consumer(consumer)
            {
                // Not lost: the cell's next opening, or a later incarnation of the handler, deletes it.
                tracing::warn!(handler = %key.0, partition = key.1, error = %e, "cannot delete a removed handler's storage");
            }
        }
        let mut started = false;
        for def in defs.values() {
            let name: Arc<str> = Arc::from(def.name.as_str());
            for partition in self.ctx.shared.shape.partitions_of(self.ctx.shared.index) {
                let key = (name.clone(), partition);
                // A handler deployed again waits for its former incarnation's task to finish here.
                if self.tasks.contains_key(&key) || self.retiring.iter().any(|(k, _)| *k == key) {
                    continue;
                }
                let consumer = match self.open_consumer(def, partition) {
                    Ok(consumer) => consumer,
                    Err(e) => {
                        self.ctx
                            .shared
                            .health
                            .fail(self.ctx.shared.index, e.to_string());
                        return;
                    }
                };
                let task = Task::new(
                    name.clone(),
                    def.incarnation,
                    partition,
                    consumer,
                    &self.ctx,
                );
                let quit = Arc::new(AtomicBool::new(false));
                let replays = Arc::new(Mutex::new(Vec::new()));
                let runner =
                    Runner::new(self.ctx.clone(), quit.clone(), replays.clone(), partition);
                let thread = std::thread::Builder::new()
                    .name(format!("procd-cell-{}-p{partition}", self.ctx.shared.index))
                    .spawn(move || runner.run(task));
                match thread {
                    Ok(thread) => {
                        self.tasks.insert(
                            (name.clone(), partition),
                            TaskHandle {
                                incarnation: def.incarnation,
                                quit,
                                replays,
                                thread,
                            },
                        );
                        started = true;
                    }
                    Err(e) => {
                        self.ctx.shared.health.fail(
                            self.ctx.shared.index,
                            format!("cannot start a processor thread: {e}"),
                        );
                        return;
                    }
                }
            }
        }
        if started || changed {
            let threads: Vec<std::thread::Thread> = self
                .tasks
                .values()
                .map(|t| t.thread.thread().clone())
                .collect();
            self.ctx.shared.runners.store(Arc::new(threads));
        }
    }
}
