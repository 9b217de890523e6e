//! tail: the anomaly topic, read back for people (`gridwatch tail`, the demo's live view).
//!
//! Invariant: tail only reads. It uses its own consumer group and never commits, so it cannot
//! disturb the SOC consumers or gridwatch itself; events it cannot decode are reported and
//! skipped, never fatal.

use std::time::{Duration, UNIX_EPOCH};

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::{ClientConfig, Message};
use tokio_util::sync::CancellationToken;

use crate::schema::{AnomalyEvent, BeyondBound, Codec, RecordKind, Severity, WireFormat};

/// Which events to show.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Only events at or above this severity.
    pub min_severity: Option<Severity>,
    /// Only events of these cells (empty: all).
    pub cells: Vec<String>,
}

impl Filter {
    pub fn accepts(&self, event: &AnomalyEvent) -> bool {
        self.min_severity.is_none_or(|min| event.severity >= min)
            && (self.cells.is_empty() || self.cells.contains(&event.cell_id))
    }
}

/// `ms` since the epoch as an RFC 3339 UTC time, to the second.
pub fn utc(ms: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

/// One readable line for an event: window end, cell, severity, score vs threshold, top
/// contributors (for a silent cell's CLOSE, since when it has been silent), and the sensor
/// checks that fired, which make a window anomalous whatever its score.
pub fn event_line(e: &AnomalyEvent) -> String {
    let beyond = |what: &str, b: &BeyondBound, sign: char| {
        format!(
            "{what} {} {} {} {sign} {}",
            b.node_id, b.channel, b.value, b.bound
        )
    };
    let mut contributors: Vec<String> = e
        .contributors
        .iter()
        .map(|c| format!("{} {} {:.0}%", c.node_id, c.channel, c.share * 100.0))
        .collect();
    // The CLOSE of a cell that fell silent stands for no readings at all.
    if e.node_count == 0 {
        contributors.push(format!("no readings since {}", utc(e.window_start_ms)));
    }
    let checks: Vec<String> = (e.flatlined.iter())
        .map(|f| format!("stuck {} {} at {}", f.node_id, f.channel, f.value))
        .chain(e.spikes.iter().map(|s| {
            format!(
                "spike {} {} {} at {}",
                s.node_id,
                s.channel,
                s.value,
                utc(s.at_ms)
            )
        }))
        .chain(e.diverged.iter().map(|d| {
            let off = d.level - d.usual;
            format!("diverged {} {} {off:+.1} from usual", d.node_id, d.channel)
        }))
        .chain(e.below_floor.iter().map(|b| beyond("below floor", b, '<')))
        .chain(
            e.above_ceiling
                .iter()
                .map(|b| beyond("above ceiling", b, '>')),
        )
        .collect();
    if !checks.is_empty() {
        contributors.push(format!("checks: {}", checks.join("; ")));
    }
    let incident = e.incident.as_ref().map_or(String::new(), |i| {
        format!(
            "  [{} {} #{}]",
            i.status.as_str(),
            &i.incident_id[..8.min(i.incident_id.len())],
            i.windows
        )
    });
    format!(
        "{}  {:<8} {:<8} score {:>7.2} / {:.2}  {}{incident}",
        utc(e.window_end_ms),
        e.cell_id,
        e.severity.as_str(),
        e.score,
        e.threshold,
        contributors.join(", ")
    )
}

/// An event as one JSON object, for scripts.
pub fn event_json(e: &AnomalyEvent) -> String {
    let bounds = |items: &[BeyondBound], bound_field: &str| {
        let item = |b: &BeyondBound| {
            let mut o =
                serde_json::json!({"node_id": b.node_id, "channel": b.channel, "value": b.value});
            o[bound_field] = b.bound.into();
            o
        };
        items.iter().map(item).collect::<Vec<_>>()
    };
    let contributors: Vec<serde_json::Value> = e
        .contributors
        .iter()
        .map(|c| {
            serde_json::json!({
                "node_id": c.node_id,
                "channel": c.channel,
                "share": c.share,
                "score": c.score,
                "peak_at": c.peak_at_ms.map(utc),
            })
        })
        .collect();
    serde_json::json!({
        "event_id": e.event_id,
        "cell_id": e.cell_id,
        "window_start": utc(e.window_start_ms),
        "window_end": utc(e.window_end_ms),
        "score": e.score,
        "threshold": e.threshold,
        "severity": e.severity.as_str(),
        "contributors": contributors,
        "model": format!("{}/{}", e.model_name, e.model_version),
        "missing_fraction": e.missing_fraction,
        "node_count": e.node_count,
        "incident": e.incident.as_ref().map(|i| serde_json::json!({
            "incident_id": i.incident_id,
            "status": i.status.as_str(),
            "opened_at": utc(i.opened_at_ms),
            "windows": i.windows,
            "peak_score": i.peak_score,
        })),
        "flatlined": e.flatlined.iter().map(|f| serde_json::json!({
            "node_id": f.node_id,
            "channel": f.channel,
            "value": f.value,
        })).collect::<Vec<_>>(),
        "spikes": e.spikes.iter().map(|s| serde_json::json!({
            "node_id": s.node_id,
            "channel": s.channel,
            "at": utc(s.at_ms),
            "value": s.value,
            "before": s.before,
            "after": s.after,
        })).collect::<Vec<_>>(),
        "diverged": e.diverged.iter().map(|d| serde_json::json!({
            "node_id": d.node_id,
            "channel": d.channel,
            "level": d.level,
            "usual": d.usual,
            "deviation": d.deviation,
        })).collect::<Vec<_>>(),
        "below_floor": bounds(&e.below_floor, "floor"),
        "above_ceiling": bounds(&e.above_ceiling, "ceiling"),
    })
    .to_string()
}

/// A number unique within this process, so every tail gets its own throw-away group.
fn tail_instance() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as u64);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) * 1_000_000_000 + nanos
}

