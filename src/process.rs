//! The child-process seam. Every tool runs in its own process group, and killing a tool means
//! killing the whole group: a wrapper script or a tool that forks cannot leave a descendant
//! behind, nor hold a pipe open. Stderr is kept as a bounded, redacted tail, and collected for a
//! bounded time only after an exit or a kill (a descendant holding the pipe never blocks the
//! worker). The exit status is read only after stdout is drained.
//!
//! [`supervise`] runs several tools joined by pipes as one unit: whichever exits first with a
//! failure, the others are killed at once, and the failure reported is a tool's own, never the
//! broken pipe it caused downstream or upstream.

use std::collections::HashMap;
use std::ffi::OsString;
use std::future::Future;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};
use tempfile::NamedTempFile;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::process::{ChildStdin, ChildStdout, Command};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::secret::redact_known;

/// Bytes of stderr kept (the tail: tools print the fatal line last).
pub const STDERR_TAIL: usize = 8 * 1024;
/// How long stderr is still read after the tool exited on its own (its last lines are in flight).
const STDERR_AFTER_EXIT: Duration = Duration::from_secs(2);
/// How long stderr is still read after a kill.
const STDERR_AFTER_KILL: Duration = Duration::from_millis(300);
/// How long a SIGKILLed leader may take to be reaped (it is immediate; this bounds a stuck kernel).
const REAP_AFTER_KILL: Duration = Duration::from_secs(2);

/// A command ready to spawn. Dropping it removes its credential files.
#[derive(Debug)]
pub struct ToolCommand {
    pub program: String,
    pub args: Vec<OsString>,
    /// The child's whole environment (it does not inherit ours: no stray PG*/AWS_* secrets).
    pub env: Vec<(String, OsString)>,
    /// Strings that must never appear in logs or rows (passwords, the URL): redacted from stderr.
    pub secrets: Vec<String>,
    /// 0600 files holding credentials, removed on drop.
    pub credential_files: Vec<NamedTempFile>,
}

impl ToolCommand {
    pub(crate) fn new(program: &str, env: Vec<(String, OsString)>) -> Self {
        Self {
            program: program.into(),
            args: Vec::new(),
            env,
            secrets: Vec::new(),
            credential_files: Vec::new(),
        }
    }

    pub(crate) fn args<I: IntoIterator<Item = S>, S: Into<OsString>>(mut self, args: I) -> Self {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }
}

/// Where to find each tool: by name on PATH unless overridden (tests point at fakes).
#[derive(Debug, Clone, Default)]
pub struct Tools {
    overrides: HashMap<String, PathBuf>,
}

impl Tools {
    pub fn with_override(mut self, name: &str, path: impl Into<PathBuf>) -> Self {
        self.overrides.insert(name.to_owned(), path.into());
        self
    }

    pub fn resolve(&self, name: &str) -> PathBuf {
        self.overrides
            .get(name)
            .cloned()
            .unwrap_or_else(|| PathBuf::from(name))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("{program} is not installed or not on PATH")]
    Missing { program: String },
    #[error("cannot start {program}: {source}")]
    Other {
        program: String,
        source: std::io::Error,
    },
}

/// The stderr reader: a task appending to a shared buffer, so what it read survives when it is
/// abandoned (a descendant still holds the pipe).
struct StderrTail {
    buf: Arc<Mutex<Vec<u8>>>,
    task: JoinHandle<()>,
}

