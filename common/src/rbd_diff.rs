//! Parser for Ceph's `rbd export-diff` stream (formats v1 and v2).