/// Follows `topic` (from the beginning when `from_beginning`, else from its end), calling
/// `on_event` for every event the filter accepts, until `stop` fires.
pub async fn follow(
    mut client: ClientConfig,
    topic: &str,
    format: WireFormat,
    from_beginning: bool,
    filter: &Filter,
    stop: CancellationToken,
    mut on_event: impl FnMut(AnomalyEvent),
) -> anyhow::Result<()> {
    let group = format!("gridwatch-tail-{}-{}", std::process::id(), tail_instance());
    client
        .set("group.id", group)
        .set(
            "auto.offset.reset",
            if from_beginning { "earliest" } else { "latest" },
        )
        .set("enable.auto.commit", "false");
    let consumer: StreamConsumer = client.create()?;
    consumer.subscribe(&[topic])?;
    let codec = Codec::new(RecordKind::AnomalyEvent, format);
    loop {
        let message = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            m = consumer.recv() => m?,
        };
        let Some(payload) = message.payload() else {
            continue;
        };
        let decoded = codec
            .decode(payload)
            .map_err(anyhow::Error::from)
            .and_then(|v| Ok(AnomalyEvent::from_value(&v)?));
        match decoded {
            Ok(event) if filter.accepts(&event) => on_event(event),
            Ok(_) => {}
            Err(error) => tracing::warn!(
                partition = message.partition(),
                offset = message.offset(),
                %error,
                "Skipped an undecodable event."
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(cell: &str, severity: Severity) -> AnomalyEvent {
        AnomalyEvent {
            severity,
            ..AnomalyEvent::sample(cell, 16_000)
        }
    }

    #[test]
    fn filters_by_severity_and_cell() {
        let f = Filter {
            min_severity: Some(Severity::High),
            cells: vec!["a".into()],
        };
        assert!(f.accepts(&event("a", Severity::Critical)));
        assert!(!f.accepts(&event("a", Severity::Medium)));
        assert!(!f.accepts(&event("b", Severity::Critical)));
        assert!(Filter::default().accepts(&event("b", Severity::Low)));
    }

    #[test]
    fn a_line_says_when_where_how_bad_and_who() {
        assert_eq!(
            event_line(&event("line-1", Severity::Low)),
            "1970-01-01T00:00:16Z  line-1   LOW      score   12.50 / 10.00  n1 temperature 80%"
        );
    }

    #[test]
    fn json_names_each_bound_by_its_side_and_each_contributors_peak() {
        let beyond = |bound| BeyondBound {
            node_id: "n1".into(),
            channel: "speed".into(),
            value: 40.0,
            bound,
        };
        let e = AnomalyEvent {
            below_floor: vec![beyond(55.0)],
            above_ceiling: vec![beyond(35.0)],
            ..AnomalyEvent::sample("c", 16_000)
        };
        let json: serde_json::Value = serde_json::from_str(&event_json(&e)).unwrap();
        assert_eq!(json["below_floor"][0]["floor"], 55.0);
        assert_eq!(json["above_ceiling"][0]["ceiling"], 35.0);
        assert_eq!(json["above_ceiling"][0]["node_id"], "n1");
        assert_eq!(json["contributors"][0]["peak_at"], "1970-01-01T00:00:15Z");
    }

    #[test]
    fn a_line_names_the_checks_that_fired() {
        let e = AnomalyEvent {
            flatlined: vec![crate::schema::Flatline {
                node_id: "n2".into(),
                channel: "speed".into(),
                value: 61.5,
            }],
            above_ceiling: vec![BeyondBound {
                node_id: "n3".into(),
                channel: "speed".into(),
                value: 81.0,
                bound: 68.0,
            }],
            ..event("road-7", Severity::Low)
        };
        assert_eq!(
            event_line(&e),
            "1970-01-01T00:00:16Z  road-7   LOW      score   12.50 / 10.00  n1 temperature 80%, \
             checks: stuck n2 speed at 61.5; above ceiling n3 speed 81 > 68"
        );
    }

    #[test]
    fn a_silent_cells_close_says_since_when() {
        let close = AnomalyEvent {
            window_start_ms: 16_000,
            window_end_ms: 620_000,
            score: 0.0,
            severity: Severity::High,
            contributors: Vec::new(),
            node_count: 0,
            incident: Some(crate::schema::Incident {
                incident_id: "1a2b3c4d-0000".into(),
                status: crate::schema::IncidentStatus::Close,
                opened_at_ms: 12_000,
                windows: 3,
                peak_score: 50.0,
            }),
            ..AnomalyEvent::sample("line-1", 16_000)
        };
        assert_eq!(
            event_line(&close),
            "1970-01-01T00:10:20Z  line-1   HIGH     score    0.00 / 10.00  \
             no readings since 1970-01-01T00:00:16Z  [CLOSE 1a2b3c4d #3]"
        );
    }
}
