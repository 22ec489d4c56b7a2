//! metadata-service: JSON metadata for users and organizations over gRPC.
//!
//! Layers, outermost first: [`server`] wires [`service`] (gRPC translation,
//! error mapping) to [`store`] (sea-orm); [`api`] is each kind's messages,
//! taken apart and built, shared by the service, the [`client`] and the
//! [`relay`]; [`convert`] turns protobuf into the [`model`] types; [`json`]
//! holds the pure merge, replace and validation rules, and [`validation`]
//! says why input was refused; [`web`] lets browsers call (gRPC-Web, CORS);
//! [`webhook`] delivers every change to HTTP endpoints, signed.

pub mod api;
pub mod auth;
pub mod build_info;
pub mod client;
pub mod config;
pub mod convert;
pub mod events;
pub mod health;
pub mod http;
pub mod json;
pub mod logging;
pub mod metrics;
pub mod model;
pub mod otel;
pub mod pause;
pub mod proto;
pub mod query;
pub mod reason;
pub mod relay;
pub mod schema;
pub mod server;
pub mod service;
pub mod store;
pub mod validation;
pub mod web;
pub mod webhook;