impl StderrTail {
    fn start(stderr: Option<tokio::process::ChildStderr>, secrets: Vec<String>) -> Self {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&buf);
        let task = tokio::spawn(async move {
            let Some(mut stderr) = stderr else { return };
            let mut chunk = [0u8; 4096];
            while let Ok(n) = stderr.read(&mut chunk).await {
                if n == 0 {
                    break;
                }
                let mut tail = sink.lock().unwrap_or_else(|p| p.into_inner());
                tail.extend_from_slice(&chunk[..n]);
                if tail.len() > 2 * STDERR_TAIL {
                    shrink(&mut tail, &secrets);
                }
            }
        });
        Self { buf, task }
    }

    /// Waits at most `within` for EOF, then takes what was read.
    async fn collect(&mut self, within: Duration) -> Vec<u8> {
        if tokio::time::timeout(within, &mut self.task).await.is_err() {
            self.task.abort();
        }
        std::mem::take(&mut *self.buf.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// Bounds the stderr buffer to [`STDERR_TAIL`] bytes: redacts first, then cuts the front, so a
/// secret straddling the cut is masked whole instead of leaving a fragment (its tail) that no
/// redaction recognises. The unfinished last line stays raw (its secret may still be arriving,
/// and a half-received `password=` value masked now would leak the rest later), unless that line
/// alone is longer than the tail; the cut never reaches into it.
fn shrink(buf: &mut Vec<u8>, secrets: &[String]) {
    let split = match buf.iter().rposition(|b| *b == b'\n') {
        Some(nl) if buf.len() - (nl + 1) <= STDERR_TAIL => nl + 1,
        _ => complete_utf8_prefix(buf),
    };
    let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();
    let mut out = redact_known(&String::from_utf8_lossy(&buf[..split]), &secrets).into_bytes();
    out.extend_from_slice(&buf[split..]);
    let mut cut = out.len().saturating_sub(STDERR_TAIL);
    while out.get(cut).is_some_and(|b| b & 0xC0 == 0x80) {
        cut += 1; // never start inside a UTF-8 sequence
    }
    out.drain(..cut);
    *buf = out;
}

/// The length of `b` without an incomplete UTF-8 sequence at its end (the rest of it is still in
/// the pipe).
fn complete_utf8_prefix(b: &[u8]) -> usize {
    for back in 1..=b.len().min(3) {
        let i = b.len() - back;
        let byte = b[i];
        if byte & 0xC0 == 0x80 {
            continue;
        }
        let need = match byte {
            0xF0.. => 4,
            0xE0.. => 3,
            0xC0.. => 2,
            _ => 1,
        };
        return if need > back { i } else { b.len() };
    }
    b.len()
}

/// The stderr a tool leaves for logs and rows: the whole capture redacted first, then cut to its
/// last [`STDERR_TAIL`] bytes, starting at a line boundary when the window has one.
fn redacted_tail(raw: &[u8], secrets: &[&str]) -> String {
    let text = redact_known(&String::from_utf8_lossy(raw), secrets);
    let text = text.trim();
    if text.len() <= STDERR_TAIL {
        return text.to_owned();
    }
    let mut start = text.len() - STDERR_TAIL;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    if let Some(nl) = text[start..].find('\n') {
        start += nl + 1;
    }
    text[start..].trim().to_owned()
}

/// A job's private temporary directory, mode 0700: its tools' HOME and TMPDIR and its credential
/// files. (`tempfile::tempdir()` follows the umask, 0755 with the usual 022: readable by every
/// user of the machine.) Removed when dropped.
pub fn private_tempdir() -> std::io::Result<tempfile::TempDir> {
    use std::os::unix::fs::PermissionsExt;
    tempfile::Builder::new()
        .prefix("backup-worker-")
        .permissions(std::fs::Permissions::from_mode(0o700))
        .tempdir()
}

pub struct RunningTool {
    pub program: String,
    /// The leader's pid, which is also the group id.
    pgid: Option<i32>,
    exit: watch::Receiver<Option<ExitStatus>>,
    pub stdout: Option<ChildStdout>,
    pub stdin: Option<ChildStdin>,
    stderr: StderrTail,
    secrets: Vec<String>,
    /// Set once the group was sent SIGKILL by us.
    killed: bool,
    /// Set once [`RunningTool::finish`] cleaned up: nothing left for Drop to do.
    finished: bool,
    /// The command's credential files live as long as the tool.
    command: Option<ToolCommand>,
}

pub fn spawn(
    tools: &Tools,
    cmd: &ToolCommand,
    with_stdin: bool,
) -> Result<RunningTool, SpawnError> {
    let path = tools.resolve(&cmd.program);
    let mut command = Command::new(&path);
    command
        .args(&cmd.args)
        .env_clear()
        .envs(cmd.env.iter().map(|(k, v)| (k, v)))
        .stdin(if with_stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own group: a kill reaches every descendant, and a terminal's or our own signals
        // (SIGTERM to the pod) do not reach it behind our back.
        .process_group(0)
        .kill_on_drop(true);
    // A worker killed with -9 runs no drop: its tools die with it rather than hold a replication
    // slot, a lock or a pipe for the next holder of their row. (The signal follows the spawning
    // thread: tools are spawned from the runtime's worker threads, which live as long as it.)
    // SAFETY: pre_exec runs between fork and exec; prctl is async-signal-safe.
    unsafe {
        command.pre_exec(|| {
            rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))
                .map_err(std::io::Error::from)
        });
    }
    let mut child = command.spawn().map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            SpawnError::Missing {
                program: cmd.program.clone(),
            }
        } else {
            SpawnError::Other {
                program: cmd.program.clone(),
                source,
            }
        }
    })?;
    let stderr = StderrTail::start(child.stderr.take(), cmd.secrets.clone());
    let stdout = child.stdout.take();
    let stdin = child.stdin.take();
    let pgid = child.id().and_then(|p| i32::try_from(p).ok());
    // The reaper owns the child: anyone may watch for the exit without borrowing the tool.
    let (tx, exit) = watch::channel(None);
    tokio::spawn(async move {
        let status = match child.wait().await {
            Ok(s) => s,
            // Cannot happen for a child we spawned; report it as killed rather than hang.
            Err(_) => ExitStatus::from_raw(KILLED_STATUS),
        };
        let _ = tx.send(Some(status));
    });
    Ok(RunningTool {
        program: cmd.program.clone(),
        pgid,
        exit,
        stdout,
        stdin,
        stderr,
        secrets: cmd.secrets.clone(),
        killed: false,
        finished: false,
        command: None,
    })
}

