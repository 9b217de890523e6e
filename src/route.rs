//! route: republishes node-keyed readings keyed by their cell.
//!
//! gridwatch needs every reading of a cell in one partition: one owner per cell in the consumer
//! group, and one watermark. Producers often key by sensor instead. `gridwatch route` is a
//! consumer group of its own (`[route] group_id`) that reads the raw topics, resolves node →
//! cell through the spatial-node registry, and writes one `ReadingBatch` per cell and input
//! message to `[route] output_topic`, keyed by cell, with Kafka's Java-compatible `murmur2`
//! partitioner — the way Kafka Streams repartitions before a keyed aggregation.
//!
//! Delivery is at-least-once. An input message's offset is stored only once everything derived
//! from it (routed batches and dead letters) is acknowledged. Batches are enqueued in input
//! order and the idempotent producer keeps that order per partition through its retries, so a
//! cell's readings keep the order they had within one input partition. A delivery that still
//! fails after librdkafka's own retries (`message.timeout.ms`) stops the job without committing
//! past it. Unusable input (undecodable, invalid value, unknown node) follows `[sink] bad_input`
//! exactly as in `gridwatch run`; lateness and windows are the run job's business.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::BorrowedMessage;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use crate::config::{BadInputPolicy, ClientRole, Config};
use crate::decode::{self, Decoder, PayloadKind};
use crate::pipeline;
use crate::registry::Registry;
use crate::schema::{self, Codec, DeadLetterReason, Reading, RecordKind, WireFormat, records};
use crate::sink::{DeadLetter, Sink};
use crate::source::{self, OffsetLedger, SourceContext, SourcePartitions};
use crate::telemetry::{self, Health, Stats};

/// Most deliveries awaited at once; the consumer waits when this many are pending.
const MAX_IN_FLIGHT: usize = 10_000;

/// What a route run did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RouteReport {
    pub messages: u64,
    /// Readings republished keyed by cell.
    pub routed: u64,
    /// Batches written to the output topic.
    pub batches: u64,
    pub dead_lettered: u64,
}

type Delivery = BoxFuture<'static, (i32, i64, anyhow::Result<()>)>;

/// Routes until `cancel` fires, then waits for pending deliveries and commits.
pub async fn run(
    config: &Config,
    stats: Arc<Stats>,
    health: Arc<Health>,
    cancel: CancellationToken,
) -> anyhow::Result<RouteReport> {
    let write_id = match (config.source.wire_format, config.route.output_schema_id) {
        (WireFormat::Confluent, None) => anyhow::bail!(
            "[route] output_schema_id is required with [source] wire_format = \"confluent\": it is the schema id written in front of each routed ReadingBatch"
        ),
        (_, id) => id.unwrap_or(0),
    };
    // Readiness asks for a loaded model; the route stage has none to wait for.
    health.set_model_loaded(true);
    let Some(pipeline::Inputs {
        registry,
        registry_task,
        consumer,
        kinds,
    }) = pipeline::connect(
        config,
        &config.route.group_id,
        &config.route.topics,
        &health,
        &cancel,
    )
    .await?
    else {
        return Ok(RouteReport::default());
    };
    let producer_client = pipeline::client_config(config, ClientRole::Producer);
    let producer: FutureProducer = producer_client
        .clone()
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("partitioner", "murmur2_random")
        .create()?;
    let mut router = Router {
        decoder: pipeline::decoder(config)?,
        registry,
        output: config.route.output_topic.clone(),
        batches: Codec::new(RecordKind::ReadingBatch, config.source.wire_format)
            .with_write_id(write_id),
        producer,
        sink: Arc::new(Sink::new(producer_client, &config.sink)?),
        policy: config.sink.bad_input,
        ledger: Arc::new(Mutex::new(OffsetLedger::default())),
        partitions: SourcePartitions::new(kinds),
        in_flight: FuturesUnordered::new(),
        stats,
        report: RouteReport::default(),
    };
    let result = router
        .run(&consumer, config.source.commit_interval, &cancel)
        .await;
    let drained = match tokio::time::timeout(config.pipeline.shutdown_timeout, router.drain()).await
    {
        Ok(drained) => drained,
        Err(_) => Err(anyhow::anyhow!(
            "shutdown did not drain within {:?} ([pipeline] shutdown_timeout); committed only what was delivered",
            config.pipeline.shutdown_timeout
        )),
    };
    router.commit(&consumer, true)?;
    registry_task.abort();
    consumer.unsubscribe();
    health.set_assigned_partitions(0);
    result?;
    drained?;
    Ok(router.report)
}

