//! The labelled datasets `gridwatch eval` reads: readings, node metadata and labels as CSV (or
//! labels as JSON), in the formats docs/eval.md documents.
//!
//! Invariants:
//! - A series is one readings file. Its rows are its distinct timestamps in increasing order;
//!   every value is `[row × node × channel]` in the model's channel order, NaN where nothing
//!   (or something unparsable, or non-finite) was read — a missing value, never a zero.
//! - Every column of a readings file is accounted for: the time, the node id, the label, a
//!   model channel, `NODE:CHANNEL`, a node of a single-channel model, or a column the user
//!   named to ignore. Anything else is an error that names it, not silently dropped data.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

/// How to read the readings files.
#[derive(Debug, Clone, Default)]
pub struct Format {
    /// Field separator; `None`: `;` if the header has more of them than `,`.
    pub delimiter: Option<u8>,
    /// Time column; `None`: the first of `ts_ms`, `timestamp`, `datetime`, `time`, or none
    /// (row `i` is then at `start_ms + i · cadence_ms`).
    pub time_column: Option<String>,
    pub cadence_ms: i64,
    pub start_ms: i64,
    /// Long format: the column holding the node id (one row per node and time).
    pub node_column: Option<String>,
    /// Wide format: the node id of columns named after a model channel.
    pub node_id: String,
    /// Per-row 0/1 anomaly label.
    pub label_column: Option<String>,
    pub ignore_columns: Vec<String>,
    /// The model's channels, in order.
    pub channels: Vec<String>,
}

/// One readings file.
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub path: PathBuf,
    pub nodes: Vec<String>,
    pub channels: usize,
    pub times_ms: Vec<i64>,
    /// `[rows × nodes × channels]`, NaN where missing.
    pub values: Vec<f64>,
    pub row_labels: Option<Vec<bool>>,
}

impl Series {
    pub fn rows(&self) -> usize {
        self.times_ms.len()
    }

    pub fn value(&self, row: usize, node: usize, channel: usize) -> f64 {
        self.values[(row * self.nodes.len() + node) * self.channels + channel]
    }
}

/// `files` and directories (every `*.csv` below them), sorted, without duplicates.
pub fn expand_inputs(inputs: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
        for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                walk(&path, out)?;
            } else if path.extension().is_some_and(|e| e == "csv") {
                out.push(path);
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    for input in inputs {
        if input.is_dir() {
            walk(input, &mut out)?;
        } else if input.exists() {
            out.push(input.clone());
        } else {
            bail!("{}: no such file or directory", input.display());
        }
    }
    out.sort();
    out.dedup();
    if out.is_empty() {
        bail!("no CSV files in {inputs:?}");
    }
    Ok(out)
}

/// A short, unique-enough name for a file: its parent directory and stem (`valve1/3`).
pub fn series_name(path: &Path) -> String {
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned());
    let parent = path
        .parent()
        .and_then(|p| p.file_name())
        .map(|s| s.to_string_lossy().into_owned());
    match (parent, stem) {
        (Some(p), Some(s)) => format!("{p}/{s}"),
        (None, Some(s)) => s,
        _ => path.display().to_string(),
    }
}

fn sniff_delimiter(path: &Path) -> anyhow::Result<u8> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let header = text.lines().next().unwrap_or("");
    Ok(
        if header.matches(';').count() > header.matches(',').count() {
            b';'
        } else {
            b','
        },
    )
}

fn reader(path: &Path, delimiter: Option<u8>) -> anyhow::Result<csv::Reader<std::fs::File>> {
    let delimiter = match delimiter {
        Some(d) => d,
        None => sniff_delimiter(path)?,
    };
    csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .trim(csv::Trim::All)
        .flexible(false)
        .from_path(path)
        .with_context(|| format!("opening {}", path.display()))
}

/// Milliseconds since the epoch of a time field: an integer (milliseconds) or an RFC 3339-like
/// date-time, `T` or space separated, UTC when no offset is given.
pub fn parse_time(field: &str) -> Option<i64> {
    let field = field.trim();
    if let Ok(ms) = field.parse::<i64>() {
        return Some(ms);
    }
    let time = humantime::parse_rfc3339_weak(field).ok()?;
    let since = time.duration_since(std::time::UNIX_EPOCH).ok()?;
    i64::try_from(since.as_millis()).ok()
}

