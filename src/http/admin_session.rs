//! The admin sign-in cookie (SPEC §7.4): what `/login` gives a browser in
//! exchange for the admin token, so the token itself is never stored by the
//! browser. The value is an expiry and an HMAC-SHA256 of it under a key made
//! at start-up (`<unix seconds>.<hex mac>`): nothing to keep in memory, no
//! value to guess, and a restart signs every browser out.
//!
//! Time is an input (`now`), so expiry is tested without waiting. Never logs
//! and never shows the key.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use subtle::ConstantTimeEq;

/// How long a sign-in lasts (the cookie's `Max-Age` and the signed expiry).
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 60 * 60);

/// The cookie's name.
pub const COOKIE: &str = "gateway_admin";

/// Separates what is signed from other uses of the key.
const CONTEXT: &[u8] = b"cognigy-gateway admin session v1\n";

/// Issues and checks sign-in cookies under one key.
pub struct Sessions {
    key: [u8; 32],
    ttl: Duration,
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sessions")
            .field("key", &"***")
            .field("ttl", &self.ttl)
            .finish()
    }
}

impl Sessions {
    /// Sessions under a fresh random key (the process's CSPRNG).
    pub fn random() -> Self {
        let mut key = [0u8; 32];
        rand::fill(&mut key[..]);
        Sessions::with_key(key)
    }

    /// Sessions under `key` (tests).
    pub fn with_key(key: [u8; 32]) -> Self {
        Sessions {
            key,
            ttl: SESSION_TTL,
        }
    }

    /// A cookie value valid from `now` for the session's lifetime.
    pub fn issue(&self, now: SystemTime) -> String {
        let expires = secs(now).saturating_add(self.ttl.as_secs());
        format!("{expires}.{}", hex::encode(self.mac(expires)))
    }

    /// The whole `Set-Cookie` value for a new sign-in.
    pub fn set_cookie(&self, now: SystemTime) -> String {
        format!(
            "{COOKIE}={}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}",
            self.issue(now),
            self.ttl.as_secs()
        )
    }

    /// True when `value` was issued under this key and has not expired at
    /// `now` (nor claims to last longer than a session can).
    pub fn verify(&self, value: &str, now: SystemTime) -> bool {
        let Some((expires, mac)) = value.split_once('.') else {
            return false;
        };
        // digits only: `+5` or ` 5` would parse, and sign something else
        if expires.is_empty() || !expires.bytes().all(|b| b.is_ascii_digit()) {
            return false;
        }
        let Ok(expires) = expires.parse::<u64>() else {
            return false;
        };
        let Ok(presented) = hex::decode(mac) else {
            return false;
        };
        if presented.len() != 32 {
            return false;
        }
        let signed: bool = self.mac(expires).ct_eq(&presented[..]).into();
        let now = secs(now);
        signed && now < expires && expires <= now.saturating_add(self.ttl.as_secs())
    }

    fn mac(&self, expires: u64) -> [u8; 32] {
        crate::auth::hmac_sha256(&self.key, &[CONTEXT, expires.to_string().as_bytes()])
    }
}

/// The value of the sign-in cookie among the request's `Cookie` headers.
pub fn cookie_value(headers: &http::HeaderMap) -> Option<&str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| {
            c.trim()
                .strip_prefix(COOKIE)
                .and_then(|r| r.strip_prefix('='))
        })
}

fn secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(s)
    }

    #[test]
    fn a_cookie_lasts_twelve_hours_and_no_longer() {
        let s = Sessions::with_key([7; 32]);
        let c = s.issue(at(1_000_000));
        assert!(s.verify(&c, at(1_000_000)));
        assert!(s.verify(&c, at(1_000_000 + 12 * 3600 - 1)));
        assert!(!s.verify(&c, at(1_000_000 + 12 * 3600)));
        assert!(s.set_cookie(at(0)).contains("Max-Age=43200"));
    }

    #[test]
    fn forged_altered_or_foreign_cookies_are_refused() {
        let s = Sessions::with_key([7; 32]);
        let c = s.issue(at(1_000_000));
        let (exp, mac) = c.split_once('.').unwrap();
        // a later expiry with the old MAC
        let later = format!("{}.{mac}", exp.parse::<u64>().unwrap() + 3600);
        assert!(!s.verify(&later, at(1_000_000)));
        // another key (another start-up)
        assert!(!Sessions::with_key([8; 32]).verify(&c, at(1_000_000)));
        for bad in [
            "",
            ".",
            "1.",
            ".ab",
            "+1.00",
            "x.y",
            &format!("{exp}.{}", &mac[2..]),
        ] {
            assert!(!s.verify(bad, at(1_000_000)), "{bad:?}");
        }
        // an expiry too far ahead cannot be signed by us, but is refused anyway
        let far = Sessions {
            key: [7; 32],
            ttl: Duration::from_secs(100 * 3600),
        }
        .issue(at(1_000_000));
        assert!(!s.verify(&far, at(1_000_000)));
    }

    #[test]
    fn the_cookie_is_found_among_others() {
        let mut h = http::HeaderMap::new();
        h.append(
            http::header::COOKIE,
            "a=1; gateway_admin=v.w".parse().unwrap(),
        );
        assert_eq!(cookie_value(&h), Some("v.w"));
        assert!(format!("{:?}", Sessions::with_key([1; 32])).contains("***"));
    }
}
