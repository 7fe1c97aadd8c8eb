//! The cell writer: the one thread that writes to a cell's Database.
//!
//! It takes append requests and handlers' processing commits from the cell's bounded queue and
//! group-commits them: it keeps collecting requests that are already waiting until the group holds
//! `group_commit_max_events` appended events (a processing commit counts once) or the queue is empty,
//! writes them in ONE atomic fjall batch, fsyncs once (`SyncData`), and only then publishes the new
//! durable end offsets and answers the requests. While it fsyncs, new requests queue up and form the
//! next group, so the fsync rate adapts to load without a timer.
//!
//! It is the single owner of each partition's next offset, last timestamp and dedup window, so none of
//! those need a lock. A storage error fails the whole cell: fjall poisons the Database, in-memory offsets
//! may no longer match the disk, and the only safe answer is to stop acknowledging until a restart
//! recovers from the journal.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use bytes::Bytes;
use tokio::sync::{oneshot, watch};

use super::{
    AppendEvents, AppendReply, Appended, CellError, CellOptions, Command, DedupIndex,
    PartitionView, ProcessCommit, Shared, TopicPartitions, now_ms,
};
use crate::catalog::Topic;
use crate::log::layout::Shape;
use crate::log::{Batch, DedupEntry, Store, StoreError};

struct PartitionState {
    view: Arc<PartitionView>,
    next_offset: u64,
    last_timestamp_ms: u64,
    dedup: DedupIndex,
    touched: bool,
    /// Events and bytes ingest appended in the group being committed, published after the fsync.
    ingested: (u64, u64),
}

/// The writer's state of one topic's partitions owned by this cell, indexed by partition number: looked
/// up for every event appended, where hashing the number was ~5 % of the writer's time.
#[derive(Default)]
struct Partitions(Vec<Option<PartitionState>>);

impl Partitions {
    fn insert(&mut self, partition: u32, state: PartitionState) {
        let i = partition as usize;
        if self.0.len() <= i {
            self.0.resize_with(i + 1, || None);
        }
        self.0[i] = Some(state);
    }

    fn get_mut(&mut self, partition: u32) -> Option<&mut PartitionState> {
        self.0.get_mut(partition as usize)?.as_mut()
    }

    fn contains(&self, partition: u32) -> bool {
        matches!(self.0.get(partition as usize), Some(Some(_)))
    }

    fn values_mut(&mut self) -> impl Iterator<Item = &mut PartitionState> {
        self.0.iter_mut().flatten()
    }

    fn into_values(self) -> impl Iterator<Item = PartitionState> {
        self.0.into_iter().flatten()
    }
}

pub(super) struct Writer {
    index: u32,
    shape: Shape,
    store: Store,
    group_max_events: usize,
    dedup_window_ms: u64,
    dedup_max_ids: usize,
    /// Dead letters kept per handler and partition; the oldest go first.
    dlq_max_entries: u64,
    topics: HashMap<Arc<str>, Partitions>,
    /// The queue's standing delay, published for admission.
    delay: super::queue_delay::QueueDelay,
}

struct PendingAppend {
    topic: Arc<str>,
    events: AppendEvents,
    reply: oneshot::Sender<AppendReply>,
}

/// A request in a group commit.
enum Pending {
    Append(PendingAppend),
    Process(Box<ProcessCommit>),
}

impl Pending {
    /// How much a request counts toward the group's event budget: an append its events, a processing
    /// commit once, whatever its outputs. Handlers' commits are bounded by the tasks (a task sends its
    /// next commit only once the last is answered), and sharing the appends' fsync is what group commit
    /// is for; counted by their outputs, they split the appends waiting with them over more fsyncs
    /// (`procd bench e2e`: README, End to end).
    fn weight(&self) -> usize {
        match self {
            Pending::Append(a) => a.events.len(),
            Pending::Process(_) => 1,
        }
    }

    /// Records the request appends (events, or outputs), for the group-size metric.
    fn records(&self) -> usize {
        match self {
            Pending::Append(a) => a.events.len(),
            Pending::Process(p) => p.outputs.iter().map(|(_, r)| r.len()).sum(),
        }
    }

