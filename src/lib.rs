pub mod auth;
pub mod breaker;
pub mod cli;
pub mod config;
pub mod downstream;
pub mod payload;
pub mod render;
pub mod template;
