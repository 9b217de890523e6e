//! sink: anomaly events and dead letters → Kafka.
//!
//! Invariant: a `publish_*` call returns `Ok` only once the broker has acknowledged the record
//! (`acks=all`, idempotent producer). Retryable failures are retried with backoff for as long
//! as it takes (so an unavailable output topic turns into backpressure, never into a lost
//! record); a final failure is returned and the caller must not commit past the record.

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;

use crate::config::SinkConfig;
use crate::schema::{
    AnomalyEvent, Codec, CodecError, DeadLetterReason, RecordKind, dead_letter_headers,
};
use crate::telemetry;

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("cannot create the producer: {0}")]
    Create(KafkaError),
    #[error("cannot encode the event: {0}")]
    Encode(#[from] CodecError),
    #[error("the broker refused the record for good on `{topic}`: {error}")]
    Final { topic: String, error: KafkaError },
}

/// A message, or one reading of a batch, that could not be used.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    pub reason: DeadLetterReason,
    pub error: String,
    pub key: Option<Vec<u8>>,
    /// The original bytes: the whole message, or the reading re-encoded as a plain `Reading`
    /// datum when only one reading of a batch was bad.
    pub payload: Option<Vec<u8>>,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub batch_index: Option<usize>,
}

/// Producer of the event and dead-letter topics.
pub struct Sink {
    producer: FutureProducer,
    events_topic: String,
    dead_letter_topic: String,
    events: Codec,
}

/// Errors that no retry can cure.
fn is_final(error: &KafkaError) -> bool {
    matches!(
        error.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::MessageSizeTooLarge
                | RDKafkaErrorCode::InvalidMessage
                | RDKafkaErrorCode::InvalidMessageSize
                | RDKafkaErrorCode::TopicAuthorizationFailed
                | RDKafkaErrorCode::ClusterAuthorizationFailed
                | RDKafkaErrorCode::InvalidRecord
                | RDKafkaErrorCode::UnsupportedForMessageFormat
        )
    )
}

impl Sink {
    pub fn new(mut client: ClientConfig, config: &SinkConfig) -> Result<Self, SinkError> {
        client
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5");
        let producer = client.create().map_err(SinkError::Create)?;
        Ok(Self {
            producer,
            events_topic: config.events_topic.clone(),
            dead_letter_topic: config.dead_letter_topic.clone(),
            events: Codec::new(RecordKind::AnomalyEvent, config.wire_format)
                .with_write_id(config.event_schema_id),
        })
    }

    /// Encodes an event as published: Avro in the configured framing.
    pub fn encode_event(&self, event: &AnomalyEvent) -> Result<Vec<u8>, SinkError> {
        Ok(self.events.encode(&event.to_value())?)
    }

    /// Publishes one event keyed by its cell, and waits for the acknowledgement.
    pub async fn publish_event(&self, event: &AnomalyEvent) -> Result<(), SinkError> {
        let payload = self.encode_event(event)?;
        let headers = OwnedHeaders::new().insert(Header {
            key: "gridwatch.event_id",
            value: Some(event.event_id.as_bytes()),
        });
        let (partition, offset) = self
            .send(
                &self.events_topic,
                Some(event.cell_id.as_bytes()),
                Some(&payload),
                headers,
            )
            .await?;
        tracing::debug!(event_id = %event.event_id, partition, offset, "Event acknowledged.");
        Ok(())
    }

    /// Publishes one dead letter with its reason and source headers, and waits for the
    /// acknowledgement.
    pub async fn publish_dead_letter(&self, letter: &DeadLetter) -> Result<(), SinkError> {
        let partition = letter.partition.to_string();
        let offset = letter.offset.to_string();
        let index = letter.batch_index.map(|i| i.to_string());
        let mut headers = OwnedHeaders::new()
            .insert(Header {
                key: dead_letter_headers::REASON,
                value: Some(letter.reason.as_str()),
            })
            .insert(Header {
                key: dead_letter_headers::ERROR,
                value: Some(letter.error.as_str()),
            })
            .insert(Header {
                key: dead_letter_headers::SOURCE_TOPIC,
                value: Some(letter.topic.as_str()),
            })
            .insert(Header {
                key: dead_letter_headers::SOURCE_PARTITION,
                value: Some(partition.as_str()),
            })
            .insert(Header {
                key: dead_letter_headers::SOURCE_OFFSET,
                value: Some(offset.as_str()),
            });
        if let Some(index) = &index {
            headers = headers.insert(Header {
                key: dead_letter_headers::BATCH_INDEX,
                value: Some(index.as_str()),
            });
        }
        self.send(
            &self.dead_letter_topic,
            letter.key.as_deref(),
            letter.payload.as_deref(),
            headers,
        )
        .await
        .map(|_| ())
    }

    /// Publishes one record of the judge-state changelog `topic`, keyed by its cell (`None`: a
    /// tombstone, the cell has nothing to keep), and waits for the acknowledgement.
    pub async fn publish_state(
        &self,
        topic: &str,
        cell: &str,
        state: Option<&[u8]>,
    ) -> Result<(), SinkError> {
        self.send(topic, Some(cell.as_bytes()), state, OwnedHeaders::new())
            .await
            .map(|_| ())
    }

    async fn send(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        headers: OwnedHeaders,
    ) -> Result<(i32, i64), SinkError> {
        let mut backoff = Duration::from_millis(100);
        loop {
            let mut record: FutureRecord<'_, [u8], [u8]> =
                FutureRecord::to(topic).headers(headers.clone());
            if let Some(key) = key {
                record = record.key(key);
            }
            if let Some(payload) = payload {
                record = record.payload(payload);
            }
            match self.producer.send(record, Timeout::Never).await {
                Ok(delivery) => return Ok((delivery.partition, delivery.offset)),
                Err((error, _)) if is_final(&error) => {
                    return Err(SinkError::Final {
                        topic: topic.to_owned(),
                        error,
                    });
                }
                Err((error, _)) => {
                    telemetry::produce_failed(topic, &error);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}
