//! The reading task: Kafka messages → decoded readings, handed to the consuming loop in
//! chunks. It runs beside that loop, on the other core, so that polling librdkafka and
//! decoding Avro no longer share one core with bucketing (docs/performance.md). It keeps no
//! state that a commit depends on: a chunk counts only once the consuming loop has taken it,
//! and chunks it drops at shutdown were never counted.

use std::ops::Range;
use std::sync::Arc;

use futures::{FutureExt, StreamExt};
use rdkafka::Message;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaResult;
use rdkafka::message::BorrowedMessage;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::decode::{DecodeError, Decoder, PayloadKind};
use crate::schema::fast::Readings;
use crate::source::{SourceContext, SourcePartitions};

/// Most messages in one chunk: enough to spread the hand-over's cost, few enough that the
/// consuming loop starts on them at once.
const CHUNK_MESSAGES: usize = 256;
/// Most readings in one chunk (a few `ReadingBatch` messages). Small enough that the chunks
/// in flight stay in cache beside the model: with 4096 readings and four chunks queued the full
/// pipeline ran about a tenth slower (docs/performance.md).
const CHUNK_READINGS: usize = 1024;
/// Chunks queued between the reading task and the consuming loop.
const CHUNKS_IN_FLIGHT: usize = 2;

/// Messages read and decoded, in the order they were consumed. Handed back empty once
/// assembled, so that its memory (the readings' strings and vectors) serves later messages.
#[derive(Default)]
pub(super) struct Chunk {
    /// The (topic, partition) of each id first handed out for this chunk, in id order.
    pub(super) partitions: Vec<(String, i32)>,
    pub(super) items: Vec<Item>,
    pub(super) readings: Readings,
    /// Keys, and the payloads a dead letter may need, back to back.
    bytes: Vec<u8>,
}

impl Chunk {
    pub(super) fn bytes(&self, range: &Option<Range<usize>>) -> Option<&[u8]> {
        range.as_ref().map(|r| &self.bytes[r.clone()])
    }

    fn keep(&mut self, bytes: &[u8]) -> Range<usize> {
        let start = self.bytes.len();
        self.bytes.extend_from_slice(bytes);
        start..self.bytes.len()
    }

    pub(super) fn clear(&mut self) {
        self.partitions.clear();
        self.items.clear();
        self.readings.clear();
        self.bytes.clear();
    }

    fn is_full(&self) -> bool {
        self.items.len() >= CHUNK_MESSAGES || self.readings.len() >= CHUNK_READINGS
    }
}

pub(super) enum Item {
    /// Partitions revoked before the next message was read: a rebalance is served inside the
    /// stream's poll, so this comes ahead of anything of the new assignment.
    Revoked(Vec<i32>),
    Message(Consumed),
}

/// One message, with the chunk's ranges of what it carried.
pub(super) struct Consumed {
    pub(super) id: i32,
    pub(super) offset: i64,
    pub(super) key: Option<Range<usize>>,
    /// Kept when a dead letter may need the message's own bytes: a single-reading message, or
    /// one that could not be decoded (a reading of a batch is written out on its own).
    pub(super) payload: Option<Range<usize>>,
    pub(super) readings: Range<usize>,
    pub(super) error: Option<DecodeError>,
}

/// The reading task's state.
pub(super) struct Reader {
    decoder: Decoder,
    partitions: SourcePartitions,
    chunks: mpsc::Sender<Chunk>,
    /// Chunks the consuming loop has finished with. Unbounded, yet it never holds more than the
    /// chunks there are: one being filled, `CHUNKS_IN_FLIGHT` queued, one being assembled.
    spent: mpsc::UnboundedReceiver<Chunk>,
}

/// The consuming loop's ends of the reading task's channels.
pub(super) struct Handover {
    pub(super) chunks: mpsc::Receiver<Chunk>,
    pub(super) spent: mpsc::UnboundedSender<Chunk>,
}