struct Router {
    decoder: Decoder,
    registry: Arc<Registry>,
    output: String,
    batches: Codec,
    producer: FutureProducer,
    sink: Arc<Sink>,
    policy: BadInputPolicy,
    ledger: Arc<Mutex<OffsetLedger>>,
    /// Dense ids of (topic, partition), for the ledger.
    partitions: SourcePartitions,
    in_flight: FuturesUnordered<Delivery>,
    stats: Arc<Stats>,
    report: RouteReport,
}

impl Router {
    async fn run(
        &mut self,
        consumer: &StreamConsumer<SourceContext>,
        commit_interval: Duration,
        cancel: &CancellationToken,
    ) -> anyhow::Result<()> {
        let mut ticker = tokio::time::interval(commit_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return Ok(()),
                Some(done) = self.in_flight.next() => self.delivered(done)?,
                _ = ticker.tick() => self.commit(consumer, false)?,
                message = consumer.recv(), if self.in_flight.len() < MAX_IN_FLIGHT => {
                    for (topic, partition) in consumer.context().take_revoked() {
                        let id = self.partitions.id(&topic, partition);
                        self.ledger.lock().expect("ledger lock").forget(id);
                    }
                    match message {
                        Ok(message) => self.route(&message).await?,
                        Err(error) => tracing::warn!(%error, "Consumer error."),
                    }
                }
            }
        }
    }

    fn delivered(
        &mut self,
        (id, offset, result): (i32, i64, anyhow::Result<()>),
    ) -> anyhow::Result<()> {
        result?;
        self.ledger.lock().expect("ledger lock").release(id, offset);
        Ok(())
    }

    async fn drain(&mut self) -> anyhow::Result<()> {
        while let Some(done) = self.in_flight.next().await {
            self.delivered(done)?;
        }
        Ok(())
    }

    fn commit(&self, consumer: &StreamConsumer<SourceContext>, sync: bool) -> anyhow::Result<()> {
        let committable = self
            .ledger
            .lock()
            .expect("ledger lock")
            .committable(&HashMap::new());
        if committable.is_empty() {
            return Ok(());
        }
        let mut tpl = TopicPartitionList::new();
        for (id, offset) in &committable {
            let (topic, partition) = self.partitions.pair(*id);
            tpl.add_partition_offset(topic, *partition, Offset::Offset(*offset))?;
        }
        source::store_and_commit(consumer, &tpl, sync)?;
        telemetry::offsets_stored(&self.stats, committable.len());
        Ok(())
    }

    /// Splits one input message by cell and enqueues its batches and dead letters.
    async fn route(&mut self, message: &BorrowedMessage<'_>) -> anyhow::Result<()> {
        let topic = message.topic();
        let (partition, offset) = (message.partition(), message.offset());
        let id = self.partitions.id(topic, partition);
        self.ledger
            .lock()
            .expect("ledger lock")
            .consumed(id, offset);
        self.report.messages += 1;
        let kind = self.partitions.kind(id);
        let letter =
            |reason: DeadLetterReason, error: String, payload: Option<Vec<u8>>, index| DeadLetter {
                reason,
                error,
                key: message.key().map(<[u8]>::to_vec),
                payload,
                topic: topic.to_owned(),
                partition,
                offset,
                batch_index: index,
            };
        let readings = match self.decoder.decode(kind, message.payload()) {
            Ok(readings) => readings,
            Err(error) => {
                telemetry::message_consumed(&self.stats, self.partitions.messages(id), 0);
                let payload = message.payload().map(<[u8]>::to_vec);
                return self.reject(id, letter(error.reason(), error.to_string(), payload, None));
            }
        };
        telemetry::message_consumed(&self.stats, self.partitions.messages(id), readings.len());
        let batch = kind == PayloadKind::Batch;
        let mut cells: Vec<(Arc<str>, Vec<Reading>)> = Vec::new();
        for (index, reading) in readings.into_iter().enumerate() {
            let payload = || {
                if batch {
                    schema::write_datum(RecordKind::Reading.schema(), &reading.to_value()).ok()
                } else {
                    message.payload().map(<[u8]>::to_vec)
                }
            };
            let index = batch.then_some(index);
            if let Err(error) = decode::validate(&reading) {
                self.reject(
                    id,
                    letter(error.reason(), error.to_string(), payload(), index),
                )?;
                continue;
            }
            let Some(node) = self.registry.lookup(&reading.node_id) else {
                let error = format!(
                    "node `{}` is not on the spatial-node topic",
                    reading.node_id
                );
                self.reject(
                    id,
                    letter(DeadLetterReason::UnknownNode, error, payload(), index),
                )?;
                continue;
            };
            match cells.iter_mut().find(|(cell, _)| *cell == node.cell) {
                Some((_, list)) => list.push(reading),
                None => cells.push((Arc::clone(&node.cell), vec![reading])),
            }
        }
        for (cell, list) in cells {
            let payload = self.batches.encode(&records::batch_to_value(&list))?;
            self.report.routed += list.len() as u64;
            self.report.batches += 1;
            telemetry::readings_routed(list.len());
            let delivery = self.enqueue(&cell, &payload).await?;
            self.ledger.lock().expect("ledger lock").hold(id, offset);
            self.in_flight.push(Box::pin(async move {
                let result = match delivery.await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err((error, _))) => Err(anyhow::anyhow!(
                        "a routed batch was not delivered after librdkafka's retries: {error}"
                    )),
                    Err(_) => Err(anyhow::anyhow!("the producer was closed")),
                };
                (id, offset, result)
            }));
        }
        Ok(())
    }

    /// Enqueues one batch now (so the output keeps the input's order), waiting while the
    /// producer's queue is full.
    async fn enqueue(
        &mut self,
        cell: &str,
        payload: &[u8],
    ) -> anyhow::Result<rdkafka::producer::DeliveryFuture> {
        loop {
            let record = FutureRecord::to(&self.output).key(cell).payload(payload);
            match self.producer.send_result(record) {
                Ok(delivery) => return Ok(delivery),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    // Let acknowledgements come back before trying again.
                    if let Ok(Some(done)) =
                        tokio::time::timeout(Duration::from_millis(10), self.in_flight.next()).await
                    {
                        self.delivered(done)?;
                    }
                }
                Err((error, _)) => anyhow::bail!("cannot enqueue a routed batch: {error}"),
            }
        }
    }

    /// Applies the bad-input policy to one refused message or reading.
    fn reject(&mut self, id: i32, letter: DeadLetter) -> anyhow::Result<()> {
        if !pipeline::refuse(self.policy, &self.stats, &letter)? {
            return Ok(());
        }
        self.report.dead_lettered += 1;
        self.ledger
            .lock()
            .expect("ledger lock")
            .hold(id, letter.offset);
        let sink = Arc::clone(&self.sink);
        self.in_flight.push(Box::pin(async move {
            let result = sink.publish_dead_letter(&letter).await.map_err(Into::into);
            (id, letter.offset, result)
        }));
        Ok(())
    }
}
