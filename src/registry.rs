//! registry: the live table of spatial nodes, node → cell.
//!
//! Invariant: the table is the fold of the whole compacted spatial-node topic in offset order
//! per partition: the latest record of a node wins, a tombstone (null payload) removes it.
//! Every instance reads every partition of that topic itself (plain `assign`, not the consumer
//! group), so each instance knows every node whatever readings it is assigned. A node's cell is
//! its explicit `cell_id` when given, else the H3 cell of its coordinates at the configured
//! resolution; a node with neither is refused (logged and counted), never guessed.

use std::sync::Arc;

use dashmap::DashMap;
use rdkafka::Message;
use rdkafka::message::BorrowedMessage;

use crate::FastHash;
use crate::schema::{Codec, CodecError, RecordKind, ShapeError, SpatialNode, WireFormat};
use crate::table::Table;
use crate::telemetry;

/// What the pipeline needs to know about a node.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeInfo {
    pub node_id: Arc<str>,
    pub cell: Arc<str>,
    pub kind: String,
}

/// A node record that cannot be placed in a cell.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RegistryError {
    #[error("node record does not decode: {0}")]
    Codec(#[from] CodecError),
    #[error("node record has the wrong shape: {0}")]
    Shape(#[from] ShapeError),
    #[error("node `{0}` has neither a cell id nor coordinates")]
    NoLocation(String),
    #[error("node `{node}` has invalid coordinates ({lat}, {lon})")]
    BadCoordinates { node: String, lat: f64, lon: f64 },
    #[error("record key `{key}` differs from its node id `{node}`")]
    KeyMismatch { key: String, node: String },
}

/// Places a node in its cell: the explicit cell id, else the H3 cell of its coordinates.
pub fn cell_of(node: &SpatialNode, resolution: h3o::Resolution) -> Result<String, RegistryError> {
    if let Some(cell) = node.cell_id.as_ref().filter(|c| !c.is_empty()) {
        return Ok(cell.clone());
    }
    match (node.latitude, node.longitude) {
        (Some(lat), Some(lon)) => {
            let point = h3o::LatLng::new(lat, lon).map_err(|_| RegistryError::BadCoordinates {
                node: node.node_id.clone(),
                lat,
                lon,
            })?;
            Ok(point.to_cell(resolution).to_string())
        }
        _ => Err(RegistryError::NoLocation(node.node_id.clone())),
    }
}

/// The node table, shared by every stage that needs it.
pub struct Registry {
    nodes: DashMap<Arc<str>, Arc<NodeInfo>, FastHash>,
    resolution: h3o::Resolution,
    codec: Codec,
}

impl Registry {
    pub fn new(resolution: h3o::Resolution, format: WireFormat) -> Self {
        Self {
            nodes: DashMap::with_hasher(FastHash::default()),
            resolution,
            codec: Codec::new(RecordKind::SpatialNode, format),
        }
    }

    /// The node's entry, if the node is known.
    pub fn lookup(&self, node_id: &str) -> Option<Arc<NodeInfo>> {
        self.nodes
            .get(node_id)
            .map(|entry| Arc::clone(entry.value()))
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Applies one record of the spatial-node topic. A null payload removes the node named by
    /// the key.
    pub fn apply(&self, key: Option<&[u8]>, payload: Option<&[u8]>) -> Result<(), RegistryError> {
        let key = key.map(|k| String::from_utf8_lossy(k).into_owned());
        let Some(payload) = payload else {
            if let Some(key) = key {
                self.nodes.remove(key.as_str());
            }
            return Ok(());
        };
        let node = SpatialNode::from_value(&self.codec.decode(payload)?)?;
        if let Some(key) = key.filter(|k| *k != node.node_id) {
            return Err(RegistryError::KeyMismatch {
                key,
                node: node.node_id,
            });
        }
        self.upsert(&node)
    }

    /// Adds or replaces a node.
    pub fn upsert(&self, node: &SpatialNode) -> Result<(), RegistryError> {
        let cell = cell_of(node, self.resolution)?;
        let id: Arc<str> = Arc::from(node.node_id.as_str());
        let info = NodeInfo {
            node_id: Arc::clone(&id),
            cell: Arc::from(cell),
            kind: node.kind.clone(),
        };
        self.nodes.insert(id, Arc::new(info));
        Ok(())
    }
}

/// The registry is the fold of the spatial-node topic ([`crate::table`]).
impl Table for Registry {
    fn apply(&self, message: &BorrowedMessage<'_>) {
        if let Err(error) = Registry::apply(self, message.key(), message.payload()) {
            telemetry::node_record_rejected(message.partition(), message.offset(), &error);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::{Channel, write_datum};

    fn res() -> h3o::Resolution {
        h3o::Resolution::try_from(8).unwrap()
    }

    fn node(id: &str) -> SpatialNode {
        SpatialNode {
            node_id: id.into(),
            kind: "pump".into(),
            channels: vec![Channel {
                name: "current".into(),
                unit: "A".into(),
            }],
            ..SpatialNode::default()
        }
    }

    fn bytes(n: &SpatialNode) -> Vec<u8> {
        write_datum(RecordKind::SpatialNode.schema(), &n.to_value()).unwrap()
    }

    #[test]
    fn explicit_cell_wins_over_coordinates() {
        let mut n = node("a");
        n.cell_id = Some("line-1".into());
        n.latitude = Some(34.05);
        n.longitude = Some(-118.25);
        assert_eq!(cell_of(&n, res()).unwrap(), "line-1");
    }

    #[test]
    fn coordinates_map_to_the_h3_cell() {
        let mut n = node("a");
        n.latitude = Some(34.05);
        n.longitude = Some(-118.25);
        let cell = cell_of(&n, res()).unwrap();
        let expected = h3o::LatLng::new(34.05, -118.25).unwrap().to_cell(res());
        assert_eq!(cell, expected.to_string());
        // A neighbour a few metres away shares the cell; one 5 km away does not.
        n.latitude = Some(34.05001);
        assert_eq!(cell_of(&n, res()).unwrap(), cell);
        n.latitude = Some(34.10);
        assert_ne!(cell_of(&n, res()).unwrap(), cell);
    }

    #[test]
    fn nodes_without_location_or_with_bad_coordinates_are_refused() {
        assert!(matches!(
            cell_of(&node("a"), res()),
            Err(RegistryError::NoLocation(_))
        ));
        let mut n = node("a");
        n.latitude = Some(f64::NAN);
        n.longitude = Some(0.0);
        assert!(matches!(
            cell_of(&n, res()),
            Err(RegistryError::BadCoordinates { .. })
        ));
    }

    #[test]
    fn records_and_tombstones_update_the_table() {
        let registry = Registry::new(res(), WireFormat::Plain);
        let mut n = node("pump-1");
        n.cell_id = Some("line-1".into());
        registry.apply(Some(b"pump-1"), Some(&bytes(&n))).unwrap();
        assert_eq!(&*registry.lookup("pump-1").unwrap().cell, "line-1");
        // A later record moves the node.
        n.cell_id = Some("line-2".into());
        registry.apply(Some(b"pump-1"), Some(&bytes(&n))).unwrap();
        assert_eq!(&*registry.lookup("pump-1").unwrap().cell, "line-2");
        // The tombstone removes it.
        registry.apply(Some(b"pump-1"), None).unwrap();
        assert!(registry.lookup("pump-1").is_none());
        assert!(registry.is_empty());
    }

    #[test]
    fn bad_records_are_errors_and_change_nothing() {
        let registry = Registry::new(res(), WireFormat::Plain);
        assert!(registry.apply(Some(b"x"), Some(&[1, 2, 3])).is_err());
        assert!(registry.apply(Some(b"x"), Some(&[])).is_err());
        let mut n = node("pump-1");
        n.cell_id = Some("line-1".into());
        assert!(matches!(
            registry.apply(Some(b"other"), Some(&bytes(&n))),
            Err(RegistryError::KeyMismatch { .. })
        ));
        assert!(registry.is_empty());
    }
}
