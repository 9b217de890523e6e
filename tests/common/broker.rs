//! Real processes for the broker tests: a tansu broker on a free loopback port and `gridwatch
//! run` instances, each started and stopped by PID.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};

/// The tansu binary: `GRIDWATCH_TANSU`, else where `scripts/install-tansu.sh` puts it.
pub fn tansu_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("GRIDWATCH_TANSU") {
        return path.into();
    }
    let tools = std::env::var_os("GRIDWATCH_TOOLS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".local/share/gridwatch")
        });
    let path = tools.join("tansu-0.6.0/bin/tansu");
    assert!(
        path.exists(),
        "tansu is not installed at {}: run scripts/install-tansu.sh (scripts/test.sh does)",
        path.display()
    );
    path
}

/// A directory for one test's logs and configuration, kept after the run for inspection.
pub fn work_dir(test: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("broker-tests")
        .join(test);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("work dir");
    dir
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

fn signal(child: &Child, signal: i32) {
    // SAFETY: kill(2) on the PID of a child we own and have not reaped.
    unsafe {
        libc::kill(child.id() as libc::pid_t, signal);
    }
}

/// A tansu broker process. Killed when dropped.
pub struct Tansu {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
    storage: &'static str,
}

impl Tansu {
    /// A broker with in-memory storage: fast, and empty after a restart.
    pub fn start(dir: &Path) -> Self {
        Self::start_with(dir, "memory://tansu/")
    }

    /// A broker storing its log in SQLite (`dir/tansu.db`): topics, records and committed
    /// offsets survive a restart.
    pub fn start_persistent(dir: &Path) -> Self {
        Self::start_with(dir, "sqlite://tansu.db")
    }

    fn start_with(dir: &Path, storage: &'static str) -> Self {
        let mut tansu = Self {
            child: None,
            port: free_port(),
            dir: dir.to_owned(),
            storage,
        };
        tansu.spawn();
        tansu
    }

    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) {
        let url = format!("tcp://{}", self.bootstrap());
        let log_path = self.dir.join("tansu.log");
        let log = File::options()
            .create(true)
            .append(true)
            .open(&log_path)
            .expect("tansu log");
        let child = Command::new(tansu_binary())
            .args(["broker", "--listener-url", &url])
            .args(["--advertised-listener-url", &url])
            .args(["--storage-engine", self.storage])
            .current_dir(&self.dir)
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start tansu");
        self.child = Some(child);
        let consumer: BaseConsumer = super::client(&self.bootstrap())
            .set("group.id", "probe")
            .create()
            .expect("probe client");
        let deadline = Instant::now() + Duration::from_secs(30);
        while consumer
            .fetch_metadata(None, Duration::from_secs(1))
            .is_err()
        {
            assert!(
                Instant::now() < deadline,
                "tansu did not answer within 30 s; see {}",
                log_path.display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGKILL, then wait for the process (in-memory storage loses everything).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(&child, libc::SIGKILL);
            let _ = child.wait();
        }
    }

    /// A new broker process on the same port and storage.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    pub async fn create_topic(&self, name: &str, partitions: i32, compacted: bool) {
        let admin: AdminClient<DefaultClientContext> = super::client(&self.bootstrap())
            .create()
            .expect("admin client");
        let mut topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
        if compacted {
            topic = topic.set("cleanup.policy", "compact");
        }
        let results = admin
            .create_topics([&topic], &AdminOptions::new())
            .await
            .expect("create topics");
        for result in results {
            result.unwrap_or_else(|(topic, error)| panic!("create topic {topic}: {error}"));
        }
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One `gridwatch run` process. Killed when dropped.
pub struct Gridwatch {
    child: Option<Child>,
    pub log: PathBuf,
    /// How the process ended, once it has.
    exited: Option<ExitStatus>,
}

impl Gridwatch {
    /// Starts `gridwatch run --config config`, logging to `dir/name.log` (appended), with
    /// gridwatch's debug lines (every acknowledged event, every rejected reading).
    pub fn start(config: &Path, dir: &Path, name: &str) -> Self {
        Self::start_logging(config, dir, name, "info,ort=warn,gridwatch=debug")
    }

    /// [`Gridwatch::start`] with a log filter of its own.
    pub fn start_logging(config: &Path, dir: &Path, name: &str, filter: &str) -> Self {
        let log_path = dir.join(format!("{name}.log"));
        let log = File::options()
            .create(true)
            .append(true)
            .open(&log_path)
            .expect("gridwatch log");
        let child = Command::new(env!("CARGO_BIN_EXE_gridwatch"))
            .arg("run")
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", filter)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start gridwatch");
        Self {
            child: Some(child),
            log: log_path,
            exited: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        let Some(child) = self.child.as_mut() else {
            return false;
        };
        match child.try_wait().expect("try_wait") {
            None => true,
            Some(status) => {
                self.exited = Some(status);
                false
            }
        }
    }

    /// `kill -9`: no drain, no commit, no goodbye to the group.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(&child, libc::SIGKILL);
            let _ = child.wait();
        }
    }

    /// SIGTERM, then waits up to `timeout` for the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        signal(&child, libc::SIGTERM);
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                return status;
            }
            if Instant::now() > deadline {
                signal(&child, libc::SIGKILL);
                let _ = child.wait();
                panic!(
                    "gridwatch did not stop within {timeout:?}; see {}",
                    self.log.display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Resident set size now and at its peak, in bytes (from /proc).
    pub fn rss(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("process status");
        let field = |name: &str| -> u64 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
                .expect("VmRSS/VmHWM")
                * 1024
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    /// The address of the admin endpoints, from the log line that announces it.
    pub fn admin_address(&self) -> Option<String> {
        let log = std::fs::read_to_string(&self.log).ok()?;
        let line = log
            .lines()
            .rev()
            .map(strip_ansi)
            .find(|l| l.contains("Admin endpoints listening"))?;
        let at = line.find("address=")? + "address=".len();
        Some(line[at..].split_whitespace().next()?.to_owned())
    }

    /// The whole HTTP response of one admin endpoint.
    fn get(&self, path: &str) -> Option<String> {
        use std::io::{Read, Write};
        let address = self.admin_address()?;
        let mut stream = std::net::TcpStream::connect(address).ok()?;
        write!(stream, "GET {path} HTTP/1.0\r\n\r\n").ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).ok()?;
        Some(response)
    }

    /// The HTTP status of one admin endpoint (`/readyz`, `/healthz`).
    pub fn http_status(&self, path: &str) -> Option<u16> {
        self.get(path)?.split_whitespace().nth(1)?.parse().ok()
    }

    /// The value of one metric line of `/metrics` (the first whose name and labels start
    /// with `prefix`).
    pub fn metric(&self, prefix: &str) -> Option<f64> {
        self.get("/metrics")?
            .lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
    }

    /// The last `lines` lines of the log, for failure messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let Ok(file) = File::open(&self.log) else {
            return String::new();
        };
        let all: Vec<String> = BufReader::new(file).lines().map_while(Result::ok).collect();
        let tail = all[all.len().saturating_sub(lines)..]
            .iter()
            .map(|l| strip_ansi(l))
            .collect::<Vec<_>>()
            .join("\n");
        match self.exited {
            Some(status) => format!("{tail}\n(exited: {status})"),
            None => tail,
        }
    }
}

impl Drop for Gridwatch {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A log line without its terminal colour codes.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // ESC [ … m
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