/// A wait status meaning "terminated by SIGKILL", for a leader whose status could not be read.
const KILLED_STATUS: i32 = 9;

const SIGPIPE: i32 = 13;

/// How a tool ended: exit status and its stderr tail, secrets redacted.
#[derive(Debug)]
pub struct Finished {
    pub program: String,
    pub status: ExitStatus,
    pub stderr: String,
    /// We killed it (shutdown, timeout, or another stage of its pipeline failed first).
    pub killed: bool,
}

impl Finished {
    /// Died of a broken pipe rather than of its own failure: SIGPIPE, or the EPIPE message a
    /// tool prints when it ignores the signal.
    pub fn broken_pipe(&self) -> bool {
        self.status.signal() == Some(SIGPIPE)
            || self.stderr.to_ascii_lowercase().contains("broken pipe")
    }

    /// One line for `internal_detail`.
    pub fn describe(&self) -> String {
        if self.stderr.is_empty() {
            format!("{} exited with {}", self.program, self.status)
        } else {
            format!(
                "{} exited with {}: {}",
                self.program, self.status, self.stderr
            )
        }
    }
}

impl RunningTool {
    pub fn pid(&self) -> Option<u32> {
        self.pgid.and_then(|p| u32::try_from(p).ok())
    }

    /// Keeps `cmd` (and so its 0600 credential files) alive until the tool is gone.
    pub fn keep(mut self, cmd: ToolCommand) -> Self {
        self.command = Some(cmd);
        self
    }

    /// True once the leader has exited.
    pub fn has_exited(&self) -> bool {
        self.exit.borrow().is_some()
    }

    /// A future that resolves with the leader's exit status; it does not borrow the tool.
    pub fn exit_watch(&self) -> impl Future<Output = ExitStatus> + Send + 'static {
        let mut rx = self.exit.clone();
        async move {
            match rx.wait_for(Option::is_some).await {
                Ok(s) => s.unwrap_or(ExitStatus::from_raw(KILLED_STATUS)),
                // The reaper always sends before it ends.
                Err(_) => ExitStatus::from_raw(KILLED_STATUS),
            }
        }
    }

    /// Sends SIGKILL to the whole group (the leader and every descendant that stayed in it).
    pub fn kill_group(&mut self) {
        self.killed = true;
        if let Some(pgid) = self.pgid.and_then(rustix::process::Pid::from_raw) {
            // ESRCH (everyone already gone) is the common, harmless case.
            let _ = rustix::process::kill_process_group(pgid, rustix::process::Signal::KILL);
        }
    }

    /// Waits for exit (call after stdout is drained) and collects the stderr tail. Whatever the
    /// tool left running in its group is killed.
    pub async fn wait(mut self) -> Finished {
        drop(self.stdout.take());
        drop(self.stdin.take());
        let status = self.exit_watch().await;
        let raw = self.stderr.collect(STDERR_AFTER_EXIT).await;
        self.finish(status, &raw)
    }

    /// Kills the group and reaps the leader; returns how it ended.
    pub async fn kill(mut self) -> Finished {
        self.kill_group();
        drop(self.stdout.take());
        drop(self.stdin.take());
        let status = tokio::time::timeout(REAP_AFTER_KILL, self.exit_watch())
            .await
            .unwrap_or(ExitStatus::from_raw(KILLED_STATUS));
        let raw = self.stderr.collect(STDERR_AFTER_KILL).await;
        self.finish(status, &raw)
    }

    fn finish(mut self, status: ExitStatus, raw: &[u8]) -> Finished {
        // Descendants outliving the leader are ours to clean up (they may hold pipes or locks).
        let killed_by_us = self.killed && status.signal() == Some(KILLED_STATUS);
        self.kill_group();
        self.finished = true;
        // Redact the whole capture, then cut: a cut inside a secret would leave a fragment no
        // redaction recognises.
        let secrets: Vec<&str> = self.secrets.iter().map(String::as_str).collect();
        Finished {
            program: self.program.clone(),
            status,
            stderr: redacted_tail(raw, &secrets),
            killed: killed_by_us,
        }
    }
}

