//! Writer of `rbd diff v1` streams: what `rbd import-diff - POOL/IMAGE`
//! reads. The inverse of [`DiffReader`](super::DiffReader), sharing its tags.
//!
//! This is the first step of the Ceph pool store (issue 36, docs/DESIGN.md
//! "Ceph pool store"): a push's received ranges become one stream whose end
//! record is written only by [`DiffWriter::finish`]. `rbd import-diff`
//! creates the stream's to-snapshot only after it has read that end record,
//! so a writer dropped without `finish` (a push that died) leaves no
//! snapshot, only head writes the next push overwrites.
//!
//! Only v1 is written: `rbd import-diff` reads v1, and v2 exists only inside
//! `rbd export --export-format 2` output. Header writes are small: wrap a
//! pipe in a `BufWriter`.

use std::io::{self, Write};

use super::{
    BANNER_V1, MAX_SNAP_NAME_LEN, TAG_END, TAG_FROM_SNAP, TAG_SIZE, TAG_TO_SNAP, TAG_WRITE, TAG_ZERO,
};

/// What a stream says before its data: the snapshots it leads from and to,
/// and the image's size at its end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiffHeader {
    /// The snapshot the image must have (absent: applies to any image).
    pub from_snap: Option<String>,
    /// The snapshot `rbd import-diff` creates at the end (absent: none).
    pub to_snap: Option<String>,
    /// The image's size after the stream: `rbd import-diff` resizes to it.
    pub size: u64,
}

/// Why a stream could not be written. Nothing is written for a rejected
/// header or extent, so the stream stays well-formed up to that point.
#[derive(Debug, thiserror::Error)]
pub enum DiffWriteError {
    #[error("rbd diff: the {which} snapshot name is empty")]
    EmptySnapName { which: &'static str },
    #[error("rbd diff: the {which} snapshot name is {len} bytes long, more than {MAX_SNAP_NAME_LEN}")]
    SnapNameTooLong { which: &'static str, len: usize },
    #[error("rbd diff: extent {offset}+{len} ends beyond the image size {size}")]
    BeyondSize { offset: u64, len: u64, size: u64 },
    #[error("rbd diff: writing the stream: {0}")]
    Io(#[from] io::Error),
}

/// Streaming writer of one diff stream; see the module documentation.
pub struct DiffWriter<W: Write> {
    inner: W,
    size: u64,
    /// Bytes written to `inner` so far.
    written: u64,
}

impl<W: Write> DiffWriter<W> {
    /// Checks the header, then writes the banner and the metadata records.
    pub fn start(inner: W, header: &DiffHeader) -> Result<Self, DiffWriteError> {
        for (which, name) in [("from", &header.from_snap), ("to", &header.to_snap)] {
            if let Some(name) = name {
                check_snap_name(which, name)?;
            }
        }
        let mut w = DiffWriter {
            inner,
            size: header.size,
            written: 0,
        };
        w.put(BANNER_V1)?;
        if let Some(from) = &header.from_snap {
            w.snap_record(TAG_FROM_SNAP, from)?;
        }
        if let Some(to) = &header.to_snap {
            w.snap_record(TAG_TO_SNAP, to)?;
        }
        w.put(&[TAG_SIZE])?;
        w.put(&header.size.to_le_bytes())?;
        Ok(w)
    }

    /// Writes `data` at image offset `offset`. An empty `data` writes no
    /// record: there is nothing to apply.
    pub fn data(&mut self, offset: u64, data: &[u8]) -> Result<(), DiffWriteError> {
        let len = data.len() as u64;
        self.check_extent(offset, len)?;
        if len > 0 {
            self.extent(TAG_WRITE, offset, len)?;
            self.put(data)?;
        }
        Ok(())
    }

    /// Marks `len` bytes at `offset` as reading zeros (`rbd import-diff`
    /// discards them). An empty range writes no record.
    pub fn zero(&mut self, offset: u64, len: u64) -> Result<(), DiffWriteError> {
        self.check_extent(offset, len)?;
        if len > 0 {
            self.extent(TAG_ZERO, offset, len)?;
        }
        Ok(())
    }

    /// Bytes written so far.
    pub fn bytes_written(&self) -> u64 {
        self.written
    }

    /// Writes the end record and flushes: only now is the stream complete.
    /// Returns the inner writer (a pipe's caller then closes it).
    pub fn finish(mut self) -> Result<W, DiffWriteError> {
        self.put(&[TAG_END])?;
        self.inner.flush()?;
        Ok(self.inner)
    }

    fn check_extent(&self, offset: u64, len: u64) -> Result<(), DiffWriteError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(DiffWriteError::BeyondSize {
                offset,
                len,
                size: self.size,
            }),
        }
    }

    fn extent(&mut self, tag: u8, offset: u64, len: u64) -> io::Result<()> {
        let mut rec = [0u8; 17];
        rec[0] = tag;
        rec[1..9].copy_from_slice(&offset.to_le_bytes());
        rec[9..].copy_from_slice(&len.to_le_bytes());
        self.put(&rec)
    }

    fn snap_record(&mut self, tag: u8, name: &str) -> io::Result<()> {
        // `check_snap_name` bounded the length to MAX_SNAP_NAME_LEN.
        let len = name.len() as u32;
        self.put(&[tag])?;
        self.put(&len.to_le_bytes())?;
        self.put(name.as_bytes())
    }

    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.inner.write_all(bytes)?;
        self.written += bytes.len() as u64;
        Ok(())
    }
}

