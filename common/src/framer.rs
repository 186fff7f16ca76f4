//! The one framer for every stream of image ranges (push, restore, and
//! replication later): ranges in offset order become data frames of at
//! most [`MAX_FRAME_DATA`] and zero ranges, all-zero granules of data go as
//! zeros, touching zero ranges merge into one, and (where the protocol
//! wants it) a stream checksum covers exactly what was emitted. What a
//! frame looks like on the wire is the [`RangeSink`]'s business.

use crate::checksum::StreamChecksum;
use crate::ranges::{zero_runs, Extent};
use crate::{Result, MAX_FRAME_DATA};

/// Where the framer's ranges go, in offset order. An error (the receiver
/// went away, a channel closed) stops the stream.
pub trait RangeSink {
    fn data(&mut self, offset: u64, data: Vec<u8>) -> Result<()>;
    fn zero(&mut self, offset: u64, len: u64) -> Result<()>;
}

pub struct Framer<S> {
    sink: S,
    /// Zeros not yet emitted, grown while the next range touches them.
    zero_run: Option<Extent>,
    /// Payload bytes of the data frames.
    data_bytes: u64,
    checksum: Option<StreamChecksum>,
}

/// What a finished stream sent.
pub struct Framed<S> {
    pub sink: S,
    /// The stream checksum, when the framer kept one.
    pub checksum: Option<[u8; 32]>,
    pub data_bytes: u64,
}

impl<S: RangeSink> Framer<S> {
    /// A framer without a stream checksum.
    pub fn new(sink: S) -> Self {
        Framer {
            sink,
            zero_run: None,
            data_bytes: 0,
            checksum: None,
        }
    }

    /// A framer that keeps the stream checksum of what it emits.
    pub fn with_checksum(sink: S) -> Self {
        Framer {
            checksum: Some(StreamChecksum::new()),
            ..Self::new(sink)
        }
    }

    /// Bytes at `offset`: runs of all-zero `granule`s (aligned in the
    /// image) go as zero ranges, the rest as data frames (each copied once).
    pub fn data(&mut self, offset: u64, data: &[u8], granule: u64) -> Result<()> {
        for (start, end, zero) in zero_runs(offset, data, granule) {
            let at = offset + start as u64;
            if zero {
                self.zero(at, (end - start) as u64)?;
            } else {
                let mut pos = at;
                for chunk in data[start..end].chunks(MAX_FRAME_DATA) {
                    self.emit_data(pos, chunk.to_vec())?;
                    pos += chunk.len() as u64;
                }
            }
        }
        Ok(())
    }

    /// Like [`Framer::data`], for a buffer the caller gives away: one that
    /// is all data and fits a frame goes as it is, uncopied.
    pub fn data_owned(&mut self, offset: u64, data: Vec<u8>, granule: u64) -> Result<()> {
        let whole = data.len() <= MAX_FRAME_DATA
            && matches!(
                zero_runs(offset, &data, granule).collect::<Vec<_>>()[..],
                [(_, _, false)]
            );
        if whole {
            self.emit_data(offset, data)
        } else {
            self.data(offset, &data, granule)
        }
    }

    /// A range that is zero in the image.
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

    /// The sink, for messages that are not ranges (they bypass the
    /// checksum and any pending zeros).
    pub fn sink_mut(&mut self) -> &mut S {
        &mut self.sink
    }

    /// Emits what is pending and hands back the sink with the totals.
    pub fn finish(mut self) -> Result<Framed<S>> {
        self.flush_zeros()?;
        Ok(Framed {
            sink: self.sink,
            checksum: self.checksum.map(|c| c.finish()),
            data_bytes: self.data_bytes,
        })
    }

    fn emit_data(&mut self, offset: u64, data: Vec<u8>) -> Result<()> {
        self.flush_zeros()?;
        if let Some(c) = &mut self.checksum {
            c.data(offset, &data);
        }
        self.data_bytes += data.len() as u64;
        self.sink.data(offset, data)
    }

    fn flush_zeros(&mut self) -> Result<()> {
        if let Some(run) = self.zero_run.take() {
            if let Some(c) = &mut self.checksum {
                c.zero(run.offset, run.len);
            }
            self.sink.zero(run.offset, run.len)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Error;

    /// Frames as (kind, offset, length): `D` data, `Z` zeros.
    #[derive(Default)]
    struct Recorder {
        frames: Vec<(char, u64, u64)>,
        data: Vec<(u64, Vec<u8>)>,
        /// Refuse after this many frames (the receiver left).
        limit: Option<usize>,
    }

    impl Recorder {
        fn room(&self) -> Result<()> {
            match self.limit {
                Some(n) if self.frames.len() >= n => Err(Error::unavailable("receiver gone")),
                _ => Ok(()),
            }
        }
    }

    impl RangeSink for Recorder {
        fn data(&mut self, offset: u64, data: Vec<u8>) -> Result<()> {
            self.room()?;
            self.frames.push(('D', offset, data.len() as u64));
            self.data.push((offset, data));
            Ok(())
        }
        fn zero(&mut self, offset: u64, len: u64) -> Result<()> {
            self.room()?;
            self.frames.push(('Z', offset, len));
            Ok(())
        }
    }

    #[test]
    fn zeros_merge_data_splits_and_the_checksum_covers_what_went() {
        let mut out = Framer::with_checksum(Recorder::default());
        out.zero(0, 10).unwrap();
        out.zero(10, 0).unwrap();
        let mut data = vec![0u8; 30];
        data[25] = 1;
        // Granules of 10 at offset 10: 10..20 and 20..30 zero, 30..40 not.
        out.data(10, &data, 10).unwrap();
        out.data_owned(40, vec![2; MAX_FRAME_DATA + 1], 10).unwrap();
        let done = out.finish().unwrap();
        let m = MAX_FRAME_DATA as u64;
        assert_eq!(
            done.sink.frames,
            [('Z', 0, 30), ('D', 30, 10), ('D', 40, m), ('D', 40 + m, 1)]
        );
        assert_eq!(done.data_bytes, 11 + m);
        let mut want = StreamChecksum::new();
        want.zero(0, 30);
        for (offset, data) in &done.sink.data {
            want.data(*offset, data);
        }
        assert_eq!(done.checksum, Some(want.finish()));
        assert_eq!(Framer::new(Recorder::default()).finish().unwrap().checksum, None);
    }

    #[test]
    fn a_buffer_of_data_goes_whole_and_a_refusal_stops_the_stream() {
        let mut out = Framer::new(Recorder::default());
        out.data_owned(0, vec![1; 4096], 1024).unwrap();
        out.zero(4096, 100).unwrap();
        let done = out.finish().unwrap();
        assert_eq!(done.sink.frames, [('D', 0, 4096), ('Z', 4096, 100)]);

        let mut out = Framer::new(Recorder {
            limit: Some(1),
            ..Recorder::default()
        });
        out.data(0, &[1; 10], 10).unwrap();
        out.zero(10, 10).unwrap();
        assert!(out.finish().is_err(), "the pending zero range could not go");
    }
}