impl Reader {
    /// A reader that hands out ids from `partitions` (none handed out yet; the consuming loop
    /// keeps a copy of its own, fed from the chunks), and the consuming loop's ends of its
    /// channels.
    pub(super) fn new(decoder: Decoder, partitions: SourcePartitions) -> (Self, Handover) {
        let (chunks_tx, chunks) = mpsc::channel(CHUNKS_IN_FLIGHT);
        let (spent, spent_rx) = mpsc::unbounded_channel();
        let reader = Self {
            decoder,
            partitions,
            chunks: chunks_tx,
            spent: spent_rx,
        };
        (reader, Handover { chunks, spent })
    }

    /// Reads until cancelled or until the consuming loop stops taking chunks.
    pub(super) async fn run(
        mut self,
        consumer: Arc<StreamConsumer<SourceContext>>,
        cancel: CancellationToken,
    ) -> anyhow::Result<()> {
        let cancelled = cancel.cancelled();
        tokio::pin!(cancelled);
        let mut messages = consumer.stream();
        loop {
            let first = tokio::select! {
                biased;
                _ = &mut cancelled => return Ok(()),
                message = messages.next() => message,
            };
            let mut chunk = self.spent.try_recv().unwrap_or_default();
            self.read(&consumer, first, &mut chunk)?;
            // What librdkafka has already fetched goes into the same chunk.
            while !chunk.is_full() {
                match messages.next().now_or_never() {
                    Some(message) => self.read(&consumer, message, &mut chunk)?,
                    None => break,
                }
            }
            tokio::select! {
                biased;
                _ = &mut cancelled => return Ok(()),
                sent = self.chunks.send(chunk) => {
                    if sent.is_err() {
                        // The consuming loop has stopped; its own result says why.
                        return Ok(());
                    }
                }
            }
        }
    }

    fn read(
        &mut self,
        consumer: &StreamConsumer<SourceContext>,
        message: Option<KafkaResult<BorrowedMessage<'_>>>,
        chunk: &mut Chunk,
    ) -> anyhow::Result<()> {
        let revoked = consumer.context().take_revoked();
        if !revoked.is_empty() {
            let ids = revoked
                .iter()
                .map(|(topic, partition)| self.id(topic, *partition, chunk))
                .collect();
            chunk.items.push(Item::Revoked(ids));
        }
        match message {
            Some(Ok(message)) => self.decode(&message, chunk),
            Some(Err(error)) => tracing::warn!(%error, "Consumer error."),
            None => anyhow::bail!("the consumer's message stream ended"),
        }
        Ok(())
    }

    fn decode(&mut self, message: &BorrowedMessage<'_>, chunk: &mut Chunk) {
        let id = self.id(message.topic(), message.partition(), chunk);
        let kind = self.partitions.kind(id);
        let start = chunk.readings.len();
        let decoded = self
            .decoder
            .decode_append(kind, message.payload(), &mut chunk.readings);
        let key = message.key().map(|key| chunk.keep(key));
        let payload = match (&decoded, message.payload()) {
            (Err(_), Some(payload)) => Some(chunk.keep(payload)),
            (Ok(()), Some(payload)) if kind == PayloadKind::Reading => Some(chunk.keep(payload)),
            _ => None,
        };
        chunk.items.push(Item::Message(Consumed {
            id,
            offset: message.offset(),
            key,
            payload,
            readings: start..chunk.readings.len(),
            error: decoded.err(),
        }));
    }

    /// The partition's id, noting a new one in the chunk so that the consuming loop hands out
    /// the same ids in the same order.
    fn id(&mut self, topic: &str, partition: i32, chunk: &mut Chunk) -> i32 {
        let known = self.partitions.len();
        let id = self.partitions.id(topic, partition);
        if id as usize == known {
            chunk.partitions.push((topic.to_owned(), partition));
        }
        id
    }
}
