pub mod config;
pub mod template;
