//! The records of `schemas/` as Rust types, and their conversion to and from Avro values.
//!
//! Invariant: `from_value(to_value(x)) == x` for every record type, and `from_value` accepts
//! exactly the values that the reader schemas in `schemas/` describe (after writer → reader
//! resolution); any other shape is a [`ShapeError`] naming the field.

use std::collections::HashMap;

use apache_avro::types::Value;

/// One observation of one sensor node.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Reading {
    pub node_id: String,
    /// Milliseconds since the Unix epoch, UTC.
    pub event_time_ms: i64,
    /// Channel name and value, sorted by name (an Avro map has no order).
    pub values: Vec<(String, f64)>,
    pub sequence: Option<i64>,
}

/// A channel a node reports.
#[derive(Debug, Clone, PartialEq)]
pub struct Channel {
    pub name: String,
    pub unit: String,
}

/// Where a node is and what it measures.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SpatialNode {
    pub node_id: String,
    pub latitude: Option<f64>,
    pub longitude: Option<f64>,
    pub x: Option<f64>,
    pub y: Option<f64>,
    pub cell_id: Option<String>,
    pub kind: String,
    pub channels: Vec<Channel>,
}

/// Severity of an anomaly event, from the ratio of score to threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Severity {
    Low,
    Medium,
    High,
    Critical,
}

impl Severity {
    pub const ALL: [Severity; 4] = [
        Severity::Low,
        Severity::Medium,
        Severity::High,
        Severity::Critical,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Low => "LOW",
            Severity::Medium => "MEDIUM",
            Severity::High => "HIGH",
            Severity::Critical => "CRITICAL",
        }
    }

    fn index(self) -> u32 {
        self as u32
    }
}

/// One node/channel pair's part in an anomalous window.
#[derive(Debug, Clone, PartialEq)]
pub struct Contributor {
    pub node_id: String,
    pub channel: String,
    pub share: f64,
    pub score: f64,
    /// Start of the window's step where this pair's error was largest; `None` in events
    /// written before gridwatch said so.
    pub peak_at_ms: Option<i64>,
}

/// An anomalous window of one cell, as published to the event topic.
#[derive(Debug, Clone, PartialEq)]
pub struct AnomalyEvent {
    pub event_id: String,
    pub cell_id: String,
    pub window_start_ms: i64,
    pub window_end_ms: i64,
    pub detected_at_ms: i64,
    pub score: f64,
    pub threshold: f64,
    pub severity: Severity,
    pub contributors: Vec<Contributor>,
    pub model_name: String,
    pub model_version: String,
    pub model_hash: String,
    pub missing_fraction: f64,
    pub node_count: i32,
    /// The incident the window belongs to, when incidents are enabled.
    pub incident: Option<Incident>,
    /// Node/channel pairs stuck on one value over the flatline check's steps.
    pub flatlined: Vec<Flatline>,
    /// Values that stood out from both neighbouring steps (the spike check).
    pub spikes: Vec<Spike>,
    /// Nodes away from their usual level among their cell's nodes (the divergence check).
    pub diverged: Vec<Diverged>,
    /// Nodes far below their floor for the time of day (the floor check).
    pub below_floor: Vec<BeyondBound>,
    /// Nodes far above their ceiling for the time of day (the floor check's ceiling).
    pub above_ceiling: Vec<BeyondBound>,
}

#[cfg(test)]
impl AnomalyEvent {
    /// A test fixture: a LOW event of `cell` for the 16 s window ending at `window_end_ms`
    /// (score 12.5 against 10.0), one contributor (node `n1`, channel `temperature`, 80 %).
    pub(crate) fn sample(cell: &str, window_end_ms: i64) -> Self {
        Self {
            event_id: "id".into(),
            cell_id: cell.into(),
            window_start_ms: window_end_ms - 16_000,
            window_end_ms,
            detected_at_ms: window_end_ms,
            score: 12.5,
            threshold: 10.0,
            severity: Severity::Low,
            contributors: vec![Contributor {
                node_id: "n1".into(),
                channel: "temperature".into(),
                share: 0.8,
                score: 12.5,
                peak_at_ms: Some(window_end_ms - 1_000),
            }],
            model_name: "m".into(),
            model_version: "1".into(),
            model_hash: "h".into(),
            missing_fraction: 0.0,
            node_count: 1,
            incident: None,
            flatlined: Vec::new(),
            spikes: Vec::new(),
            diverged: Vec::new(),
            below_floor: Vec::new(),
            above_ceiling: Vec::new(),
        }
    }
}