    fn refuse(self, err: CellError) {
        match self {
            Pending::Append(a) => {
                let _ = a.reply.send(Err(err));
            }
            Pending::Process(p) => {
                let _ = p.reply.send(Err(err));
            }
        }
    }
}

/// The reply owed to a request once its group is committed (or failed).
enum Answer {
    Append(oneshot::Sender<AppendReply>, AppendReply),
    Process(
        oneshot::Sender<Result<(), CellError>>,
        Result<(), CellError>,
    ),
}

impl Answer {
    fn send(self) {
        match self {
            Answer::Append(reply, answer) => {
                let _ = reply.send(answer);
            }
            Answer::Process(reply, answer) => {
                let _ = reply.send(answer);
            }
        }
    }

    fn fail(self, err: CellError) {
        match self {
            Answer::Append(reply, _) => {
                let _ = reply.send(Err(err));
            }
            Answer::Process(reply, _) => {
                let _ = reply.send(Err(err));
            }
        }
    }
}

impl Writer {
    pub(super) fn new(index: u32, shape: Shape, store: Store, options: &CellOptions) -> Self {
        Self {
            index,
            shape,
            store,
            group_max_events: options.group_commit_max_events.max(1),
            dedup_window_ms: options.dedup_window_ms,
            dedup_max_ids: options.dedup_max_ids,
            dlq_max_entries: options.processor.dlq_max_entries,
            topics: HashMap::new(),
            delay: Default::default(),
        }
    }

    /// Opens (creating if needed) this cell's partitions of `topic` and recovers their offsets and dedup
    /// windows from disk. Returns the read side to publish.
    pub(super) fn open_topic(
        &mut self,
        topic: &Arc<Topic>,
    ) -> Result<Arc<TopicPartitions>, StoreError> {
        let mut states = Partitions::default();
        let mut views = HashMap::new();
        for p in self.shape.partitions_of(self.index) {
            let log = self.store.partition(&topic.name, p)?;
            let next_offset = log.next_offset()?;
            let last_timestamp_ms = match next_offset.checked_sub(1) {
                Some(last) => log.timestamp_at(last)?.unwrap_or(0),
                None => 0,
            };
            let mut dedup = DedupIndex::new(self.dedup_window_ms, self.dedup_max_ids);
            for (offset, entry) in log.dedup_entries()? {
                dedup.insert(&entry.id, offset, entry.timestamp_ms);
            }
            // Entries that expired while the server was down are deleted by the next group commit's evict.
            let (durable_end, _) = watch::channel(next_offset);
            let view = Arc::new(PartitionView {
                partition: p,
                log,
                durable_end,
                lagging: AtomicU64::new(0),
                ingested: Default::default(),
            });
            views.insert(p, view.clone());
            states.insert(
                p,
                PartitionState {
                    view,
                    next_offset,
                    last_timestamp_ms,
                    dedup,
                    touched: false,
                    ingested: (0, 0),
                },
            );
        }
        self.topics.insert(Arc::from(topic.name.as_str()), states);
        Ok(Arc::new(TopicPartitions {
            topic: topic.clone(),
            by_partition: views,
        }))
    }