fn parse_value(field: &str) -> f64 {
    field
        .trim()
        .parse::<f64>()
        .ok()
        .filter(|v| v.is_finite())
        .unwrap_or(f64::NAN)
}

fn parse_label(field: &str) -> bool {
    let value = parse_value(field);
    value.is_finite() && value != 0.0
}

/// What one column of a readings file is.
#[derive(Debug, Clone, PartialEq)]
enum Column {
    Time,
    Node,
    Label,
    Ignored,
    /// (node, channel index); node `None` in long format (the row's node).
    Value(Option<String>, usize),
}

fn classify(header: &[String], format: &Format, path: &Path) -> anyhow::Result<Vec<Column>> {
    let time = match &format.time_column {
        Some(name) => {
            if !header.contains(name) {
                bail!(
                    "{}: no time column `{name}` (columns: {header:?})",
                    path.display()
                );
            }
            Some(name.clone())
        }
        None => ["ts_ms", "timestamp", "datetime", "time"]
            .iter()
            .find(|c| header.iter().any(|h| h == *c))
            .map(|c| c.to_string()),
    };
    let channel = |name: &str| format.channels.iter().position(|c| c == name);
    let mut columns = Vec::with_capacity(header.len());
    let mut unknown = Vec::new();
    for name in header {
        let column = if Some(name) == time.as_ref() {
            Column::Time
        } else if Some(name) == format.node_column.as_ref() {
            Column::Node
        } else if Some(name) == format.label_column.as_ref() {
            Column::Label
        } else if format.ignore_columns.contains(name) {
            Column::Ignored
        } else if let Some(c) = channel(name) {
            let node = format.node_column.is_none().then(|| format.node_id.clone());
            Column::Value(node, c)
        } else if let Some((node, c)) = name
            .rsplit_once(':')
            .and_then(|(n, ch)| channel(ch).map(|c| (n, c)))
            .filter(|_| format.node_column.is_none())
        {
            Column::Value(Some(node.to_string()), c)
        } else if format.channels.len() == 1 && format.node_column.is_none() {
            Column::Value(Some(name.clone()), 0)
        } else {
            unknown.push(name.clone());
            Column::Ignored
        };
        columns.push(column);
    }
    if !unknown.is_empty() {
        bail!(
            "{}: columns {unknown:?} are not the time, node or label column, a model channel \
             ({:?}) or NODE:CHANNEL; name them with --ignore-columns to skip them",
            path.display(),
            format.channels
        );
    }
    if format.label_column.is_some() && !columns.contains(&Column::Label) {
        bail!(
            "{}: no label column `{}`",
            path.display(),
            format.label_column.as_deref().unwrap_or_default()
        );
    }
    if format.node_column.is_some() && !columns.contains(&Column::Node) {
        bail!(
            "{}: no node column `{}`",
            path.display(),
            format.node_column.as_deref().unwrap_or_default()
        );
    }
    if !columns.iter().any(|c| matches!(c, Column::Value(..))) {
        bail!(
            "{}: no column holds a model channel ({:?})",
            path.display(),
            format.channels
        );
    }
    Ok(columns)
}

