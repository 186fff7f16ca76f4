//! An atomic write op: steps on one object applied all or nothing. A
//! failed comparison (`cmpxattr`) cancels the whole op with ECANCELED.
//!
//! The builder owns its data and touches no C state until
//! [`IoCtx::operate`], so it is plain `Send + Sync` data that can be built
//! on one thread and operated on another.

use super::cluster::{c_string, IoCtx};
use super::error::{check, Result};
use std::ffi::{c_char, c_int, CString};
use std::ptr;

/// How `cmpxattr` compares the stored value with the given one (as byte
/// strings; librados's `LIBRADOS_CMPXATTR_OP_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum XattrCmp {
    Eq = 1,
    Ne = 2,
    Gt = 3,
    Gte = 4,
    Lt = 5,
    Lte = 6,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    CmpXattr {
        name: String,
        cmp: XattrCmp,
        value: Vec<u8>,
    },
    SetXattr {
        name: String,
        value: Vec<u8>,
    },
    Create {
        exclusive: bool,
    },
    WriteFull(Vec<u8>),
    OmapSet(Vec<(String, Vec<u8>)>),
    OmapRmKeys(Vec<String>),
    OmapCmp {
        key: String,
        value: Vec<u8>,
    },
}

/// The steps of one write op, applied in the order added.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WriteOp {
    steps: Vec<Step>,
}

impl WriteOp {
    pub fn new() -> WriteOp {
        WriteOp::default()
    }

    /// Cancels the op (ECANCELED) unless xattr `name` compares so with
    /// `value`. A missing xattr compares as empty.
    pub fn cmpxattr(mut self, name: &str, cmp: XattrCmp, value: &[u8]) -> WriteOp {
        self.steps.push(Step::CmpXattr {
            name: name.to_string(),
            cmp,
            value: value.to_vec(),
        });
        self
    }

    pub fn setxattr(mut self, name: &str, value: &[u8]) -> WriteOp {
        self.steps.push(Step::SetXattr {
            name: name.to_string(),
            value: value.to_vec(),
        });
        self
    }

    /// Creates the object; `exclusive`: fails (EEXIST) if it exists.
    pub fn create(mut self, exclusive: bool) -> WriteOp {
        self.steps.push(Step::Create { exclusive });
        self
    }

    pub fn write_full(mut self, data: &[u8]) -> WriteOp {
        self.steps.push(Step::WriteFull(data.to_vec()));
        self
    }

    pub fn omap_set(mut self, entries: &[(&str, &[u8])]) -> WriteOp {
        let entries = entries.iter().map(|(k, v)| (k.to_string(), v.to_vec())).collect();
        self.steps.push(Step::OmapSet(entries));
        self
    }

    pub fn omap_rm_keys(mut self, keys: &[&str]) -> WriteOp {
        self.steps
            .push(Step::OmapRmKeys(keys.iter().map(|k| k.to_string()).collect()));
        self
    }

    /// Cancels the op (ECANCELED) unless omap key `key` holds exactly
    /// `value`: a value read earlier is changed only if nobody changed it
    /// since.
    pub fn omap_cmp_eq(mut self, key: &str, value: &[u8]) -> WriteOp {
        self.steps.push(Step::OmapCmp {
            key: key.to_string(),
            value: value.to_vec(),
        });
        self
    }

    /// Puts `other`'s steps before this op's (the lease keeper's epoch
    /// comparison goes first).
    pub fn prepend(mut self, other: WriteOp) -> WriteOp {
        let mut steps = other.steps;
        steps.append(&mut self.steps);
        self.steps = steps;
        self
    }

    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }
}

/// Key arrays for the omap calls (lengths given, so no NUL is needed).
struct Keys {
    ptrs: Vec<*const c_char>,
    lens: Vec<usize>,
}

impl Keys {
    fn new<'a>(keys: impl Iterator<Item = &'a [u8]>) -> Keys {
        let (ptrs, lens) = keys.map(|k| (k.as_ptr().cast::<c_char>(), k.len())).unzip();
        Keys { ptrs, lens }
    }
}

