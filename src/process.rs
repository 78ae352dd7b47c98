//! The child-process seam: spawn a [`ToolCommand`] with a scrubbed environment, hand out its
//! stdout, and keep a bounded, redacted tail of its stderr for classification and
//! `internal_detail`. The exit status is read only after stdout is drained.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};

use tokio::io::AsyncReadExt;
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::task::JoinHandle;

use crate::engines::ToolCommand;
use crate::secret::redact_known;

/// Bytes of stderr kept (the tail: tools print the fatal line last).
pub const STDERR_TAIL: usize = 8 * 1024;

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

pub struct RunningTool {
    pub program: String,
    child: Child,
    pub stdout: Option<ChildStdout>,
    pub stdin: Option<ChildStdin>,
    stderr: JoinHandle<Vec<u8>>,
    secrets: Vec<String>,
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
        .kill_on_drop(true);
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
    let mut stderr = child.stderr.take();
    let tail = tokio::spawn(async move {
        let mut tail = Vec::new();
        let Some(stderr) = stderr.as_mut() else {
            return tail;
        };
        let mut buf = [0u8; 4096];
        while let Ok(n) = stderr.read(&mut buf).await {
            if n == 0 {
                break;
            }
            tail.extend_from_slice(&buf[..n]);
            if tail.len() > 2 * STDERR_TAIL {
                tail.drain(..tail.len() - STDERR_TAIL);
            }
        }
        tail
    });
    Ok(RunningTool {
        program: cmd.program.clone(),
        stdout: child.stdout.take(),
        stdin: child.stdin.take(),
        child,
        stderr: tail,
        secrets: cmd.secrets.clone(),
    })
}

/// How a tool ended: exit status and its stderr tail, secrets redacted.
#[derive(Debug)]
pub struct Finished {
    pub status: ExitStatus,
    pub stderr: String,
}

impl RunningTool {
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// True once the child has exited (reaped).
    pub fn has_exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// Waits for exit (call after stdout is drained) and collects the stderr tail.
    pub async fn wait(mut self) -> std::io::Result<Finished> {
        drop(self.stdout.take());
        drop(self.stdin.take());
        let status = self.child.wait().await?;
        let raw = (&mut self.stderr).await.unwrap_or_default();
        Ok(Finished {
            status,
            stderr: self.redact(&raw),
        })
    }

    /// Kills the child and reaps it; returns its stderr tail.
    pub async fn kill(mut self) -> String {
        let _ = self.child.kill().await;
        drop(self.stdout.take());
        let raw = (&mut self.stderr).await.unwrap_or_default();
        self.redact(&raw)
    }

    fn redact(&self, raw: &[u8]) -> String {
        let start = raw.len().saturating_sub(STDERR_TAIL);
        let text = String::from_utf8_lossy(&raw[start..]);
        let secrets: Vec<&str> = self.secrets.iter().map(String::as_str).collect();
        redact_known(text.trim(), &secrets)
    }
}
