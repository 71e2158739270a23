//! Integration tests: one binary (linking the dependency tree once), one
//! module per area, all against a real kube-apiserver and etcd started by
//! `sprite_operator::testenv`.

mod common;
mod control_plane;
mod relay;
mod sprite_controller;
