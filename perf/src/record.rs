//! Result records: one JSON object per measurement, appended to `records.jsonl` as soon as it is
//! taken, so an interrupted run keeps what it measured.

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::sys::Machine;

/// File name of the records in a results directory.
pub const RECORDS: &str = "records.jsonl";

/// Outcome of one measurement.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Measured.
    Ok,
    /// The backend or path cannot run here (e.g. the daemon refuses the mode); `error` says why.
    Unavailable,
    /// Something broke during the measurement; `error` says what.
    Failed,
}

/// One measurement.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Record {
    /// Scenario: vmless, guest-tcp, idle, scale.
    pub scenario: String,
    /// What was measured within the scenario (e.g. "throughput", "ndr", "tcp", "ping",
    /// "idle", "memory", "queues").
    pub test: String,
    /// Backend or path under test (e.g. "vhost-pump-tap", "dpdk-vhost-tap", "qemu-tap").
    pub backend: String,
    /// "guest-tx" (guest → host), "guest-rx" (host → guest) or "-".
    pub direction: String,
    /// Frame size in bytes including the 4-byte FCS (RFC 2544 convention); 0 if not applicable.
    pub frame_size: u32,
    /// Queue pairs.
    pub queues: u32,
    /// Ports (vhost-user devices) involved.
    pub ports: u32,
    /// TCP streams (guest-tcp), else 0.
    pub streams: u32,
    /// Measurement window in seconds.
    pub duration_s: f64,
    /// Outcome.
    pub status: Status,
    /// Why it is not `ok`.
    pub error: Option<String>,
    /// Figures: mpps, gbps, loss_pct, offered_mpps, backend_cpu_pct, cycles_per_packet,
    /// ndr_mpps, rtt_p50_us, rtt_p99_us, wakeups_per_s, rss_kib_per_port, ...
    pub metrics: BTreeMap<String, f64>,
    /// Anything else worth keeping (e.g. NDR trials).
    #[serde(default)]
    pub extra: serde_json::Value,
    /// The commands that set up and ran this measurement, in order.
    pub commands: Vec<String>,
    /// Where it ran.
    pub machine: Machine,
    /// Unix time (seconds) when recorded.
    pub timestamp: u64,
}

impl Record {
    /// A record with the identifying fields set and everything else empty.
    pub fn new(scenario: &str, test: &str, backend: &str, direction: &str) -> Record {
        Record {
            scenario: scenario.into(),
            test: test.into(),
            backend: backend.into(),
            direction: direction.into(),
            frame_size: 0,
            queues: 1,
            ports: 1,
            streams: 0,
            duration_s: 0.0,
            status: Status::Ok,
            error: None,
            metrics: BTreeMap::new(),
            extra: serde_json::Value::Null,
            commands: Vec::new(),
            machine: Machine::default(),
            timestamp: 0,
        }
    }

    /// Sets a metric (non-finite values are left out).
    pub fn metric(&mut self, key: &str, v: f64) -> &mut Self {
        if v.is_finite() {
            self.metrics.insert(key.into(), v);
        }
        self
    }

    /// A metric's value.
    pub fn get(&self, key: &str) -> Option<f64> {
        self.metrics.get(key).copied()
    }

    /// Marks the record failed or unavailable.
    pub fn fail(&mut self, status: Status, why: impl Into<String>) -> &mut Self {
        self.status = status;
        self.error = Some(why.into());
        self
    }
}

/// Appends records to `DIR/records.jsonl`.
pub struct Sink {
    path: PathBuf,
    machine: Machine,
    /// Records written so far in this run.
    pub written: Vec<Record>,
}

impl Sink {
    /// Opens (creates) the records file in `dir`.
    pub fn new(dir: &Path, machine: Machine) -> Result<Sink> {
        fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        Ok(Sink {
            path: dir.join(RECORDS),
            machine,
            written: Vec::new(),
        })
    }

    /// Stamps `r` with the machine and time and appends it.
    pub fn push(&mut self, mut r: Record) -> Result<()> {
        r.machine = self.machine.clone();
        r.timestamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .with_context(|| format!("open {}", self.path.display()))?;
        writeln!(f, "{}", serde_json::to_string(&r)?)?;
        self.written.push(r);
        Ok(())
    }
}

/// Reads all records of a results directory.
pub fn load(dir: &Path) -> Result<Vec<Record>> {
    let path = dir.join(RECORDS);
    let text = fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l).with_context(|| format!("{}:{}", path.display(), i + 1))
        })
        .collect()
}