    pub(super) fn run(mut self, shared: &Shared, rx: flume::Receiver<Command>) {
        let _span = tracing::info_span!("procd.cell.writer", cell = self.index).entered();
        let mut deferred: Option<Command> = None;
        loop {
            let command = match deferred.take() {
                Some(c) => c,
                None => {
                    if rx.is_empty() {
                        self.delay.empty(shared);
                    }
                    match rx.recv() {
                        Ok(c) => c,
                        Err(_) => return,
                    }
                }
            };
            self.delay.tick(shared, std::time::Instant::now());
            match command {
                Command::Append {
                    topic,
                    events,
                    reply,
                    queued_at,
                    queued_behind,
                } => {
                    self.delay.begin_group(shared);
                    self.delay.observe(shared, queued_at, queued_behind);
                    let first = Pending::Append(PendingAppend {
                        topic,
                        events,
                        reply,
                    });
                    deferred = self.collect_and_commit(shared, &rx, first);
                }
                Command::Process(commit) => {
                    self.delay.begin_group(shared);
                    deferred = self.collect_and_commit(shared, &rx, Pending::Process(commit));
                }
                Command::CreateTopic { topic, reply } => {
                    let _ = reply.send(self.create_topic(shared, topic));
                }
                Command::DeleteTopic { name, reply } => {
                    let _ = reply.send(self.delete_topic(shared, &name));
                }
                Command::PurgeDeadLetters {
                    consumer,
                    through,
                    reply,
                } => {
                    let _ = reply.send(consumer.dlq_purge(through).map_err(|e| {
                        // A dead letter that cannot be decoded fails this request; a failed write
                        // leaves fjall poisoned, and the cell with it.
                        if matches!(e, StoreError::Corrupt { .. }) {
                            self.storage_error(&e)
                        } else {
                            self.cell_failed(shared, &e)
                        }
                    }));
                }
                Command::DropConsumer { consumer, reply } => {
                    let _ = reply.send(
                        self.store
                            .delete_consumer(consumer)
                            .map_err(|e| self.cell_failed(shared, &e)),
                    );
                }
                Command::Shutdown => {
                    // Answer everything still queued: nothing in flight is left without a reply.
                    while let Ok(command) = rx.try_recv() {
                        match command {
                            Command::Append {
                                topic,
                                events,
                                reply,
                                ..
                            } => {
                                let pending = Pending::Append(PendingAppend {
                                    topic,
                                    events,
                                    reply,
                                });
                                self.commit_group(shared, vec![pending]);
                            }
                            Command::Process(commit) => {
                                self.commit_group(shared, vec![Pending::Process(commit)])
                            }
                            Command::CreateTopic { reply, .. }
                            | Command::DeleteTopic { reply, .. } => {
                                let _ =
                                    reply.send(Err(CellError::ShuttingDown { cell: self.index }));
                            }
                            Command::DropConsumer { reply, .. } => {
                                let _ =
                                    reply.send(Err(CellError::ShuttingDown { cell: self.index }));
                            }
                            Command::PurgeDeadLetters { reply, .. } => {
                                let _ =
                                    reply.send(Err(CellError::ShuttingDown { cell: self.index }));
                            }
                            Command::Shutdown => {}
                        }
                    }
                    return;
                }
            }
        }
    }

    /// Collects the appends and process commits already waiting behind `first` into one group (up to
    /// `group_max_events`) and commits it. Returns a control command met on the way, to run next.
    fn collect_and_commit(
        &mut self,
        shared: &Shared,
        rx: &flume::Receiver<Command>,
        first: Pending,
    ) -> Option<Command> {
        let mut count = first.weight();
        let mut group = vec![first];
        let mut deferred = None;
        while count < self.group_max_events {
            match rx.try_recv() {
                Ok(Command::Append {
                    topic,
                    events,
                    reply,
                    queued_at,
                    queued_behind,
                }) => {
                    self.delay.observe(shared, queued_at, queued_behind);
                    count += events.len();
                    group.push(Pending::Append(PendingAppend {
                        topic,
                        events,
                        reply,
                    }));
                }
                Ok(Command::Process(commit)) => {
                    let pending = Pending::Process(commit);
                    count += pending.weight();
                    group.push(pending);
                }
                Ok(other) => {
                    deferred = Some(other);
                    break;
                }
                Err(_) => break,
            }
        }
        self.commit_group(shared, group);
        deferred
    }

    /// A storage read or write of one request failed; the request is refused, the cell goes on.
    fn storage_error(&self, e: &StoreError) -> CellError {
        CellError::Unavailable {
            cell: self.index,
            reason: e.to_string(),
        }
    }

    /// A storage write failed: fjall is poisoned and in-memory state may no longer match the disk, so
    /// the whole cell fails (until a restart recovers it), and the request with it.
    fn cell_failed(&self, shared: &Shared, e: &StoreError) -> CellError {
        shared.health.fail(self.index, e.to_string());
        self.storage_error(e)
    }