/// A value that stood out from both the step before and the step after, in physical units.
#[derive(Debug, Clone, PartialEq)]
pub struct Spike {
    pub node_id: String,
    pub channel: String,
    /// Start of the spike's step.
    pub at_ms: i64,
    pub value: f64,
    pub before: f64,
    pub after: f64,
}

/// A node/channel pair away from its usual level among its cell's nodes, in physical units.
#[derive(Debug, Clone, PartialEq)]
pub struct Diverged {
    pub node_id: String,
    pub channel: String,
    /// Mean over the check's last steps of the node's value minus its cell's median.
    pub level: f64,
    /// The level the node usually has.
    pub usual: f64,
    /// The usual spread of that level.
    pub deviation: f64,
}

/// A node/channel pair below its time-of-day floor, or above its ceiling, over the floor
/// check's last steps. In Avro the bound is the record's `floor` or `ceiling` field.
#[derive(Debug, Clone, PartialEq)]
pub struct BeyondBound {
    pub node_id: String,
    pub channel: String,
    /// The value at the window's last step.
    pub value: f64,
    /// The floor or ceiling of that step's time-of-day slot.
    pub bound: f64,
}

impl BeyondBound {
    /// Avro records, with the bound under `bound_field`.
    fn to_values(items: &[Self], bound_field: &str) -> Value {
        let record = |b: &Self| {
            Value::Record(vec![
                ("node_id".into(), Value::String(b.node_id.clone())),
                ("channel".into(), Value::String(b.channel.clone())),
                ("value".into(), Value::Double(b.value)),
                (bound_field.into(), Value::Double(b.bound)),
            ])
        };
        Value::Array(items.iter().map(record).collect())
    }

    /// The records of field `name` of `fields`, with the bound under `bound_field`; none when
    /// the field is absent (events written before its check existed).
    fn from_values(
        fields: &Fields<'_>,
        name: &'static str,
        bound_field: &'static str,
    ) -> Result<Vec<Self>, ShapeError> {
        fields.records_or_empty(name, |b| {
            Ok(Self {
                node_id: b.string("node_id")?,
                channel: b.string("channel")?,
                value: b.double("value")?,
                bound: b.double(bound_field)?,
            })
        })
    }
}

/// A node/channel pair that read exactly one value over the flatline check's last steps.
#[derive(Debug, Clone, PartialEq)]
pub struct Flatline {
    pub node_id: String,
    pub channel: String,
    pub value: f64,
}

/// Where an event stands in its cell's incident.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IncidentStatus {
    Open,
    Update,
    Close,
}

impl IncidentStatus {
    pub const ALL: [IncidentStatus; 3] = [Self::Open, Self::Update, Self::Close];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Open => "OPEN",
            Self::Update => "UPDATE",
            Self::Close => "CLOSE",
        }
    }

    fn index(self) -> u32 {
        self as u32
    }
}

/// Consecutive anomalous windows of one cell.
#[derive(Debug, Clone, PartialEq)]
pub struct Incident {
    pub incident_id: String,
    pub status: IncidentStatus,
    pub opened_at_ms: i64,
    pub windows: i32,
    pub peak_score: f64,
}

/// A value did not have the shape its reader schema promises.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("field `{field}`: expected {expected}")]
pub struct ShapeError {
    pub field: &'static str,
    pub expected: &'static str,
}