impl Drop for RunningTool {
    fn drop(&mut self) {
        // A dropped job (timeout, shutdown, lost lease) takes its whole process group with it.
        if !self.finished {
            self.kill_group();
        }
        self.stderr.task.abort();
    }
}

/// Why a supervised pipeline failed.
#[derive(Debug)]
pub enum PipelineFailure {
    /// A tool failed on its own; `finished` is its account, `others` how the rest ended.
    Tool {
        finished: Finished,
        others: Vec<Finished>,
    },
    /// Our side of the plumbing failed (reading the source, …) and every tool was killed.
    Io {
        error: std::io::Error,
        tools: Vec<Finished>,
    },
}

/// Runs `tools` (joined by pipes that `io` drives: feeding the first, relaying between them,
/// draining the last) as one unit, until every tool exited successfully and `io` completed.
///
/// The first tool to exit with a failure gets every other tool killed at once, so no side can
/// block another on a full pipe; `io` is dropped, closing every pipe we hold. The failure
/// reported is the first tool that failed on its own and not merely of a broken pipe (a tool
/// whose reader died is a symptom, not the cause). `io` failing first kills every tool and is
/// reported as itself.
pub async fn supervise<F, T>(
    mut tools: Vec<RunningTool>,
    io: F,
) -> Result<(Vec<Finished>, T), PipelineFailure>
where
    F: Future<Output = std::io::Result<T>>,
{
    let mut exits: FuturesUnordered<_> = tools
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let w = t.exit_watch();
            async move { (i, w.await) }
        })
        .collect();
    tokio::pin!(io);
    let mut io_result: Option<std::io::Result<T>> = None;
    let mut failed_first: Option<usize> = None;
    let mut exited = 0;
    // Once every tool exited, our pipes may still be held by a descendant: it gets a moment,
    // then the groups are killed so the pipes close.
    let mut linger: Option<tokio::time::Instant> = None;
    while exited < tools.len() || io_result.is_none() {
        let linger_over = async {
            match linger {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = linger_over => {
                linger = None;
                for t in &mut tools {
                    t.kill_group();
                }
            }
            r = &mut io, if io_result.is_none() => {
                // A broken pipe on our side means a tool stopped reading: its exit tells why.
                let fatal = matches!(&r, Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe);
                io_result = Some(r);
                if fatal {
                    break;
                }
            }
            Some((i, status)) = exits.next(), if exited < tools.len() => {
                exited += 1;
                if !status.success() {
                    failed_first = Some(i);
                    break;
                }
                if exited == tools.len() && io_result.is_none() {
                    linger = Some(tokio::time::Instant::now() + STDERR_AFTER_EXIT);
                }
            }
        }
    }
    // Stop everything still running; closing our pipe ends happens when `io` is dropped below.
    let stopping = failed_first.is_some() || io_result.as_ref().is_some_and(|r| r.is_err());
    if stopping {
        for t in &mut tools {
            if !t.has_exited() {
                t.kill_group();
            }
        }
    }
    drop(exits);
    let mut finished = Vec::with_capacity(tools.len());
    for t in tools {
        finished.push(if stopping && !t.has_exited() {
            t.kill().await
        } else {
            t.wait().await
        });
    }
    if let Some(first) = failed_first {
        return Err(pick_cause(finished, first));
    }
    match io_result {
        Some(Err(error)) => {
            // Every tool exited 0 but our plumbing failed: a stage stopped reading early.
            if let Some(i) = finished
                .iter()
                .position(|f| !f.status.success() && !f.killed)
            {
                return Err(pick_cause(finished, i));
            }
            Err(PipelineFailure::Io {
                error,
                tools: finished,
            })
        }
        Some(Ok(v)) => Ok((finished, v)),
        // Unreachable: the loop ends only once `io` has a result or a tool failed.
        None => Err(PipelineFailure::Io {
            error: std::io::Error::other("the pipeline stopped before its I/O finished"),
            tools: finished,
        }),
    }
}

