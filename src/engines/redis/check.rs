//! The stored stream: its structural check and the EOF mark of a diskless transfer.

use super::rdb::RdbCheck;

/// `REDIS` + version, the EOF opcode, and the CRC64 of the whole stream ([`rdb`](super::rdb)).
#[derive(Default)]
pub(crate) struct RdbStreamCheck {
    check: RdbCheck,
    mark: EofMark,
}

impl crate::pipeline::StreamCheck for RdbStreamCheck {
    fn update(&mut self, bytes: &[u8]) {
        let mut out = Vec::with_capacity(bytes.len() + EOF_MARK_LEN);
        self.mark.push(bytes, &mut out);
        self.check.update(&out);
    }

    fn finish(mut self: Box<Self>) -> Result<String, String> {
        let tail = std::mem::take(&mut self.mark).finish();
        self.check.update(&tail);
        let s = self.check.finish().map_err(|e| e.to_string())?;
        Ok(format!(
            "RDB version {}, {} bytes",
            s.version, s.total_bytes
        ))
    }
}

/// Length of the EOF mark of a diskless replication transfer.
const EOF_MARK_LEN: usize = 40;

/// Drops the 40-hex-character EOF mark a diskless SYNC ends with. `redis-cli --rdb -` cannot
/// truncate stdout as it truncates a file, so its stream is the RDB followed by that mark (Redis
/// 7 replicates diskless by default). A real RDB ends with a binary CRC64, which is never 40 hex
/// characters in a row. Holds back the last 40 bytes until the end.
#[derive(Default)]
pub(crate) struct EofMark {
    tail: Vec<u8>,
}

impl EofMark {
    /// Appends to `out` everything but the last 40 bytes seen so far.
    pub(crate) fn push(&mut self, input: &[u8], out: &mut Vec<u8>) {
        self.tail.extend_from_slice(input);
        if self.tail.len() > EOF_MARK_LEN {
            let cut = self.tail.len() - EOF_MARK_LEN;
            out.extend_from_slice(&self.tail[..cut]);
            self.tail.drain(..cut);
        }
    }

    /// The held-back bytes, unless they are the mark.
    pub(crate) fn finish(self) -> Vec<u8> {
        let is_mark = self.tail.len() == EOF_MARK_LEN
            && self
                .tail
                .iter()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b));
        if is_mark {
            Vec::new()
        } else {
            self.tail
        }
    }
}

/// [`EofMark`] over an async stream (the backup's raw stream from redis-cli).
pub(crate) struct StripEofMark<R> {
    inner: R,
    mark: Option<EofMark>,
    ready: Vec<u8>,
    at: usize,
}

impl<R> StripEofMark<R> {
    pub(crate) fn new(inner: R) -> Self {
        Self {
            inner,
            mark: Some(EofMark::default()),
            ready: Vec::new(),
            at: 0,
        }
    }
}

impl<R: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for StripEofMark<R> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::Poll;
        let this = self.get_mut();
        loop {
            if this.at < this.ready.len() {
                let n = buf.remaining().min(this.ready.len() - this.at);
                buf.put_slice(&this.ready[this.at..this.at + n]);
                this.at += n;
                return Poll::Ready(Ok(()));
            }
            let Some(mark) = this.mark.as_mut() else {
                return Poll::Ready(Ok(())); // EOF
            };
            let mut chunk = [0u8; 64 * 1024];
            let mut rb = tokio::io::ReadBuf::new(&mut chunk);
            match std::pin::Pin::new(&mut this.inner).poll_read(cx, &mut rb) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {
                    this.ready.clear();
                    this.at = 0;
                    if rb.filled().is_empty() {
                        if let Some(m) = this.mark.take() {
                            this.ready = m.finish();
                        }
                    } else {
                        mark.push(rb.filled(), &mut this.ready);
                    }
                }
            }
        }
    }
}

/// [`EofMark`] over a blocking reader (the restore's second look at backups taken before the
/// mark was stripped).
pub(super) struct StripEofMarkSync<R> {
    inner: R,
    mark: Option<EofMark>,
    ready: Vec<u8>,
    at: usize,
}

impl<R> StripEofMarkSync<R> {
    pub(super) fn new(inner: R) -> Self {
        Self {
            inner,
            mark: Some(EofMark::default()),
            ready: Vec::new(),
            at: 0,
        }
    }
}

impl<R: std::io::Read> std::io::Read for StripEofMarkSync<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            if self.at < self.ready.len() {
                let n = buf.len().min(self.ready.len() - self.at);
                buf[..n].copy_from_slice(&self.ready[self.at..self.at + n]);
                self.at += n;
                return Ok(n);
            }
            let Some(mark) = self.mark.as_mut() else {
                return Ok(0);
            };
            let mut chunk = [0u8; 64 * 1024];
            let n = self.inner.read(&mut chunk)?;
            self.ready.clear();
            self.at = 0;
            if n == 0 {
                if let Some(m) = self.mark.take() {
                    self.ready = m.finish();
                }
            } else {
                mark.push(&chunk[..n], &mut self.ready);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_diskless_eof_mark_is_stripped_and_nothing_else() {
        use tokio::io::AsyncReadExt;
        let rdb: Vec<u8> = b"REDIS0010"
            .iter()
            .copied()
            .chain((0..100_000u32).map(|i| (i % 251) as u8))
            .collect();
        let mark = b"aefe34ff85e53b35359a8e69cc2ed6a9b0dc7944";
        let mut with_mark = rdb.clone();
        with_mark.extend_from_slice(mark);
        for (input, want) in [(&with_mark, &rdb), (&rdb, &rdb)] {
            let mut out = Vec::new();
            StripEofMark::new(&input[..])
                .read_to_end(&mut out)
                .await
                .unwrap();
            assert_eq!(&out, want);
            let mut sync_out = Vec::new();
            std::io::Read::read_to_end(&mut StripEofMarkSync::new(&input[..]), &mut sync_out)
                .unwrap();
            assert_eq!(&sync_out, want);
        }
        // A stream shorter than a mark passes through whole.
        let mut out = Vec::new();
        StripEofMark::new(&b"REDIS"[..])
            .read_to_end(&mut out)
            .await
            .unwrap();
        assert_eq!(out, b"REDIS");
    }
}
