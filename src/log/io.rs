//! Thin I/O helpers over glommio's DMA files (O_DIRECT through io_uring).
//!
//! Everything here awaits io_uring completions; nothing blocks the executor. Writes must start
//! at an aligned position and cover whole aligned blocks, so callers hand in the bytes of the
//! partial block before their data as well (see `Log`'s tail block).

use std::path::Path;
use std::rc::Rc;

use bytes::{Bytes, BytesMut};
use glommio::io::{DmaBuffer, DmaFile, OpenOptions};

use super::batch::{self, Batch, BatchError, HEADER_LEN};
use super::error::LogError;

thread_local! {
    /// Devices (st_dev) on which this thread has made glommio probe IOPOLL support correctly.
    static PROBED_DEVICES: std::cell::RefCell<std::collections::HashSet<u64>> =
        std::cell::RefCell::new(std::collections::HashSet::new());
}

/// Runs before every DMA open below (cheap after the first time per device and thread).
///
/// glommio 0.9 decides once per device and thread whether reads may use the io_uring poll ring
/// (IOPOLL), by reading 512 bytes from the first DMA file opened there. If that file is empty
/// (a brand-new segment) the read never reaches the device, the probe passes, and every later
/// read fails with EOPNOTSUPP on devices without poll queues (virtio, most cloud disks). So the
/// first DMA open on each device is a non-empty probe file, which makes the probe real.
async fn prepare_dma_dir(dir: &Path) -> Result<(), LogError> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(dir)
        .map_err(|e| LogError::io("inspecting", dir, e))?
        .dev();
    if PROBED_DEVICES.with(|p| p.borrow().contains(&dev)) {
        return Ok(());
    }
    let probe = dir.join(".tern-dma-probe.tmp");
    std::fs::write(&probe, [0x5a; 4096]).map_err(|e| LogError::io("writing", &probe, e))?;
    let opened = DmaFile::open(&probe).await;
    let _ = std::fs::remove_file(&probe);
    let file = opened.map_err(|e| LogError::io("opening", &probe, e))?;
    let _ = file.close().await;
    PROBED_DEVICES.with(|p| p.borrow_mut().insert(dev));
    Ok(())
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Opens (creating if needed) a segment or index file for reading and writing.
pub async fn open_rw(path: &Path) -> Result<DmaFile, LogError> {
    prepare_dma_dir(parent(path)).await?;
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .dma_open(path)
        .await
        .map_err(|e| LogError::io("opening", path, e))
}

/// Writes the concatenation of `parts` at the aligned position `pos` in one DMA buffer,
/// padding the last block with zeros, and retries short writes.
pub async fn write_all_at(
    file: &DmaFile,
    path: &Path,
    parts: &[&[u8]],
    pos: u64,
) -> Result<(), LogError> {
    debug_assert_eq!(file.align_down(pos), pos);
    let total: usize = parts.iter().map(|p| p.len()).sum();
    let mut done = 0usize;
    while done < total {
        let rest = total - done;
        let len = file.align_up(rest as u64) as usize;
        let mut buf: DmaBuffer = file.alloc_dma_buffer(len);
        let dst = buf.as_bytes_mut();
        let (mut skip, mut at) = (done, 0usize);
        for p in parts {
            if skip >= p.len() {
                skip -= p.len();
                continue;
            }
            let s = &p[skip..];
            skip = 0;
            dst[at..at + s.len()].copy_from_slice(s);
            at += s.len();
        }
        dst[at..].fill(0);
        let n = file
            .write_at(buf, pos + done as u64)
            .await
            .map_err(|e| LogError::io("writing", path, e))?;
        if n == 0 || (n < len && file.align_down(n as u64) != n as u64) {
            return Err(LogError::io(
                "writing",
                path,
                format!("short write of {n} of {len} bytes"),
            ));
        }
        done += n.min(rest);
    }
    Ok(())
}

/// Writes a whole small file durably in place: create, write, fdatasync, close.
pub async fn write_small_file(path: &Path, data: &[u8]) -> Result<(), LogError> {
    prepare_dma_dir(parent(path)).await?;
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .dma_open(path)
        .await
        .map_err(|e| LogError::io("creating", path, e))?;
    write_all_at(&file, path, &[data], 0).await?;
    file.fdatasync()
        .await
        .map_err(|e| LogError::io("syncing", path, e))?;
    file.close()
        .await
        .map_err(|e| LogError::io("closing", path, e))
}

