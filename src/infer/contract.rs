//! The model contract: the metadata file next to each `.onnx` that says what the model takes,
//! returns and means. Written by `scripts/train_model.py`; checked here before a model is used.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::InferError;

/// One named tensor of the model's interface; dimensions are numbers or symbolic names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<Dim>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Dim {
    Fixed(i64),
    Symbolic(String),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChannelSpec {
    pub name: String,
    pub unit: String,
    pub mean: f64,
    pub std: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    /// Mean squared forecast error per channel on normal data; divides squared errors.
    pub error_scale: Vec<f64>,
    /// Calibrated score threshold.
    pub threshold: f64,
    #[serde(default)]
    pub score_quantiles: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    pub windows: u64,
    #[serde(default)]
    pub rule: String,
}

/// Everything the pipeline needs to know about one model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelContract {
    pub name: String,
    pub version: String,
    pub onnx_file: String,
    pub onnx_sha256: String,
    #[serde(default)]
    pub family: String,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    pub cadence_ms: i64,
    pub window_steps: usize,
    pub scored_steps: usize,
    pub max_nodes: usize,
    pub channels: Vec<ChannelSpec>,
    pub calibration: Calibration,
    #[serde(default)]
    pub scoring: String,
    #[serde(default)]
    pub architecture: serde_json::Value,
    #[serde(default)]
    pub training: serde_json::Value,
    /// Where the channel statistics come from.
    #[serde(default)]
    pub standardisation: Standardisation,
}

/// Where a model's channel statistics (`mean`, `std`) come from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Standardisation {
    /// The contract's, for every cell (the streaming path).
    #[default]
    Contract,
    /// Each series standardised with the statistics of its own fit range (`gridwatch eval`'s
    /// protocol for datasets such as SKAB, where every experiment has its own operating point);
    /// the contract's are identity. To stream with such a model, write the site's statistics
    /// into the contract and set this to `contract`.
    PerSeriesFit,
}

/// Names of the model's tensors, in the order gridwatch feeds them.
pub const INPUT_NAMES: [&str; 3] = ["values", "mask", "node_mask"];
pub const OUTPUT_NAME: &str = "reconstruction";

