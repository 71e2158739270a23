//! The reconcilers and the pure decisions they are made of.

pub mod schedule;
