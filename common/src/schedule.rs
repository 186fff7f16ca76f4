//! Schedules: due computation, expiry and SLA (DESIGN.md section 5).