fn check_snap_name(which: &'static str, name: &str) -> Result<(), DiffWriteError> {
    if name.is_empty() {
        return Err(DiffWriteError::EmptySnapName { which });
    }
    if name.len() > MAX_SNAP_NAME_LEN as usize {
        return Err(DiffWriteError::SnapNameTooLong {
            which,
            len: name.len(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::{DiffReader, Record, Version};
    use super::*;
    use crate::error::ErrorKind;
    use proptest::prelude::*;

    /// One extent the property tests write: data or a zeroed range.
    #[derive(Debug, Clone)]
    enum Extent {
        Data(u64, Vec<u8>),
        Zero(u64, u64),
    }

    fn header(from: Option<&str>, to: Option<&str>, size: u64) -> DiffHeader {
        DiffHeader {
            from_snap: from.map(String::from),
            to_snap: to.map(String::from),
            size,
        }
    }

    fn write(h: &DiffHeader, extents: &[Extent]) -> Vec<u8> {
        let mut w = DiffWriter::start(Vec::new(), h).unwrap();
        for e in extents {
            match e {
                Extent::Data(off, data) => w.data(*off, data).unwrap(),
                Extent::Zero(off, len) => w.zero(*off, *len).unwrap(),
            }
        }
        let written = w.bytes_written();
        let out = w.finish().unwrap();
        assert_eq!(out.len() as u64, written + 1, "finish adds the end tag");
        out
    }

    /// Every record with the data of `Data` records.
    fn read(bytes: &[u8]) -> crate::Result<Vec<(Record, Vec<u8>)>> {
        let mut r = DiffReader::new(bytes);
        let mut out = Vec::new();
        let mut buf = [0u8; 7];
        while let Some(rec) = r.next_record()? {
            let mut data = Vec::new();
            loop {
                let n = r.read_data(&mut buf)?;
                if n == 0 {
                    break;
                }
                data.extend_from_slice(&buf[..n]);
            }
            out.push((rec, data));
        }
        Ok(out)
    }

    #[test]
    fn bytes_of_a_small_stream() {
        let out = write(
            &header(Some("a"), Some("bc"), 4096),
            &[Extent::Data(1, b"xy".to_vec()), Extent::Zero(8, 16)],
        );
        let mut expected = b"rbd diff v1\n".to_vec();
        expected.extend_from_slice(b"f\x01\0\0\0a");
        expected.extend_from_slice(b"t\x02\0\0\0bc");
        expected.push(b's');
        expected.extend_from_slice(&4096u64.to_le_bytes());
        expected.push(b'w');
        expected.extend_from_slice(&1u64.to_le_bytes());
        expected.extend_from_slice(&2u64.to_le_bytes());
        expected.extend_from_slice(b"xy");
        expected.push(b'z');
        expected.extend_from_slice(&8u64.to_le_bytes());
        expected.extend_from_slice(&16u64.to_le_bytes());
        expected.push(b'e');
        assert_eq!(out, expected);
    }

    #[test]
    fn rejected_input_writes_nothing_and_says_why() {
        let long = "x".repeat(MAX_SNAP_NAME_LEN as usize + 1);
        let cases: Vec<(&str, DiffHeader, &str)> = vec![
            (
                "empty to",
                header(None, Some(""), 1),
                "rbd diff: the to snapshot name is empty",
            ),
            (
                "empty from",
                header(Some(""), Some("b"), 1),
                "rbd diff: the from snapshot name is empty",
            ),
            (
                "long to",
                header(None, Some(&long), 1),
                "rbd diff: the to snapshot name is 4097 bytes long, more than 4096",
            ),
        ];
        for (name, h, message) in cases {
            let mut out = Vec::new();
            let e = DiffWriter::start(&mut out, &h).err().expect(name);
            assert_eq!(e.to_string(), message, "{name}");
            assert!(out.is_empty(), "{name}: nothing written");
        }
        // The longest allowed name is accepted.
        let ok = "x".repeat(MAX_SNAP_NAME_LEN as usize);
        assert!(DiffWriter::start(Vec::new(), &header(None, Some(&ok), 1)).is_ok());

        let mut w = DiffWriter::start(Vec::new(), &header(None, None, 100)).unwrap();
        let before = w.bytes_written();
        let extents: [(&str, Result<(), DiffWriteError>, &str); 3] = [
            (
                "data past the end",
                w.data(99, b"ab"),
                "rbd diff: extent 99+2 ends beyond the image size 100",
            ),
            (
                "zero past the end",
                w.zero(101, 0),
                "rbd diff: extent 101+0 ends beyond the image size 100",
            ),
            (
                "overflow",
                w.zero(u64::MAX, 2),
                "rbd diff: extent 18446744073709551615+2 ends beyond the image size 100",
            ),
        ];
        for (name, result, message) in extents {
            assert_eq!(result.unwrap_err().to_string(), message, "{name}");
        }
        assert_eq!(w.bytes_written(), before, "rejected extents write nothing");
        // Exactly up to the end is fine.
        w.data(98, b"ab").unwrap();
        w.zero(100, 0).unwrap();
    }

    /// A stream whose writer was dropped before `finish` lacks the end
    /// record: the reader (like `rbd import-diff`) rejects it.
    #[test]
    fn unfinished_stream_is_rejected() {
        let mut out = Vec::new();
        {
            let mut w = DiffWriter::start(&mut out, &header(None, Some("r"), 10)).unwrap();
            w.data(0, b"abc").unwrap();
        }
        let e = read(&out).unwrap_err();
        assert_eq!(e.kind, ErrorKind::DataLoss);
        assert!(e.message.contains("without end marker"), "{}", e.message);
    }

    #[test]
    fn io_errors_surface() {
        struct Full;
        impl Write for Full {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::new(io::ErrorKind::BrokenPipe, "reader gone"))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let e = DiffWriter::start(Full, &header(None, None, 1)).err().unwrap();
        assert_eq!(e.to_string(), "rbd diff: writing the stream: reader gone");
    }

    fn snap_name() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9._é-]{1,12}"
    }

    /// A header and extents inside its size.
    fn stream() -> impl Strategy<Value = (DiffHeader, Vec<Extent>)> {
        (
            proptest::option::of(snap_name()),
            proptest::option::of(snap_name()),
            prop_oneof![0u64..1 << 20, Just(u64::MAX)],
        )
            .prop_flat_map(|(from, to, size)| {
                let extent = prop_oneof![
                    (any::<u64>(), proptest::collection::vec(any::<u8>(), 0..40)).prop_map(
                        move |(off, data)| {
                            let room = size - (data.len() as u64).min(size);
                            let data = data[..(data.len() as u64).min(size) as usize].to_vec();
                            Extent::Data(off % room.saturating_add(1).max(1), data)
                        }
                    ),
                    (any::<u64>(), 0u64..1 << 16).prop_map(move |(off, len)| {
                        let len = len.min(size);
                        Extent::Zero(off % (size - len).saturating_add(1).max(1), len)
                    }),
                ];
                (
                    Just(DiffHeader {
                        from_snap: from,
                        to_snap: to,
                        size,
                    }),
                    proptest::collection::vec(extent, 0..8),
                )
            })
    }

    proptest! {
        /// Writer then parser gives back exactly what was written, empty
        /// extents dropped.
        #[test]
        fn round_trips_through_the_reader((h, extents) in stream()) {
            let bytes = write(&h, &extents);
            let mut expected = vec![(Record::Header { version: Version::V1 }, Vec::new())];
            expected.extend(h.from_snap.clone().map(|s| (Record::FromSnap(s), Vec::new())));
            expected.extend(h.to_snap.clone().map(|s| (Record::ToSnap(s), Vec::new())));
            expected.push((Record::Size(h.size), Vec::new()));
            for e in &extents {
                match e {
                    Extent::Data(_, data) if data.is_empty() => {}
                    Extent::Zero(_, 0) => {}
                    Extent::Data(offset, data) => expected.push((
                        Record::Data { offset: *offset, len: data.len() as u64 },
                        data.clone(),
                    )),
                    Extent::Zero(offset, len) => {
                        expected.push((Record::Zero { offset: *offset, len: *len }, Vec::new()))
                    }
                }
            }
            expected.push((Record::End, Vec::new()));
            prop_assert_eq!(read(&bytes).unwrap(), expected);
            // Every prefix is what a push that died leaves: never complete.
            for cut in 0..bytes.len() {
                prop_assert!(read(&bytes[..cut]).is_err(), "cut at {}", cut);
            }
        }
    }
}