    fn unavailable(&self, shared: &Shared) -> Option<CellError> {
        shared
            .health
            .failure()
            .map(|reason| CellError::Unavailable {
                cell: self.index,
                reason,
            })
    }

    /// Appends an encoded record to a partition this writer owns, stamping log-append time.
    fn append_record(
        batch: &mut Batch,
        state: &mut PartitionState,
        now: u64,
        record: Bytes,
        id: Option<String>,
    ) -> Appended {
        if !state.touched {
            for offset in state.dedup.evict(now) {
                batch.forget_id(state.view.log(), offset);
            }
        }
        state.touched = true;
        if let Some(original) = id.as_deref().and_then(|id| state.dedup.lookup(id)) {
            return Appended::Duplicate(original);
        }
        let offset = state.next_offset;
        state.next_offset += 1;
        // Log-append time, kept non-decreasing within the partition even if the clock steps back, so
        // retention can binary-search by time.
        let timestamp_ms = now.max(state.last_timestamp_ms);
        state.last_timestamp_ms = timestamp_ms;
        batch.append(state.view.log(), offset, record, timestamp_ms);
        if let Some(id) = id {
            let entry = DedupEntry { id, timestamp_ms };
            batch.remember_id(state.view.log(), offset, &entry);
            state.dedup.insert(&entry.id, offset, timestamp_ms);
        }
        Appended::New(offset)
    }

    fn commit_group(&mut self, shared: &Shared, group: Vec<Pending>) {
        let _span =
            tracing::debug_span!("procd.cell.group_commit", requests = group.len()).entered();
        if let Some(err) = self.unavailable(shared) {
            for pending in group {
                pending.refuse(err.clone());
            }
            return;
        }
        let now = now_ms();
        let events: usize = group.iter().map(Pending::records).sum();
        let mut batch = self.store.batch();
        let mut answers: Vec<Answer> = Vec::with_capacity(group.len());
        for pending in group {
            match pending {
                Pending::Append(append) => answers.push(self.add_append(&mut batch, now, append)),
                Pending::Process(commit) => {
                    answers.push(self.add_process(&mut batch, now, *commit))
                }
            }
        }
        let outcome = if batch.is_empty() {
            Ok(())
        } else {
            let started = std::time::Instant::now();
            let committed = self.store.commit(batch, true);
            let metrics = &shared.metrics;
            metrics
                .fsync_seconds
                .observe(started.elapsed().as_secs_f64());
            metrics.group_commit_events.observe(events as f64);
            committed
        };
        match outcome {
            Ok(()) => {
                for partitions in self.topics.values_mut() {
                    for state in partitions.values_mut().filter(|s| s.touched) {
                        state.touched = false;
                        state.view.durable_end.send_replace(state.next_offset);
                        let (events, bytes) = std::mem::take(&mut state.ingested);
                        if events > 0 {
                            state.view.ingested.add(events, bytes);
                        }
                    }
                }
                for answer in answers {
                    answer.send();
                }
                // New input may be waiting for a handler of this cell.
                for runner in shared.runners.load().iter() {
                    runner.unpark();
                }
            }
            Err(e) => {
                shared.health.fail(self.index, e.to_string());
                // Nothing of the group was appended.
                for partitions in self.topics.values_mut() {
                    for state in partitions.values_mut() {
                        state.ingested = (0, 0);
                    }
                }
                let err = CellError::Unavailable {
                    cell: self.index,
                    reason: e.to_string(),
                };
                for answer in answers {
                    answer.fail(err.clone());
                }
            }
        }
    }