fn shape(field: &'static str, expected: &'static str) -> ShapeError {
    ShapeError { field, expected }
}

/// Field access on an Avro record value.
struct Fields<'a>(&'a [(String, Value)]);

impl<'a> Fields<'a> {
    fn of(value: &'a Value, what: &'static str) -> Result<Self, ShapeError> {
        match value {
            Value::Record(fields) => Ok(Self(fields)),
            _ => Err(shape(what, "a record")),
        }
    }

    fn get(&self, name: &'static str) -> Result<&'a Value, ShapeError> {
        self.0
            .iter()
            .find(|(field, _)| field == name)
            .map(|(_, value)| unwrap_union(value))
            .ok_or(shape(name, "to be present"))
    }

    fn string(&self, name: &'static str) -> Result<String, ShapeError> {
        match self.get(name)? {
            Value::String(s) => Ok(s.clone()),
            _ => Err(shape(name, "a string")),
        }
    }

    fn opt_string(&self, name: &'static str) -> Result<Option<String>, ShapeError> {
        match self.get(name)? {
            Value::Null => Ok(None),
            Value::String(s) => Ok(Some(s.clone())),
            _ => Err(shape(name, "null or a string")),
        }
    }

    fn long(&self, name: &'static str) -> Result<i64, ShapeError> {
        match self.get(name)? {
            Value::Long(v) | Value::TimestampMillis(v) => Ok(*v),
            Value::Int(v) => Ok(i64::from(*v)),
            _ => Err(shape(name, "a long")),
        }
    }

    fn opt_long(&self, name: &'static str) -> Result<Option<i64>, ShapeError> {
        match self.get(name)? {
            Value::Null => Ok(None),
            Value::Long(v) | Value::TimestampMillis(v) => Ok(Some(*v)),
            Value::Int(v) => Ok(Some(i64::from(*v))),
            _ => Err(shape(name, "null or a long")),
        }
    }

    /// As [`Fields::opt_long`], and `None` when the field is absent (data written before the
    /// field was added).
    fn added_long(&self, name: &'static str) -> Result<Option<i64>, ShapeError> {
        if self.get(name).is_err() {
            return Ok(None);
        }
        self.opt_long(name)
    }

    fn opt_double(&self, name: &'static str) -> Result<Option<f64>, ShapeError> {
        match self.get(name)? {
            Value::Null => Ok(None),
            v => as_double(v)
                .map(Some)
                .ok_or(shape(name, "null or a double")),
        }
    }

    fn double(&self, name: &'static str) -> Result<f64, ShapeError> {
        self.opt_double(name)?.ok_or(shape(name, "a double"))
    }

    fn array(&self, name: &'static str) -> Result<&'a [Value], ShapeError> {
        match self.get(name)? {
            Value::Array(items) => Ok(items),
            _ => Err(shape(name, "an array")),
        }
    }

    /// The records of array `name`, each read by `read`; none when the field is absent.
    fn records_or_empty<T>(
        &self,
        name: &'static str,
        read: impl Fn(&Fields<'a>) -> Result<T, ShapeError>,
    ) -> Result<Vec<T>, ShapeError> {
        if self.get(name).is_err() {
            return Ok(Vec::new());
        }
        self.array(name)?
            .iter()
            .map(|item| read(&Fields::of(item, name)?))
            .collect()
    }
}

fn unwrap_union(value: &Value) -> &Value {
    match value {
        Value::Union(_, inner) => inner,
        other => other,
    }
}

fn as_double(value: &Value) -> Option<f64> {
    match value {
        Value::Double(v) => Some(*v),
        Value::Float(v) => Some(f64::from(*v)),
        Value::Long(v) => Some(*v as f64),
        Value::Int(v) => Some(f64::from(*v)),
        _ => None,
    }
}

fn opt_union<T>(value: Option<T>, wrap: impl FnOnce(T) -> Value) -> Value {
    match value {
        None => Value::Union(0, Box::new(Value::Null)),
        Some(v) => Value::Union(1, Box::new(wrap(v))),
    }
}

impl Reading {
    /// Equal field by field, values compared bit for bit (so NaN equals the same NaN): what
    /// two decoders of one datum must agree on.
    pub fn same_bits(&self, other: &Reading) -> bool {
        self.node_id == other.node_id
            && self.event_time_ms == other.event_time_ms
            && self.sequence == other.sequence
            && self.values.len() == other.values.len()
            && self
                .values
                .iter()
                .zip(&other.values)
                .all(|((ka, va), (kb, vb))| ka == kb && va.to_bits() == vb.to_bits())
    }

    pub fn from_value(value: &Value) -> Result<Self, ShapeError> {
        let fields = Fields::of(value, "Reading")?;
        let values = match fields.get("values")? {
            Value::Map(map) => {
                let mut values = map
                    .iter()
                    .map(|(name, v)| {
                        as_double(v)
                            .map(|v| (name.clone(), v))
                            .ok_or(shape("values", "a map of doubles"))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                // Avro maps are unordered; sort so that decoding is deterministic.
                values.sort_by(|a, b| a.0.cmp(&b.0));
                values
            }
            _ => return Err(shape("values", "a map of doubles")),
        };
        Ok(Self {
            node_id: fields.string("node_id")?,
            event_time_ms: fields.long("event_time")?,
            values,
            sequence: fields.opt_long("sequence")?,
        })
    }

    pub fn to_value(&self) -> Value {
        Value::Record(vec![
            ("node_id".into(), Value::String(self.node_id.clone())),
            (
                "event_time".into(),
                Value::TimestampMillis(self.event_time_ms),
            ),
            (
                "values".into(),
                Value::Map(
                    self.values
                        .iter()
                        .map(|(k, v)| (k.clone(), Value::Double(*v)))
                        .collect::<HashMap<_, _>>(),
                ),
            ),
            ("sequence".into(), opt_union(self.sequence, Value::Long)),
        ])
    }
}

/// Converts a `ReadingBatch` value into its readings.
pub fn batch_from_value(value: &Value) -> Result<Vec<Reading>, ShapeError> {
    let fields = Fields::of(value, "ReadingBatch")?;
    fields
        .array("readings")?
        .iter()
        .map(Reading::from_value)
        .collect()
}

/// Builds a `ReadingBatch` value.
pub fn batch_to_value(readings: &[Reading]) -> Value {
    Value::Record(vec![(
        "readings".into(),
        Value::Array(readings.iter().map(Reading::to_value).collect()),
    )])
}

impl SpatialNode {
    pub fn from_value(value: &Value) -> Result<Self, ShapeError> {
        let fields = Fields::of(value, "SpatialNode")?;
        let channels = fields
            .array("channels")?
            .iter()
            .map(|channel| {
                let c = Fields::of(channel, "channels")?;
                Ok(Channel {
                    name: c.string("name")?,
                    unit: c.string("unit")?,
                })
            })
            .collect::<Result<_, ShapeError>>()?;
        Ok(Self {
            node_id: fields.string("node_id")?,
            latitude: fields.opt_double("latitude")?,
            longitude: fields.opt_double("longitude")?,
            x: fields.opt_double("x")?,
            y: fields.opt_double("y")?,
            cell_id: fields.opt_string("cell_id")?,
            kind: fields.string("kind")?,
            channels,
        })
    }

    pub fn to_value(&self) -> Value {
        Value::Record(vec![
            ("node_id".into(), Value::String(self.node_id.clone())),
            ("latitude".into(), opt_union(self.latitude, Value::Double)),
            ("longitude".into(), opt_union(self.longitude, Value::Double)),
            ("x".into(), opt_union(self.x, Value::Double)),
            ("y".into(), opt_union(self.y, Value::Double)),
            (
                "cell_id".into(),
                opt_union(self.cell_id.clone(), Value::String),
            ),
            ("kind".into(), Value::String(self.kind.clone())),
            (
                "channels".into(),
                Value::Array(
                    self.channels
                        .iter()
                        .map(|c| {
                            Value::Record(vec![
                                ("name".into(), Value::String(c.name.clone())),
                                ("unit".into(), Value::String(c.unit.clone())),
                            ])
                        })
                        .collect(),
                ),
            ),
        ])
    }
}

impl AnomalyEvent {
    pub fn to_value(&self) -> Value {
        Value::Record(vec![
            ("event_id".into(), Value::String(self.event_id.clone())),
            ("cell_id".into(), Value::String(self.cell_id.clone())),
            (
                "window_start".into(),
                Value::TimestampMillis(self.window_start_ms),
            ),
            (
                "window_end".into(),
                Value::TimestampMillis(self.window_end_ms),
            ),
            (
                "detected_at".into(),
                Value::TimestampMillis(self.detected_at_ms),
            ),
            ("score".into(), Value::Double(self.score)),
            ("threshold".into(), Value::Double(self.threshold)),
            (
                "severity".into(),
                Value::Enum(self.severity.index(), self.severity.as_str().into()),
            ),
            (
                "contributors".into(),
                Value::Array(
                    self.contributors
                        .iter()
                        .map(|c| {
                            Value::Record(vec![
                                ("node_id".into(), Value::String(c.node_id.clone())),
                                ("channel".into(), Value::String(c.channel.clone())),
                                ("share".into(), Value::Double(c.share)),
                                ("score".into(), Value::Double(c.score)),
                                (
                                    "peak_at".into(),
                                    opt_union(c.peak_at_ms.as_ref(), |&t| {
                                        Value::TimestampMillis(t)
                                    }),
                                ),
                            ])
                        })
                        .collect(),
                ),
            ),
            ("model_name".into(), Value::String(self.model_name.clone())),
            (
                "model_version".into(),
                Value::String(self.model_version.clone()),
            ),
            ("model_hash".into(), Value::String(self.model_hash.clone())),
            (
                "missing_fraction".into(),
                Value::Double(self.missing_fraction),
            ),
            ("node_count".into(), Value::Int(self.node_count)),
            (
                "incident".into(),
                opt_union(self.incident.as_ref(), |i| {
                    Value::Record(vec![
                        ("incident_id".into(), Value::String(i.incident_id.clone())),
                        (
                            "status".into(),
                            Value::Enum(i.status.index(), i.status.as_str().into()),
                        ),
                        ("opened_at".into(), Value::TimestampMillis(i.opened_at_ms)),
                        ("windows".into(), Value::Int(i.windows)),
                        ("peak_score".into(), Value::Double(i.peak_score)),
                    ])
                }),
            ),
            (
                "flatlined".into(),
                Value::Array(
                    self.flatlined
                        .iter()
                        .map(|f| {
                            Value::Record(vec![
                                ("node_id".into(), Value::String(f.node_id.clone())),
                                ("channel".into(), Value::String(f.channel.clone())),
                                ("value".into(), Value::Double(f.value)),
                            ])
                        })
                        .collect(),
                ),
            ),
            (
                "spikes".into(),
                Value::Array(
                    self.spikes
                        .iter()
                        .map(|s| {
                            Value::Record(vec![
                                ("node_id".into(), Value::String(s.node_id.clone())),
                                ("channel".into(), Value::String(s.channel.clone())),
                                ("at".into(), Value::TimestampMillis(s.at_ms)),
                                ("value".into(), Value::Double(s.value)),
                                ("before".into(), Value::Double(s.before)),
                                ("after".into(), Value::Double(s.after)),
                            ])
                        })
                        .collect(),
                ),
            ),
            (
                "diverged".into(),
                Value::Array(
                    self.diverged
                        .iter()
                        .map(|d| {
                            Value::Record(vec![
                                ("node_id".into(), Value::String(d.node_id.clone())),
                                ("channel".into(), Value::String(d.channel.clone())),
                                ("level".into(), Value::Double(d.level)),
                                ("usual".into(), Value::Double(d.usual)),
                                ("deviation".into(), Value::Double(d.deviation)),
                            ])
                        })
                        .collect(),
                ),
            ),
            (
                "below_floor".into(),
                BeyondBound::to_values(&self.below_floor, "floor"),
            ),
            (
                "above_ceiling".into(),
                BeyondBound::to_values(&self.above_ceiling, "ceiling"),
            ),
        ])
    }

    pub fn from_value(value: &Value) -> Result<Self, ShapeError> {
        let fields = Fields::of(value, "AnomalyEvent")?;
        let severity = match fields.get("severity")? {
            Value::Enum(_, symbol) => Severity::ALL
                .into_iter()
                .find(|s| s.as_str() == symbol)
                .ok_or(shape("severity", "a known severity"))?,
            _ => return Err(shape("severity", "an enum")),
        };
        let contributors = fields
            .array("contributors")?
            .iter()
            .map(|c| {
                let c = Fields::of(c, "contributors")?;
                Ok(Contributor {
                    node_id: c.string("node_id")?,
                    channel: c.string("channel")?,
                    share: c.double("share")?,
                    score: c.double("score")?,
                    peak_at_ms: c.added_long("peak_at")?,
                })
            })
            .collect::<Result<_, ShapeError>>()?;
        Ok(Self {
            event_id: fields.string("event_id")?,
            cell_id: fields.string("cell_id")?,
            window_start_ms: fields.long("window_start")?,
            window_end_ms: fields.long("window_end")?,
            detected_at_ms: fields.long("detected_at")?,
            score: fields.double("score")?,
            threshold: fields.double("threshold")?,
            severity,
            contributors,
            model_name: fields.string("model_name")?,
            model_version: fields.string("model_version")?,
            model_hash: fields.string("model_hash")?,
            missing_fraction: fields.double("missing_fraction")?,
            node_count: i32::try_from(fields.long("node_count")?)
                .map_err(|_| shape("node_count", "an int"))?,
            incident: match fields.get("incident") {
                Err(_) | Ok(Value::Null) => None,
                Ok(value) => {
                    let i = Fields::of(value, "incident")?;
                    let status = match i.get("status")? {
                        Value::Enum(_, symbol) => IncidentStatus::ALL
                            .into_iter()
                            .find(|s| s.as_str() == symbol)
                            .ok_or(shape("status", "OPEN, UPDATE or CLOSE"))?,
                        _ => return Err(shape("status", "an enum")),
                    };
                    Some(Incident {
                        incident_id: i.string("incident_id")?,
                        status,
                        opened_at_ms: i.long("opened_at")?,
                        windows: i32::try_from(i.long("windows")?)
                            .map_err(|_| shape("windows", "an int"))?,
                        peak_score: i.double("peak_score")?,
                    })
                }
            },
            // Each absent in events written before its check existed.
            flatlined: fields.records_or_empty("flatlined", |f| {
                Ok(Flatline {
                    node_id: f.string("node_id")?,
                    channel: f.string("channel")?,
                    value: f.double("value")?,
                })
            })?,
            spikes: fields.records_or_empty("spikes", |s| {
                Ok(Spike {
                    node_id: s.string("node_id")?,
                    channel: s.string("channel")?,
                    at_ms: s.long("at")?,
                    value: s.double("value")?,
                    before: s.double("before")?,
                    after: s.double("after")?,
                })
            })?,
            diverged: fields.records_or_empty("diverged", |d| {
                Ok(Diverged {
                    node_id: d.string("node_id")?,
                    channel: d.string("channel")?,
                    level: d.double("level")?,
                    usual: d.double("usual")?,
                    deviation: d.double("deviation")?,
                })
            })?,
            below_floor: BeyondBound::from_values(&fields, "below_floor", "floor")?,
            above_ceiling: BeyondBound::from_values(&fields, "above_ceiling", "ceiling")?,
        })
    }
}