/// Copies `from` into `to`, then closes `to` (the reader sees EOF). Errors reading `from` keep
/// their kind; a reader that went away is `BrokenPipe`, which [`supervise`] leaves to the exits.
pub async fn pump<R, W>(mut from: R, mut to: W) -> std::io::Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        to.write_all(&buf[..n]).await?;
        total += n as u64;
    }
    to.shutdown().await?;
    Ok(total)
}

/// Reads `from` to EOF, keeping at most `keep` bytes (the head); the rest is drained.
pub async fn capture<R: AsyncRead + Unpin>(mut from: R, keep: usize) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return Ok(out);
        }
        let room = keep.saturating_sub(out.len()).min(n);
        out.extend_from_slice(&buf[..room]);
    }
}

/// Runs one tool to completion: `input` (if any) on its stdin, its stdout captured (up to
/// `keep` bytes), supervised like a pipeline of one.
pub async fn run_one<R>(
    tools: &Tools,
    cmd: &ToolCommand,
    input: Option<R>,
    keep: usize,
) -> Result<(Finished, Vec<u8>), RunFailure>
where
    R: AsyncRead + Unpin,
{
    let mut tool = spawn(tools, cmd, input.is_some()).map_err(RunFailure::Spawn)?;
    let stdin = tool.stdin.take();
    let stdout = tool.stdout.take();
    let io = async move {
        let feed = async {
            match (input, stdin) {
                // A tool may stop reading once it has what it needs (pg_restore --list reads
                // only the table of contents): its exit status says whether that was fine.
                (Some(src), Some(dst)) => match pump(src, dst).await {
                    Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
                    r => r.map(drop),
                },
                _ => Ok(()),
            }
        };
        let out = async {
            match stdout {
                Some(out) => capture(out, keep).await,
                None => Ok(Vec::new()),
            }
        };
        let (fed, out) = tokio::join!(feed, out);
        fed?;
        out
    };
    let (mut finished, out) = supervise(vec![tool], io)
        .await
        .map_err(RunFailure::Failed)?;
    let finished = finished.pop().ok_or_else(|| {
        RunFailure::Failed(PipelineFailure::Io {
            error: std::io::Error::other("no tool ran"),
            tools: Vec::new(),
        })
    })?;
    Ok((finished, out))
}

/// Why [`run_one`] failed.
#[derive(Debug)]
pub enum RunFailure {
    Spawn(SpawnError),
    Failed(PipelineFailure),
}