/// Reads one readings file.
pub fn load_series(path: &Path, format: &Format) -> anyhow::Result<Series> {
    let mut rdr = reader(path, format.delimiter)?;
    let header: Vec<String> = rdr
        .headers()
        .with_context(|| format!("{}: reading the header", path.display()))?
        .iter()
        .map(str::to_string)
        .collect();
    let columns = classify(&header, format, path)?;
    let has_time = columns.contains(&Column::Time);
    let f = format.channels.len();

    // (time, node, channel, value) and per-time labels, then laid out.
    let mut node_index: HashMap<String, usize> = HashMap::new();
    let mut nodes: Vec<String> = Vec::new();
    let mut node_of = |name: &str, nodes: &mut Vec<String>| -> usize {
        *node_index.entry(name.to_string()).or_insert_with(|| {
            nodes.push(name.to_string());
            nodes.len() - 1
        })
    };
    let mut cells: Vec<(i64, usize, usize, f64)> = Vec::new();
    let mut labels: BTreeMap<i64, bool> = BTreeMap::new();
    let mut times: BTreeMap<i64, ()> = BTreeMap::new();
    for (i, record) in rdr.records().enumerate() {
        let line = i + 2;
        let record = record.with_context(|| format!("{}: line {line}", path.display()))?;
        let mut time = format.start_ms + i as i64 * format.cadence_ms;
        let mut row_node = None;
        for (column, field) in columns.iter().zip(record.iter()) {
            match column {
                Column::Time => {
                    time = parse_time(field).with_context(|| {
                        format!("{}: line {line}: unreadable time `{field}`", path.display())
                    })?;
                }
                Column::Node => row_node = Some(node_of(field, &mut nodes)),
                _ => {}
            }
        }
        if !has_time && format.node_column.is_some() {
            bail!(
                "{}: long format (--node-column) needs a time column",
                path.display()
            );
        }
        times.insert(time, ());
        for (column, field) in columns.iter().zip(record.iter()) {
            match column {
                Column::Label => {
                    *labels.entry(time).or_default() |= parse_label(field);
                }
                Column::Value(node, c) => {
                    let n = match node {
                        Some(name) => node_of(name, &mut nodes),
                        None => row_node.expect("long format rows have a node column"),
                    };
                    cells.push((time, n, *c, parse_value(field)));
                }
                _ => {}
            }
        }
    }
    let times_ms: Vec<i64> = times.into_keys().collect();
    let row_of: HashMap<i64, usize> = times_ms.iter().enumerate().map(|(i, &t)| (t, i)).collect();
    let n = nodes.len();
    let mut values = vec![f64::NAN; times_ms.len() * n * f];
    for (time, node, channel, value) in cells {
        if value.is_finite() {
            values[(row_of[&time] * n + node) * f + channel] = value;
        }
    }
    let row_labels = format.label_column.as_ref().map(|_| {
        times_ms
            .iter()
            .map(|t| labels.get(t).copied().unwrap_or(false))
            .collect()
    });
    Ok(Series {
        name: series_name(path),
        path: path.to_path_buf(),
        nodes,
        channels: f,
        times_ms,
        values,
        row_labels,
    })
}

/// Where a node is: an explicit cell, or coordinates.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeInfo {
    pub cell: Option<String>,
    pub latitude: Option<f64>,
    pub longitude: Option<f64>,
}

/// Reads node metadata: a CSV with a node id column (`node_id`, `sensor_id` or `id`), and
/// `lat`/`latitude` and `lon`/`lng`/`longitude`, or `cell`/`cell_id`, or both.
pub fn load_nodes(path: &Path) -> anyhow::Result<HashMap<String, NodeInfo>> {
    let mut rdr = reader(path, None)?;
    let header: Vec<String> = rdr.headers()?.iter().map(str::to_string).collect();
    let find = |names: &[&str]| header.iter().position(|h| names.contains(&h.as_str()));
    let id = find(&["node_id", "sensor_id", "id"]).with_context(|| {
        format!(
            "{}: no node id column (node_id, sensor_id or id)",
            path.display()
        )
    })?;
    let lat = find(&["lat", "latitude"]);
    let lon = find(&["lon", "lng", "longitude"]);
    let cell = find(&["cell", "cell_id"]);
    if cell.is_none() && (lat.is_none() || lon.is_none()) {
        bail!(
            "{}: needs a cell column or latitude and longitude columns",
            path.display()
        );
    }
    let mut out = HashMap::new();
    for (i, record) in rdr.records().enumerate() {
        let record = record.with_context(|| format!("{}: line {}", path.display(), i + 2))?;
        let field = |c: Option<usize>| c.and_then(|c| record.get(c)).map(str::to_string);
        let number = |c: Option<usize>| field(c).map(|v| parse_value(&v)).filter(|v| v.is_finite());
        out.insert(
            record.get(id).unwrap_or_default().to_string(),
            NodeInfo {
                cell: field(cell).filter(|c| !c.is_empty()),
                latitude: number(lat),
                longitude: number(lon),
            },
        );
    }
    Ok(out)
}