/// Reads a whole small file, or `None` when it does not exist.
pub async fn read_small_file(path: &Path) -> Result<Option<Vec<u8>>, LogError> {
    prepare_dma_dir(parent(path)).await?;
    let file = match DmaFile::open(path).await {
        Ok(f) => f,
        Err(e) if is_not_found(&e) => return Ok(None),
        Err(e) => return Err(LogError::io("opening", path, e)),
    };
    let len = file
        .file_size()
        .await
        .map_err(|e| LogError::io("sizing", path, e))?;
    let out = read_exact(&file, path, 0, len as usize).await?;
    let _ = file.close().await;
    Ok(Some(out.to_vec()))
}

/// Reads up to `len` bytes at `pos`; fewer only at end of file.
pub async fn read_exact(
    file: &DmaFile,
    path: &Path,
    pos: u64,
    len: usize,
) -> Result<Bytes, LogError> {
    if len == 0 {
        return Ok(Bytes::new());
    }
    let r = file
        .read_at(pos, len)
        .await
        .map_err(|e| LogError::io("reading", path, e))?;
    Ok(Bytes::copy_from_slice(&r[..]))
}

fn is_not_found(e: &glommio::GlommioError<()>) -> bool {
    match e {
        glommio::GlommioError::IoError(e) => e.kind() == std::io::ErrorKind::NotFound,
        glommio::GlommioError::EnhancedIoError { source, .. } => {
            source.kind() == std::io::ErrorKind::NotFound
        }
        _ => false,
    }
}

/// Removes a file; a file that is already gone is fine.
pub async fn remove_if_exists(path: &Path) -> Result<(), LogError> {
    match glommio::io::remove(path).await {
        Ok(()) => Ok(()),
        Err(e) if is_not_found(&e) => Ok(()),
        Err(e) => Err(LogError::io("removing", path, e)),
    }
}

/// Reads the batches of one segment file in order, from `pos` up to the byte `end`, refilling
/// its buffer in chunks. Format errors are returned as values so the caller decides whether
/// they mean a torn tail (recovery) or corruption (reads).
pub struct SeqReader {
    file: Rc<DmaFile>,
    path: Rc<Path>,
    /// File position of `buf[0]`.
    pos: u64,
    end: u64,
    buf: Bytes,
    chunk: usize,
}

/// One step of a [`SeqReader`].
pub enum Step {
    /// A valid batch that starts at `position`.
    Batch { position: u64, batch: Batch },
    /// The bytes at `position` are not a valid batch.
    Invalid { position: u64, error: BatchError },
    /// Reached `end` exactly.
    End,
}

impl SeqReader {
    pub fn new(file: Rc<DmaFile>, path: Rc<Path>, pos: u64, end: u64, chunk: usize) -> Self {
        Self {
            file,
            path,
            pos,
            end,
            buf: Bytes::new(),
            chunk: chunk.clamp(4096, 8 << 20),
        }
    }

    /// Makes sure `need` bytes are buffered if the file range has them.
    async fn fill(&mut self, need: usize) -> Result<(), LogError> {
        let have = self.buf.len();
        let avail = (self.end - self.pos) as usize;
        let want = need.min(avail);
        if have >= want {
            return Ok(());
        }
        let read_len = (want - have).max(self.chunk).min(avail - have);
        let more = read_exact(&self.file, &self.path, self.pos + have as u64, read_len).await?;
        if have == 0 {
            self.buf = more;
        } else {
            let mut joined = BytesMut::with_capacity(have + more.len());
            joined.extend_from_slice(&self.buf);
            joined.extend_from_slice(&more);
            self.buf = joined.freeze();
        }
        Ok(())
    }

    pub async fn next(&mut self) -> Result<Step, LogError> {
        if self.pos >= self.end {
            return Ok(Step::End);
        }
        let position = self.pos;
        self.fill(HEADER_LEN).await?;
        let len = match batch::peek_len(&self.buf) {
            Ok(len) => len,
            Err(error) => return Ok(Step::Invalid { position, error }),
        };
        self.fill(len).await?;
        match Batch::decode_prefix(&self.buf) {
            Ok((batch, used)) => {
                self.buf = self.buf.slice(used..);
                self.pos += used as u64;
                Ok(Step::Batch { position, batch })
            }
            Err(error) => Ok(Step::Invalid { position, error }),
        }
    }
}