    fn add_append(&mut self, batch: &mut Batch, now: u64, append: PendingAppend) -> Answer {
        let PendingAppend {
            topic,
            events,
            reply,
        } = append;
        let Some(partitions) = self.topics.get_mut(&topic) else {
            return Answer::Append(reply, Err(CellError::UnknownTopic(topic.to_string())));
        };
        // Validate ownership before touching state, so a bad request changes nothing.
        if let Some(&bad) = events
            .partitions()
            .iter()
            .find(|&&p| !partitions.contains(p))
        {
            tracing::error!(
                partition = bad,
                "append routed to a cell that does not own the partition"
            );
            return Answer::Append(reply, Err(CellError::UnknownTopic(topic.to_string())));
        }
        let mut results = Vec::with_capacity(events.len());
        for (partition, record, id) in events.into_events() {
            if let Some(state) = partitions.get_mut(partition) {
                let bytes = record.len() as u64;
                let appended = Self::append_record(batch, state, now, record, id);
                if matches!(appended, Appended::New(_)) {
                    state.ingested.0 += 1;
                    state.ingested.1 += bytes;
                }
                results.push(appended);
            }
        }
        Answer::Append(reply, Ok(results))
    }

    fn add_process(&mut self, batch: &mut Batch, now: u64, commit: ProcessCommit) -> Answer {
        let ProcessCommit {
            consumer,
            partition,
            outputs,
            state,
            committed,
            dead_letters,
            replayed,
            clear_state,
            reply,
        } = commit;
        // Every output topic must exist here before anything is written.
        if let Some((missing, _)) = outputs.iter().find(|(topic, _)| {
            !self
                .topics
                .get(topic)
                .is_some_and(|p| p.contains(partition))
        }) {
            return Answer::Process(reply, Err(CellError::UnknownTopic(missing.to_string())));
        }
        // What fails must fail before anything of this commit is in the group's batch, which commits
        // with the other requests whatever happens here: half a commit (outputs without their offset)
        // would be applied again when the task retries.
        let mut evictions = Vec::with_capacity(dead_letters.len());
        for (seq, _) in &dead_letters {
            match consumer.dlq_evictions(*seq, self.dlq_max_entries) {
                Ok(evicted) => evictions.push(evicted),
                Err(e) => return Answer::Process(reply, Err(self.storage_error(&e))),
            }
        }
        if clear_state {
            // Not part of the atomic batch (fjall clears a keyspace on its own); the offset commit that
            // follows makes the reset effective, and a crash in between only re-applies the reset.
            if let Err(e) = consumer.clear_state() {
                return Answer::Process(reply, Err(self.storage_error(&e)));
            }
        }
        for (topic, records) in outputs {
            if let Some(state) = self
                .topics
                .get_mut(&topic)
                .and_then(|p| p.get_mut(partition))
            {
                for record in records.into_shared() {
                    Self::append_record(batch, state, now, record, None);
                }
            }
        }
        for (key, value) in state {
            batch.set_state(&consumer, key, value);
        }
        for ((seq, entry), evicted) in dead_letters.iter().zip(&evictions) {
            batch.dead_letter(&consumer, *seq, entry, evicted);
        }
        for seq in replayed {
            batch.forget_dead_letter(&consumer, seq);
        }
        batch.commit_offset(&consumer, &committed);
        Answer::Process(reply, Ok(()))
    }

    fn create_topic(&mut self, shared: &Shared, topic: Arc<Topic>) -> Result<(), CellError> {
        if let Some(err) = self.unavailable(shared) {
            return Err(err);
        }
        if self.topics.contains_key(topic.name.as_str()) {
            return Ok(());
        }
        let views = self
            .open_topic(&topic)
            .map_err(|e| self.cell_failed(shared, &e))?;
        shared.topics.rcu(|map| {
            let mut map = HashMap::clone(map);
            map.insert(Arc::from(topic.name.as_str()), views.clone());
            map
        });
        Ok(())
    }

    fn delete_topic(&mut self, shared: &Shared, name: &str) -> Result<(), CellError> {
        shared.topics.rcu(|map| {
            let mut map = HashMap::clone(map);
            map.remove(name);
            map
        });
        let Some(states) = self.topics.remove(name) else {
            return Ok(());
        };
        for state in states.into_values() {
            self.store
                .delete_partition(state.view.log().clone())
                .map_err(|e| self.cell_failed(shared, &e))?;
        }
        Ok(())
    }
}