/// One labelled anomalous range as read, before it is placed on cells.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
pub struct RangeLabel {
    pub start_ms: i64,
    /// Exclusive.
    pub end_ms: i64,
    /// Nodes it concerns; empty: every node of the series.
    #[serde(default)]
    pub nodes: Vec<String>,
    /// Series (file) it concerns, by name (`dir/stem`) or stem; empty: every series.
    #[serde(default)]
    pub series: String,
    /// Kind of anomaly (event recall is also reported per kind); may be empty.
    #[serde(default)]
    pub kind: String,
}

#[derive(serde::Deserialize)]
struct JsonRange {
    start: serde_json::Value,
    end: serde_json::Value,
    #[serde(default)]
    nodes: Vec<String>,
    #[serde(default)]
    series: String,
    #[serde(default)]
    kind: String,
}

fn json_time(v: &serde_json::Value) -> Option<i64> {
    match v {
        serde_json::Value::Number(n) => n.as_i64(),
        serde_json::Value::String(s) => parse_time(s),
        _ => None,
    }
}

/// Reads labelled ranges: a JSON array of `{start, end, nodes?, series?}`, or a CSV with
/// `start`/`start_ms` and `end`/`end_ms` columns and optional `nodes`/`node_ids`
/// (`;`-separated when the file is `,`-separated) and `series`.
pub fn load_ranges(path: &Path) -> anyhow::Result<Vec<RangeLabel>> {
    if path.extension().is_some_and(|e| e == "json") {
        let text = std::fs::read_to_string(path)?;
        let ranges: Vec<JsonRange> = serde_json::from_str(&text).with_context(|| {
            format!(
                "{}: expected a JSON array of {{start, end}}",
                path.display()
            )
        })?;
        return ranges
            .into_iter()
            .enumerate()
            .map(|(i, r)| {
                let (Some(start_ms), Some(end_ms)) = (json_time(&r.start), json_time(&r.end))
                else {
                    bail!("{}: range {i}: unreadable start or end", path.display());
                };
                Ok(RangeLabel {
                    start_ms,
                    end_ms,
                    nodes: r.nodes,
                    series: r.series,
                    kind: r.kind,
                })
            })
            .collect();
    }
    let mut rdr = reader(path, None)?;
    let header: Vec<String> = rdr.headers()?.iter().map(str::to_string).collect();
    let find = |names: &[&str]| header.iter().position(|h| names.contains(&h.as_str()));
    let (Some(start), Some(end)) = (find(&["start", "start_ms"]), find(&["end", "end_ms"])) else {
        bail!(
            "{}: needs start and end columns (got {header:?})",
            path.display()
        );
    };
    let nodes = find(&["nodes", "node_ids", "node_id"]);
    let series = find(&["series"]);
    let kind = find(&["kind"]);
    let mut out = Vec::new();
    for (i, record) in rdr.records().enumerate() {
        let line = i + 2;
        let record = record.with_context(|| format!("{}: line {line}", path.display()))?;
        let time = |c: usize| {
            parse_time(record.get(c).unwrap_or_default())
                .with_context(|| format!("{}: line {line}: unreadable time", path.display()))
        };
        out.push(RangeLabel {
            start_ms: time(start)?,
            end_ms: time(end)?,
            nodes: nodes
                .and_then(|c| record.get(c))
                .map(|s| {
                    s.split([';', ' '])
                        .filter(|n| !n.is_empty())
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default(),
            series: series
                .and_then(|c| record.get(c))
                .unwrap_or_default()
                .to_string(),
            kind: kind
                .and_then(|c| record.get(c))
                .unwrap_or_default()
                .to_string(),
        });
    }
    Ok(out)
}

impl RangeLabel {
    /// Whether this range concerns `series`.
    pub fn applies_to(&self, series: &Series) -> bool {
        self.series.is_empty()
            || self.series == series.name
            || series
                .path
                .file_stem()
                .is_some_and(|s| s.to_string_lossy() == self.series)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    fn format(channels: &[&str]) -> Format {
        Format {
            cadence_ms: 1_000,
            node_id: "pump".into(),
            channels: channels.iter().map(|c| c.to_string()).collect(),
            ..Format::default()
        }
    }

    #[test]
    fn wide_channel_columns_with_labels_and_datetimes() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            &dir,
            "1.csv",
            "datetime;a;b;anomaly;changepoint\n\
             2020-03-09 10:14:34;1.5;;1;0\n\
             2020-03-09 10:14:33;1;2;0;0\n\
             2020-03-09 10:14:35;nan;3;0;1\n",
        );
        let mut f = format(&["a", "b"]);
        f.label_column = Some("anomaly".into());
        let err = load_series(&path, &f).unwrap_err().to_string();
        assert!(err.contains("changepoint"), "{err}");
        f.ignore_columns = vec!["changepoint".into()];
        let s = load_series(&path, &f).unwrap();
        assert_eq!(s.nodes, vec!["pump"]);
        assert_eq!(s.times_ms[0], 1_583_748_873_000);
        assert_eq!(
            s.times_ms,
            vec![s.times_ms[0], s.times_ms[0] + 1_000, s.times_ms[0] + 2_000]
        );
        assert_eq!(s.value(0, 0, 0), 1.0);
        assert_eq!(s.value(1, 0, 0), 1.5);
        assert!(s.value(1, 0, 1).is_nan(), "blank is missing");
        assert!(s.value(2, 0, 0).is_nan(), "NaN is missing");
        assert_eq!(s.row_labels, Some(vec![false, true, false]));
    }

    #[test]
    fn one_column_per_node_without_time() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(&dir, "speed.csv", "773869,767541\n64.3,67.6\n62.6,68.5\n");
        let mut f = format(&["speed"]);
        f.start_ms = 10_000;
        f.cadence_ms = 300_000;
        let s = load_series(&path, &f).unwrap();
        assert_eq!(s.nodes, vec!["773869", "767541"]);
        assert_eq!(s.times_ms, vec![10_000, 310_000]);
        assert_eq!(s.value(1, 1, 0), 68.5);
    }

    #[test]
    fn long_format_and_node_channel_columns() {
        let dir = tempfile::tempdir().unwrap();
        let long = write(
            &dir,
            "long.csv",
            "ts_ms,node_id,a,b\n0,n1,1,2\n0,n2,3,\n1000,n1,5,6\n",
        );
        let mut f = format(&["a", "b"]);
        f.node_column = Some("node_id".into());
        let s = load_series(&long, &f).unwrap();
        assert_eq!(s.nodes, vec!["n1", "n2"]);
        assert_eq!(s.value(0, 1, 0), 3.0);
        assert!(s.value(1, 1, 0).is_nan(), "n2 sent nothing at 1000");
        let wide = write(&dir, "wide.csv", "ts_ms,n1:a,n2:b\n0,1,2\n");
        let s = load_series(&wide, &format(&["a", "b"])).unwrap();
        assert_eq!(s.nodes, vec!["n1", "n2"]);
        assert_eq!(s.value(0, 1, 1), 2.0);
        assert!(s.value(0, 0, 1).is_nan());
    }

    #[test]
    fn ranges_from_csv_and_json() {
        let dir = tempfile::tempdir().unwrap();
        let csv = write(
            &dir,
            "labels.csv",
            "start_ms,end_ms,node_ids,kind\n1000,5000,a;b,incident\n2020-03-09T10:14:33Z,1583748875000,,spike\n",
        );
        let r = load_ranges(&csv).unwrap();
        assert_eq!(r[0].nodes, vec!["a", "b"]);
        assert_eq!(
            (r[1].start_ms, r[1].end_ms),
            (1_583_748_873_000, 1_583_748_875_000)
        );
        assert!(r[1].nodes.is_empty());
        assert_eq!(
            (r[0].kind.as_str(), r[1].kind.as_str()),
            ("incident", "spike")
        );
        let json = write(
            &dir,
            "labels.json",
            r#"[{"start": 1000, "end": "1970-01-01T00:00:05Z", "nodes": ["a"], "series": "x"}]"#,
        );
        let r = load_ranges(&json).unwrap();
        assert_eq!(
            (r[0].start_ms, r[0].end_ms, r[0].series.as_str()),
            (1_000, 5_000, "x")
        );
    }

    #[test]
    fn node_metadata_aliases() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            &dir,
            "n.csv",
            "index,sensor_id,latitude,longitude\n0,773869,34.15,-118.31\n",
        );
        let nodes = load_nodes(&path).unwrap();
        assert_eq!(nodes["773869"].latitude, Some(34.15));
        assert_eq!(nodes["773869"].cell, None);
    }
}
