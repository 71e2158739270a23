//! Integration tests: one binary (each binary links the whole dependency
//! tree), one module per area, against a real kube-apiserver and etcd started
//! by `sprite_operator::testenv` and the simulator.

mod common;
mod control_plane;
mod demo;
mod helm_chart;
mod relay;
mod scale;
mod sim_support;
mod sprite_controller;
mod sprite_lifecycle;
mod sprites_client;
mod sprites_conformance;
mod sprites_faults;
mod sprites_wire;
mod tenancy;
mod truth;
mod user_controller;
