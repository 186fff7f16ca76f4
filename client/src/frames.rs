//! The push side of the wire: ranges turned into data and zero frames, with
//! the stream checksum kept over exactly what is emitted. Shared by the
//! block scanner and the Ceph diff reader.

use backy_common::framer::{Framer, RangeSink};
use backy_common::Result;
use backy_proto::push_frame::Frame;
use backy_proto::{DataRange, ZeroRange};
use std::time::Duration;

/// Emits push frames in offset order through the shared framer, keeping
/// the stream checksum the end frame carries.
pub struct PushFrames<E>(Framer<Emit<E>>);

/// Push frames out of the framer's ranges.
pub struct Emit<E>(E);

impl<E: FnMut(Frame) -> Result<()>> RangeSink for Emit<E> {
    fn data(&mut self, offset: u64, data: Vec<u8>) -> Result<()> {
        (self.0)(Frame::Data(DataRange { offset, data }))
    }

    fn zero(&mut self, offset: u64, length: u64) -> Result<()> {
        (self.0)(Frame::Zero(ZeroRange { offset, length }))
    }
}

impl<E: FnMut(Frame) -> Result<()>> PushFrames<E> {
    pub fn new(emit: E) -> Self {
        PushFrames(Framer::with_checksum(Emit(emit)))
    }

    /// Bytes at `offset`: runs of all-zero `granule`s (aligned in the
    /// image) go as zero ranges, the rest as data frames.
    pub fn data(&mut self, offset: u64, data: &[u8], granule: u64) -> Result<()> {
        self.0.data(offset, data, granule)
    }

    /// A frame that is not a range (granule digests): sent as it is,
    /// outside the stream checksum.
    pub fn other(&mut self, frame: Frame) -> Result<()> {
        (self.0.sink_mut().0)(frame)
    }

    /// A range that is zero in the new image.
    pub fn zero(&mut self, offset: u64, len: u64) -> Result<()> {
        self.0.zero(offset, len)
    }

    /// Emits what is pending; returns the stream checksum and the data
    /// bytes sent.
    pub fn finish(self) -> Result<([u8; 32], u64)> {
        let done = self.0.finish()?;
        Ok((done.checksum.unwrap_or_default(), done.data_bytes))
    }
}

/// Frames as (kind, offset, length) for test assertions: `D` data, `Z`
/// zeros.
/// How long a push stream may go without a frame before a keepalive is
/// sent: well under the server's default idle timeout (120 s).
pub const KEEPALIVE_EVERY: Duration = Duration::from_secs(15);

/// The push frames from `rx`, with a keepalive frame whenever none came for
/// [`KEEPALIVE_EVERY`] (scanning unchanged data sends nothing for long
/// stretches); none after the end frame, which must end the stream.
pub fn with_keepalive(
    rx: tokio::sync::mpsc::Receiver<backy_proto::PushFrame>,
) -> impl tokio_stream::Stream<Item = backy_proto::PushFrame> {
    use backy_proto::push_frame::Frame;
    futures::stream::unfold((rx, false), |(mut rx, ended)| async move {
        if ended {
            return rx.recv().await.map(|f| (f, (rx, true)));
        }
        match tokio::time::timeout(KEEPALIVE_EVERY, rx.recv()).await {
            Ok(Some(f)) => {
                let end = matches!(f.frame, Some(Frame::End(_)));
                Some((f, (rx, end)))
            }
            Ok(None) => None,
            Err(_) => Some((
                backy_proto::PushFrame {
                    frame: Some(Frame::Keepalive(backy_proto::PushKeepalive {})),
                },
                (rx, false),
            )),
        }
    })
}

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
    use backy_common::checksum::StreamChecksum;
    use backy_common::MAX_FRAME_DATA;

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
