//! A power-cut simulator: a [`Disk`] layer that keeps every write since the last
//! flush pending, so a test can "pull the plug" at any instant and see what a
//! real device might have persisted.
//!
//! Model (what the walker's journal must survive):
//! - a flush makes every earlier write durable;
//! - at a cut, each pending write independently either vanishes, lands whole, or
//!   tears: only some of its `atomic_unit`-sized pieces land (in any order);
//! - writes issued after the cut never land (the process is gone).
//!
//! `atomic_unit` is the size the device writes atomically (512 or 4096 bytes).

use luksify_luks::io::Disk;
use std::io;
use std::sync::{Arc, Mutex};

/// One write issued since the last flush.
#[derive(Clone, Debug)]
struct Pending {
    off: u64,
    data: Vec<u8>,
}

#[derive(Debug, Default)]
struct State {
    /// Number of I/O operations (writes and flushes) seen so far.
    ops: u64,
    /// Cut after this many operations; `None` = never.
    cut_at: Option<u64>,
    cut: bool,
}

/// Wraps a durable disk `D`; see the module docs.
#[derive(Debug, Clone)]
pub struct PowerCutDisk<D: Disk> {
    durable: D,
    /// Shared by sibling layers: one power supply for several devices.
    state: Arc<Mutex<State>>,
    pending: Arc<Mutex<Vec<Pending>>>,
    atomic_unit: usize,
    /// What [`Disk::direct`] answers: the walker schedules reads differently for a
    /// device read with O_DIRECT, and both schedules must survive a cut.
    direct: bool,
}

/// Error returned for I/O attempted after the simulated power cut.
pub fn is_power_cut(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::BrokenPipe && e.to_string().contains("simulated power cut")
}

fn cut_error() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "simulated power cut")
}

impl<D: Disk> PowerCutDisk<D> {
    pub fn new(durable: D, atomic_unit: usize) -> Self {
        assert!(atomic_unit.is_power_of_two() && atomic_unit >= 512);
        PowerCutDisk {
            durable,
            state: Arc::new(Mutex::new(State::default())),
            pending: Arc::default(),
            atomic_unit,
            direct: false,
        }
    }

    /// Another device on the same power supply (a detached header file).
    pub fn sibling<E: Disk>(&self, durable: E) -> PowerCutDisk<E> {
        PowerCutDisk {
            durable,
            state: Arc::clone(&self.state),
            pending: Arc::default(),
            atomic_unit: self.atomic_unit,
            direct: false,
        }
    }

    /// The same store, reported as read with O_DIRECT ([`Disk::direct`]).
    pub fn reading_directly(mut self) -> Self {
        self.direct = true;
        self
    }

    /// Arms the cut: the `n`-th write or flush from now (0-based) and everything
    /// after it fail as if power was lost just before it.
    pub fn cut_after_ops(&self, n: u64) {
        let mut s = self.lock();
        s.cut_at = Some(s.ops + n);
    }

    /// Operations (writes + flushes) issued so far.
    pub fn ops(&self) -> u64 {
        self.lock().ops
    }

    /// Whether the cut has happened.
    pub fn was_cut(&self) -> bool {
        self.lock().cut
    }

    /// Applies the fate of every pending write of this layer to the durable disk: `choose(i, units)`
    /// returns, for pending write `i` made of `units` atomic pieces, a mask of the
    /// pieces that land. Then the layer is ready for a fresh run (no cut armed).
    pub fn settle(&self, mut choose: impl FnMut(usize, usize) -> Vec<bool>) -> io::Result<()> {
        let mut s = self.lock();
        let pending = std::mem::take(&mut *self.pend());
        for (i, p) in pending.iter().enumerate() {
            let units = p.data.len().div_ceil(self.atomic_unit);
            let mask = choose(i, units);
            for (u, land) in mask.iter().enumerate().take(units) {
                if *land {
                    let a = u * self.atomic_unit;
                    let b = (a + self.atomic_unit).min(p.data.len());
                    self.durable.write_at(p.off + a as u64, &p.data[a..b])?;
                }
            }
        }
        s.cut = false;
        s.cut_at = None;
        Ok(())
    }

