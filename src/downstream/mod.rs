//! Calling downstreams: the retry policy (pure, shared by sync tries and
//! stored deliveries) and the OAuth2 client-credentials token cache.

pub mod classify;
pub mod oauth2;
pub mod retry;