impl IoCtx {
    /// Applies `op` to object `oid`, all of it or nothing.
    pub fn operate(&self, oid: &str, op: &WriteOp) -> Result<()> {
        let api = self.api();
        let o = c_string("rados_write_op_operate", oid, oid)?;
        // Every name as a C string first, so a bad one fails before any C
        // state exists.
        let names: Vec<Option<CString>> = op
            .steps
            .iter()
            .map(|s| match s {
                Step::CmpXattr { name, .. } | Step::SetXattr { name, .. } => {
                    c_string("rados_write_op_operate", oid, name).map(Some)
                }
                _ => Ok(None),
            })
            .collect::<Result<_>>()?;
        let key_arrays: Vec<Option<(Keys, Option<Keys>)>> = op
            .steps
            .iter()
            .map(|s| match s {
                Step::OmapSet(e) => Some((
                    Keys::new(e.iter().map(|(k, _)| k.as_bytes())),
                    Some(Keys::new(e.iter().map(|(_, v)| v.as_slice()))),
                )),
                Step::OmapRmKeys(k) => Some((Keys::new(k.iter().map(|k| k.as_bytes())), None)),
                _ => None,
            })
            .collect();
        // Where each omap comparison's own result goes (librados writes
        // it at operate): one slot per step, never moved meanwhile.
        let mut slots: Vec<c_int> = vec![0; op.steps.len()];
        let results = slots.as_mut_ptr();
        // SAFETY: every buffer (names, values, key arrays, result slots,
        // `o`) lives until the op is operated and released, both below.
        unsafe {
            let raw = (api.rados_create_write_op)();
            for (i, ((step, name), keys)) in op.steps.iter().zip(&names).zip(&key_arrays).enumerate() {
                let name = name.as_ref().map_or(ptr::null(), |n| n.as_ptr());
                match step {
                    Step::CmpXattr { cmp, value, .. } => (api.rados_write_op_cmpxattr)(
                        raw,
                        name,
                        *cmp as u8,
                        value.as_ptr().cast(),
                        value.len(),
                    ),
                    Step::SetXattr { value, .. } => {
                        (api.rados_write_op_setxattr)(raw, name, value.as_ptr().cast(), value.len())
                    }
                    Step::Create { exclusive } => {
                        (api.rados_write_op_create)(raw, c_int::from(*exclusive), ptr::null())
                    }
                    Step::WriteFull(data) => {
                        (api.rados_write_op_write_full)(raw, data.as_ptr().cast(), data.len())
                    }
                    Step::OmapSet(entries) => {
                        if let Some((k, Some(v))) = keys {
                            (api.rados_write_op_omap_set2)(
                                raw,
                                k.ptrs.as_ptr(),
                                v.ptrs.as_ptr(),
                                k.lens.as_ptr(),
                                v.lens.as_ptr(),
                                entries.len(),
                            )
                        }
                    }
                    Step::OmapCmp { key, value } => (api.rados_write_op_omap_cmp2)(
                        raw,
                        key.as_ptr().cast(),
                        XattrCmp::Eq as u8,
                        value.as_ptr().cast(),
                        key.len(),
                        value.len(),
                        results.add(i),
                    ),
                    Step::OmapRmKeys(list) => {
                        if let Some((k, _)) = keys {
                            (api.rados_write_op_omap_rm_keys2)(
                                raw,
                                k.ptrs.as_ptr(),
                                k.lens.as_ptr(),
                                list.len(),
                            )
                        }
                    }
                }
            }
            let rc = (api.rados_write_op_operate)(raw, self.raw(), o.as_ptr(), ptr::null_mut(), 0);
            (api.rados_release_write_op)(raw);
            check(rc.into(), "rados_write_op_operate", || oid.to_string())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prepend_puts_the_comparison_first() {
        let commit = WriteOp::new().omap_set(&[("rev.a", b"x")]);
        let fenced = commit.prepend(WriteOp::new().cmpxattr("epoch", XattrCmp::Eq, b"4"));
        assert_eq!(
            fenced.steps,
            [
                Step::CmpXattr {
                    name: "epoch".into(),
                    cmp: XattrCmp::Eq,
                    value: b"4".to_vec()
                },
                Step::OmapSet(vec![("rev.a".into(), b"x".to_vec())]),
            ]
        );
    }
}