    /// The durable disk underneath.
    pub fn durable(&self) -> &D {
        &self.durable
    }

    fn pend(&self) -> std::sync::MutexGuard<'_, Vec<Pending>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts one operation; errors if the cut has happened or happens now.
    fn tick(&self, s: &mut State) -> io::Result<()> {
        if s.cut {
            return Err(cut_error());
        }
        if s.cut_at == Some(s.ops) {
            s.cut = true;
            return Err(cut_error());
        }
        s.ops += 1;
        Ok(())
    }
}

impl<D: Disk> Disk for PowerCutDisk<D> {
    fn read_at(&self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        let s = self.lock();
        if s.cut {
            return Err(cut_error());
        }
        // Reads see the volatile cache: durable bytes overlaid with pending writes in order.
        self.durable.read_at(off, buf)?;
        let end = off + buf.len() as u64;
        for p in self.pend().iter() {
            let pend = p.off + p.data.len() as u64;
            if p.off < end && pend > off {
                let a = p.off.max(off);
                let b = pend.min(end);
                buf[(a - off) as usize..(b - off) as usize]
                    .copy_from_slice(&p.data[(a - p.off) as usize..(b - p.off) as usize]);
            }
        }
        Ok(())
    }
    fn write_at(&self, off: u64, buf: &[u8]) -> io::Result<()> {
        let mut s = self.lock();
        self.tick(&mut s)?;
        self.pend().push(Pending {
            off,
            data: buf.to_vec(),
        });
        Ok(())
    }
    fn can_grow(&self) -> bool {
        self.durable.can_grow()
    }
    fn direct(&self) -> bool {
        self.direct
    }
    fn flush(&self) -> io::Result<()> {
        let mut s = self.lock();
        self.tick(&mut s)?;
        for p in std::mem::take(&mut *self.pend()) {
            self.durable.write_at(p.off, &p.data)?;
        }
        self.durable.flush()
    }
    fn write_unit(&self) -> u64 {
        self.atomic_unit as u64
    }
    fn size(&self) -> io::Result<u64> {
        // Pending writes may extend a growable store (a new header file).
        let end = self
            .pend()
            .iter()
            .map(|p| p.off + p.data.len() as u64)
            .max()
            .unwrap_or(0);
        Ok(self.durable.size()?.max(end))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use luksify_luks::io::MemDisk;

    #[test]
    fn unflushed_writes_vanish_or_tear_and_flushed_ones_stay() {
        let mem = MemDisk::new(8192);
        let d = PowerCutDisk::new(mem.clone(), 512);
        d.write_at(0, &[1u8; 1024]).unwrap();
        d.flush().unwrap();
        d.write_at(1024, &[2u8; 1024]).unwrap();
        d.write_at(4096, &[3u8; 1024]).unwrap();
        d.cut_after_ops(0);
        assert!(is_power_cut(&d.write_at(0, &[9u8; 512]).unwrap_err()));
        assert!(d.was_cut());
        // First pending write tears (only its second 512-byte unit lands), second vanishes.
        d.settle(|i, units| {
            assert_eq!(units, 2);
            if i == 0 {
                vec![false, true]
            } else {
                vec![false, false]
            }
        })
        .unwrap();
        let v = mem.to_vec();
        assert!(v[..1024].iter().all(|&b| b == 1));
        assert!(v[1024..1536].iter().all(|&b| b == 0));
        assert!(v[1536..2048].iter().all(|&b| b == 2));
        assert!(v[4096..5120].iter().all(|&b| b == 0));
    }

    #[test]
    fn reads_see_pending_writes() {
        let d = PowerCutDisk::new(MemDisk::new(4096), 512);
        d.write_at(10, b"abc").unwrap();
        let mut b = [0u8; 5];
        d.read_at(9, &mut b).unwrap();
        assert_eq!(&b, b"\0abc\0");
    }
}