impl ModelContract {
    /// Reads a contract and checks it against itself and against its `.onnx` file's hash.
    /// Returns the contract and the path of the ONNX file.
    pub fn load(path: &Path) -> Result<(Self, PathBuf), InferError> {
        let text = std::fs::read_to_string(path).map_err(|e| InferError::Contract {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        let contract: ModelContract =
            serde_json::from_str(&text).map_err(|e| InferError::Contract {
                path: path.display().to_string(),
                message: e.to_string(),
            })?;
        let onnx = path
            .parent()
            .unwrap_or(Path::new("."))
            .join(&contract.onnx_file);
        contract.check().map_err(|message| InferError::Contract {
            path: path.display().to_string(),
            message,
        })?;
        let bytes = std::fs::read(&onnx).map_err(|e| InferError::Contract {
            path: path.display().to_string(),
            message: format!("cannot read {}: {e}", onnx.display()),
        })?;
        let hash = hex::encode(Sha256::digest(&bytes));
        if hash != contract.onnx_sha256 {
            return Err(InferError::Contract {
                path: path.display().to_string(),
                message: format!(
                    "{} has SHA-256 {hash}, the contract says {}",
                    onnx.display(),
                    contract.onnx_sha256
                ),
            });
        }
        Ok((contract, onnx))
    }

    /// The sha256 of the earlier files of this model that `scripts/reexport_model.py` replaced
    /// with the same weights and the same outputs (`training.reexports[].from_sha256`): state
    /// saved under one of them fits this file too.
    pub fn earlier_hashes(&self) -> impl Iterator<Item = &str> {
        self.training
            .get("reexports")
            .and_then(|r| r.as_array())
            .into_iter()
            .flatten()
            .filter_map(|r| r.get("from_sha256")?.as_str())
    }

    /// Internal consistency: shapes agree with the window geometry and channel list.
    pub fn check(&self) -> Result<(), String> {
        let t = self.window_steps as i64;
        let f = self.channels.len() as i64;
        let window_shape = |spec: &TensorSpec| -> Result<(), String> {
            match spec.shape.as_slice() {
                [
                    Dim::Symbolic(_),
                    Dim::Fixed(st),
                    Dim::Symbolic(_),
                    Dim::Fixed(sf),
                ] if *st == t && *sf == f => Ok(()),
                other => Err(format!(
                    "`{}` has shape {other:?}, expected [batch, {t}, nodes, {f}]",
                    spec.name
                )),
            }
        };
        let names: Vec<&str> = self.inputs.iter().map(|i| i.name.as_str()).collect();
        if names != INPUT_NAMES {
            return Err(format!("inputs are {names:?}, expected {INPUT_NAMES:?}"));
        }
        window_shape(&self.inputs[0])?;
        window_shape(&self.inputs[1])?;
        match self.inputs[2].shape.as_slice() {
            [Dim::Symbolic(_), Dim::Symbolic(_)] => {}
            other => {
                return Err(format!(
                    "`node_mask` has shape {other:?}, expected [batch, nodes]"
                ));
            }
        }
        match self.outputs.as_slice() {
            [out] if out.name == OUTPUT_NAME => window_shape(out)?,
            other => {
                return Err(format!(
                    "outputs are {other:?}, expected one `{OUTPUT_NAME}`"
                ));
            }
        }
        if self.scored_steps == 0 || self.scored_steps > self.window_steps {
            return Err(format!(
                "scored_steps {} must be within 1..={}",
                self.scored_steps, self.window_steps
            ));
        }
        if self.cadence_ms <= 0 || self.max_nodes == 0 || self.channels.is_empty() {
            return Err("cadence_ms, max_nodes and channels must be positive/non-empty".into());
        }
        if self
            .channels
            .iter()
            .any(|c| !positive(c.std) || !c.mean.is_finite())
        {
            return Err("every channel needs a finite mean and a positive std".into());
        }
        if self.calibration.error_scale.len() != self.channels.len()
            || self.calibration.error_scale.iter().any(|&s| !positive(s))
        {
            return Err("calibration.error_scale needs one positive value per channel".into());
        }
        if !positive(self.calibration.threshold) {
            return Err("calibration.threshold must be positive".into());
        }
        Ok(())
    }

    /// Whether `next` can replace this model in a running pipeline: the assembler's windows
    /// (cadence, length, hop, channels) must fit it unchanged.
    pub fn compatible_with(&self, next: &ModelContract) -> Result<(), String> {
        let names = |c: &ModelContract| {
            c.channels
                .iter()
                .map(|ch| ch.name.clone())
                .collect::<Vec<_>>()
        };
        if self.cadence_ms != next.cadence_ms
            || self.window_steps != next.window_steps
            || self.scored_steps != next.scored_steps
        {
            return Err(format!(
                "window geometry changed (cadence {} -> {} ms, steps {} -> {}, scored {} -> {}); restart gridwatch to use it",
                self.cadence_ms,
                next.cadence_ms,
                self.window_steps,
                next.window_steps,
                self.scored_steps,
                next.scored_steps
            ));
        }
        if names(self) != names(next) {
            return Err(format!(
                "channels changed ({:?} -> {:?}); restart gridwatch to use it",
                names(self),
                names(next)
            ));
        }
        if next.max_nodes < self.max_nodes {
            return Err(format!(
                "max_nodes shrank ({} -> {}); cells may already hold more nodes",
                self.max_nodes, next.max_nodes
            ));
        }
        Ok(())
    }

    /// `name/version`, as events and logs show it.
    pub fn label(&self) -> String {
        format!("{}/{}", self.name, self.version)
    }
}

/// Greater than zero; false for NaN.
fn positive(x: f64) -> bool {
    x > 0.0
}
