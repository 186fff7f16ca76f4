//! The push side of the wire: ranges turned into data and zero frames, with
//! the stream checksum kept over exactly what is emitted. Shared by the
//! block scanner and the Ceph diff reader.

use backy_common::checksum::StreamChecksum;
use backy_common::ranges::{zero_runs, Extent};
use backy_common::{Result, MAX_FRAME_DATA};
use backy_proto::push_frame::Frame;
use backy_proto::{DataRange, ZeroRange};

/// Emits frames in offset order; touching zero ranges are merged into one.
pub struct PushFrames<E> {
    emit: E,
    checksum: StreamChecksum,
    /// Zeros not yet emitted, grown while the next range touches them.
    zero_run: Option<Extent>,
    /// Payload bytes of the data frames.
    bytes_sent: u64,
}

impl<E: FnMut(Frame) -> Result<()>> PushFrames<E> {
    pub fn new(emit: E) -> Self {
        PushFrames {
            emit,
            checksum: StreamChecksum::new(),
            zero_run: None,
            bytes_sent: 0,
        }
    }

    /// Bytes at `offset`: runs of all-zero `granule`s (aligned in the
    /// image) go as zero ranges, the rest as data frames of at most
    /// [`MAX_FRAME_DATA`].
    pub fn data(&mut self, offset: u64, data: &[u8], granule: u64) -> Result<()> {
        for (start, end, zero) in zero_runs(offset, data, granule) {
            let at = offset + start as u64;
            if zero {
                self.zero(at, (end - start) as u64)?;
            } else {
                self.nonzero(at, &data[start..end])?;
            }
        }
        Ok(())
    }

    /// A range that is zero in the new image.
    pub fn zero(&mut self, offset: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        match &mut self.zero_run {
            Some(run) if run.end() == offset => run.len += len,
            _ => {
                self.flush_zeros()?;
                self.zero_run = Some(Extent { offset, len });
            }
        }
        Ok(())
    }

    /// Emits what is pending; returns the stream checksum and the data
    /// bytes sent.
    pub fn finish(mut self) -> Result<([u8; 32], u64)> {
        self.flush_zeros()?;
        Ok((self.checksum.finish(), self.bytes_sent))
    }

    fn nonzero(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.flush_zeros()?;
        let mut at = offset;
        for chunk in data.chunks(MAX_FRAME_DATA) {
            self.checksum.data(at, chunk);
            self.bytes_sent += chunk.len() as u64;
            (self.emit)(Frame::Data(DataRange {
                offset: at,
                data: chunk.to_vec(),
            }))?;
            at += chunk.len() as u64;
        }
        Ok(())
    }

    fn flush_zeros(&mut self) -> Result<()> {
        if let Some(run) = self.zero_run.take() {
            self.checksum.zero(run.offset, run.len);
            (self.emit)(Frame::Zero(ZeroRange {
                offset: run.offset,
                length: run.len,
            }))?;
        }
        Ok(())
    }
}

/// Frames as (kind, offset, length) for test assertions: `D` data, `Z`
/// zeros.
#[cfg(test)]
pub fn summary(frames: &[Frame]) -> Vec<(char, u64, u64)> {
    frames
        .iter()
        .map(|f| match f {
            Frame::Data(d) => ('D', d.offset, d.data.len() as u64),
            Frame::Zero(z) => ('Z', z.offset, z.length),
            other => panic!("not a range: {other:?}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeros_merge_data_splits_and_the_checksum_covers_what_went() {
        let mut frames = Vec::new();
        let mut out = PushFrames::new(|f| {
            frames.push(f);
            Ok(())
        });
        out.zero(0, 10).unwrap();
        out.zero(10, 0).unwrap();
        let mut data = vec![0u8; 30];
        data[25] = 1;
        // Granules of 10 at offset 10: 10..20 and 20..30 zero, 30..40 not.
        out.data(10, &data, 10).unwrap();
        out.data(40, &vec![2; MAX_FRAME_DATA + 1], 10).unwrap();
        let (sum, sent) = out.finish().unwrap();
        let got = summary(&frames);
        let m = MAX_FRAME_DATA as u64;
        assert_eq!(got, [('Z', 0, 30), ('D', 30, 10), ('D', 40, m), ('D', 40 + m, 1)]);
        assert_eq!(sent, 11 + m);
        let mut want = StreamChecksum::new();
        for f in &frames {
            match f {
                Frame::Data(d) => want.data(d.offset, &d.data),
                Frame::Zero(z) => want.zero(z.offset, z.length),
                _ => {}
            }
        }
        assert_eq!(sum, want.finish());
    }
}
