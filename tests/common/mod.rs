//! Helpers shared by the Kafka-backed tests: producing, and reading a topic to its end.

#![allow(dead_code)]

use std::time::{Duration, Instant};

pub mod broker;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

pub fn client(bootstrap: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap);
    c
}

/// Produces one record and returns its (partition, offset) once acknowledged.
pub async fn produce(
    producer: &FutureProducer,
    topic: &str,
    key: &str,
    payload: &[u8],
) -> (i32, i64) {
    let delivery = producer
        .send(
            FutureRecord::to(topic).key(key).payload(payload),
            Timeout::After(Duration::from_secs(10)),
        )
        .await
        .expect("produce");
    (delivery.partition, delivery.offset)
}

/// Every message of `topic`, from the beginning to the end offsets at the time of the call.
pub fn read_all(bootstrap: &str, topic: &str) -> Vec<OwnedMessage> {
    let consumer: BaseConsumer = client(bootstrap)
        .set("group.id", format!("reader-{topic}-{}", std::process::id()))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_uncommitted")
        .create()
        .expect("consumer");
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata");
    let mut tpl = TopicPartitionList::new();
    let mut remaining = 0;
    let mut ends = std::collections::HashMap::new();
    for p in metadata.topics()[0].partitions() {
        let (_, high) = consumer
            .fetch_watermarks(topic, p.id(), Duration::from_secs(10))
            .expect("watermarks");
        tpl.add_partition_offset(topic, p.id(), Offset::Beginning)
            .unwrap();
        remaining += high;
        ends.insert(p.id(), high);
    }
    consumer.assign(&tpl).expect("assign");
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while (out.len() as i64) < remaining && Instant::now() < deadline {
        if let Some(message) = consumer.poll(Duration::from_millis(100)) {
            out.push(message.expect("message").detach());
        }
    }
    assert_eq!(out.len() as i64, remaining, "read all of {topic}");
    out.sort_by_key(|m| (m.partition(), m.offset()));
    out
}

/// The value of header `key` as a string.
pub fn header(message: &OwnedMessage, key: &str) -> Option<String> {
    let headers = message.headers()?;
    headers
        .iter()
        .find(|h| h.key == key)
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}
