//! QEMU images as a source: the names backy gives its persistent dirty
//! bitmaps, and what `qemu-img info --output=json` says about them.
//!
//! Each revision pushed from a qcow2 image leaves a persistent bitmap
//! `backy-<revision id>` in it, added at the backup instant: it records
//! every write since, so the next push reads only those. A bitmap can be
//! used only while QEMU kept it consistent: enabled (flag `auto`) and not
//! left `in-use` by a QEMU that stopped without saving it.

use serde::Deserialize;

use crate::error::{Error, Result};

/// The bitmap recording writes since revision `rev_id`, by the short id
/// the revision is listed with (a UUID's short form).
pub fn bitmap_name(rev_id: &str) -> String {
    match rev_id.parse::<crate::RevisionId>() {
        Ok(id) => format!("backy-{}", id.short()),
        Err(_) => format!("backy-{rev_id}"),
    }
}

/// One persistent bitmap of an image.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Bitmap {
    pub name: String,
    pub granularity: u64,
    #[serde(default)]
    pub flags: Vec<String>,
}

impl Bitmap {
    /// Recording writes (and saved by QEMU).
    pub fn enabled(&self) -> bool {
        self.flags.iter().any(|f| f == "auto")
    }

    /// Left inconsistent: a QEMU had it open and did not save it.
    pub fn in_use(&self) -> bool {
        self.flags.iter().any(|f| f == "in-use")
    }
}

/// What `qemu-img info --output=json` says that matters here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    pub format: String,
    pub virtual_size: u64,
    pub bitmaps: Vec<Bitmap>,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
struct RawInfo {
    format: String,
    virtual_size: u64,
    #[serde(default)]
    format_specific: Option<FormatSpecific>,
}

#[derive(Deserialize)]
struct FormatSpecific {
    #[serde(default)]
    data: Option<FormatData>,
}

#[derive(Deserialize)]
struct FormatData {
    #[serde(default)]
    bitmaps: Vec<Bitmap>,
}

impl ImageInfo {
    /// Parses `qemu-img info --output=json` of one image (not `--backing-chain`).
    pub fn from_json(text: &str) -> Result<Self> {
        let raw: RawInfo = serde_json::from_str(text)
            .map_err(|e| Error::invalid(format!("unexpected `qemu-img info` output: {e}")))?;
        let bitmaps = raw
            .format_specific
            .and_then(|f| f.data)
            .map(|d| d.bitmaps)
            .unwrap_or_default();
        Ok(ImageInfo {
            format: raw.format,
            virtual_size: raw.virtual_size,
            bitmaps,
        })
    }

    pub fn bitmap(&self, name: &str) -> Option<&Bitmap> {
        self.bitmaps.iter().find(|b| b.name == name)
    }

    /// The parent revision's bitmap when an incremental push can trust it,
    /// else why not (the push then reads everything and compares).
    pub fn parent_bitmap(&self, parent_id: &str) -> std::result::Result<&Bitmap, String> {
        if parent_id.is_empty() {
            return Err("no parent revision".into());
        }
        let name = bitmap_name(parent_id);
        match self.bitmap(&name) {
            None => Err(format!("the image has no bitmap {name}")),
            Some(b) if b.in_use() => Err(format!(
                "bitmap {name} is inconsistent (QEMU did not close the image cleanly)"
            )),
            Some(b) if !b.enabled() => Err(format!("bitmap {name} is disabled")),
            Some(b) => Ok(b),
        }
    }

    /// Bitmaps backy made, other than the ones named.
    pub fn stray_backy_bitmaps<'a>(&'a self, keep: &'a [String]) -> impl Iterator<Item = &'a Bitmap> {
        self.bitmaps
            .iter()
            .filter(move |b| b.name.starts_with("backy-") && !keep.contains(&b.name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INFO: &str = r#"{
        "children": [], "virtual-size": 8388608, "filename": "d.qcow2", "cluster-size": 65536,
        "format": "qcow2", "actual-size": 200704, "dirty-flag": false,
        "format-specific": {"type": "qcow2", "data": {"compat": "1.1", "compression-type": "zlib",
            "lazy-refcounts": false, "refcount-bits": 16, "corrupt": false, "extended-l2": false,
            "bitmaps": [
                {"flags": ["auto"], "name": "backy-a", "granularity": 65536},
                {"flags": [], "name": "backy-b", "granularity": 65536},
                {"flags": ["in-use", "auto"], "name": "backy-c", "granularity": 65536},
                {"flags": ["auto"], "name": "other", "granularity": 65536}
            ]}}}"#;

    #[test]
    fn bitmaps_from_qemu_img_info() {
        let info = ImageInfo::from_json(INFO).unwrap();
        assert_eq!((info.format.as_str(), info.virtual_size), ("qcow2", 8 << 20));
        assert_eq!(info.parent_bitmap("a").map(|b| b.granularity), Ok(65536));
        assert_eq!(info.parent_bitmap("b").unwrap_err(), "bitmap backy-b is disabled");
        assert!(info.parent_bitmap("c").unwrap_err().contains("inconsistent"));
        assert_eq!(
            info.parent_bitmap("d").unwrap_err(),
            "the image has no bitmap backy-d"
        );
        assert_eq!(info.parent_bitmap("").unwrap_err(), "no parent revision");
        let keep = ["backy-a".to_string()];
        let stray: Vec<_> = info.stray_backy_bitmaps(&keep).map(|b| b.name.as_str()).collect();
        assert_eq!(stray, ["backy-b", "backy-c"]);
        let id = crate::RevisionId::new_random();
        assert_eq!(
            bitmap_name(&id.uuid().to_string()),
            format!("backy-{}", id.short())
        );
        // Raw images have no bitmaps; garbage is an error.
        let raw = r#"{"virtual-size": 512, "format": "raw", "filename": "x"}"#;
        assert!(ImageInfo::from_json(raw).unwrap().bitmaps.is_empty());
        assert!(ImageInfo::from_json("qemu-img: Could not open").is_err());
    }
}