/// The tool whose own failure explains the rest: failed, not killed by us, not of a broken pipe
/// — the first observed such tool, else the first observed failure.
fn pick_cause(mut finished: Vec<Finished>, first: usize) -> PipelineFailure {
    let own = |f: &Finished| !f.status.success() && !f.killed;
    let cause = if own(&finished[first]) && !finished[first].broken_pipe() {
        first
    } else {
        finished
            .iter()
            .position(|f| own(f) && !f.broken_pipe())
            .unwrap_or(first)
    };
    let finished_cause = finished.remove(cause);
    PipelineFailure::Tool {
        finished: finished_cause,
        others: finished,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "hunter2-very-secret-value";

    /// No fragment of the secret (4 characters or more of it) survives in `text`.
    fn assert_no_fragment(text: &str) {
        for start in 0..SECRET.len() - 4 {
            let fragment = &SECRET[start..];
            assert!(!text.contains(fragment), "{fragment:?} leaked");
        }
        for end in 4..SECRET.len() {
            let fragment = &SECRET[..end];
            assert!(!text.contains(fragment), "{fragment:?} leaked");
        }
    }

    /// A stderr buffer just past twice the tail whose cut point (len - tail) falls inside the
    /// secret: the kept tail must not start with the secret's last characters.
    #[test]
    fn the_stderr_buffer_redacts_before_it_cuts() {
        let line = format!("FATAL: auth with {SECRET} failed\n");
        let before = 2 * STDERR_TAIL + 100 - STDERR_TAIL; // bytes the cut removes
        let secret_at = line.find(SECRET).unwrap();
        // Filler so that the cut lands 7 bytes into the secret.
        let filler = before - secret_at - 7;
        let mut buf = format!("{}\n", "x".repeat(filler - 1)).into_bytes();
        buf.extend_from_slice(line.as_bytes());
        let rest = 2 * STDERR_TAIL + 100 - buf.len();
        buf.extend_from_slice(format!("{}\n", "y".repeat(rest - 1)).as_bytes());
        assert_eq!(buf.len(), 2 * STDERR_TAIL + 100);
        assert_eq!(
            &buf[buf.len() - STDERR_TAIL..][..SECRET.len() - 7],
            &SECRET.as_bytes()[7..],
            "the cut point falls inside the secret"
        );
        shrink(&mut buf, &[SECRET.to_owned()]);
        assert!(buf.len() <= STDERR_TAIL, "{}", buf.len());
        let kept = String::from_utf8(buf).unwrap();
        assert_no_fragment(&kept);
        assert!(kept.contains("***"), "the masked line is kept: {kept:.200}");
    }

    /// The unfinished last line is not redacted (nor cut) yet: a `password=` value still
    /// arriving is masked whole once complete.
    #[test]
    fn an_unfinished_line_is_redacted_once_complete() {
        let mut buf = format!("{}\n", "x".repeat(2 * STDERR_TAIL)).into_bytes();
        buf.extend_from_slice(b"conninfo password=hunt");
        shrink(&mut buf, &[]);
        buf.extend_from_slice(b"er2-very-secret-value host=db\n");
        let text = redacted_tail(&buf, &[]);
        assert!(
            text.ends_with("conninfo password=*** host=db"),
            "{text:.200}"
        );
        assert_no_fragment(&text);
    }

    /// The final cut also comes after redaction, and a long line without a newline keeps its tail
    /// (it used to be dropped whole).
    #[test]
    fn the_final_tail_is_cut_after_redaction() {
        let text = format!(
            "{}{SECRET}{}",
            "x".repeat(STDERR_TAIL + 3),
            "z".repeat(STDERR_TAIL + 7 - SECRET.len())
        );
        assert!(
            text[text.len() - STDERR_TAIL..].starts_with(&SECRET[7..]),
            "the cut point falls inside the secret"
        );
        let tail = redacted_tail(text.as_bytes(), &[SECRET]);
        assert!(!tail.is_empty());
        assert!(tail.len() <= STDERR_TAIL);
        assert_no_fragment(&tail);
        let url = format!(
            "{} postgres://app:{SECRET}@db:5432/app {}",
            "x".repeat(STDERR_TAIL),
            "z".repeat(STDERR_TAIL - 40)
        );
        let tail = redacted_tail(url.as_bytes(), &[]);
        assert_no_fragment(&tail);
    }

    #[test]
    fn incomplete_utf8_at_the_end_is_kept_raw() {
        let e_acute = "é".as_bytes();
        assert_eq!(complete_utf8_prefix(b"abc"), 3);
        assert_eq!(complete_utf8_prefix(&[b'a', e_acute[0]]), 1);
        assert_eq!(complete_utf8_prefix(&[b'a', e_acute[0], e_acute[1]]), 3);
        let euro = "€".as_bytes();
        assert_eq!(complete_utf8_prefix(&[b'a', euro[0], euro[1]]), 1);
    }

    /// End to end: a real child writes more than twice the tail with the secret near the cut;
    /// the reported stderr never holds a fragment of it.
    #[tokio::test]
    async fn a_tools_stderr_never_leaks_a_fragment() {
        let script =
            format!("for i in $(seq 1 1000); do printf 'line %04d %s\\n' $i {SECRET} >&2; done");
        let cmd = ToolCommand {
            program: "sh".into(),
            args: vec!["-c".into(), script.into()],
            env: vec![("PATH".into(), "/usr/bin:/bin".into())],
            secrets: vec![SECRET.to_owned()],
            credential_files: Vec::new(),
        };
        let tool = spawn(&Tools::default(), &cmd, false).unwrap();
        let done = tool.wait().await;
        assert!(done.status.success(), "{}", done.stderr);
        assert!(done.stderr.len() <= STDERR_TAIL);
        assert!(done.stderr.ends_with("line 1000 ***"), "{}", done.stderr);
        assert_no_fragment(&done.stderr);
    }
}
