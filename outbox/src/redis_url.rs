//! Redis connection URLs (cargo feature `redis-url`), shared by the relay's Redis Streams sink
//! and the inbox's Redis consumer adapter: `redis://` or `rediss://` checked, and the server
//! named in messages without the URL's credentials.

/// Why a Redis URL is unusable. The message names the setting it came from and never repeats
/// the URL (it may hold a password).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct RedisUrlError(String);

/// A checked Redis URL: how the server is named in messages (`host:port`, `db N` when not 0,
/// `(TLS)` for `rediss://`), never the credentials. The URL itself goes to the Redis client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisUrl {
    shown: String,
}

/// How a URL is shown in a `Debug` of a config: its server, or `<invalid>`.
pub fn shown(url: &str) -> String {
    RedisUrl::parse(url, "url")
        .map(|u| u.shown)
        .unwrap_or_else(|_| "<invalid>".into())
}

impl RedisUrl {
    /// Checks `redis://[user:password@]host[:port][/db]` or `rediss://...`. A `#fragment` is
    /// refused: redis-rs reads `#insecure` as "do not verify the TLS certificate". `setting`
    /// names where the URL came from (`--redis-url`) in the error.
    pub fn parse(s: &str, setting: &str) -> Result<RedisUrl, RedisUrlError> {
        let err = |m: String| RedisUrlError(m);
        let u = url::Url::parse(s).map_err(|e| err(format!("{setting} is not a URL: {e}")))?;
        let tls = match u.scheme() {
            "redis" => false,
            "rediss" => true,
            _ => {
                return Err(err(format!(
                    "{setting}: unsupported scheme (redis:// or rediss://)"
                )))
            }
        };
        if u.fragment().is_some() {
            return Err(err(format!(
                "{setting}: a #fragment is not supported (the TLS certificate is always verified)"
            )));
        }
        let host = match u.host() {
            Some(url::Host::Domain(d)) if !d.is_empty() => d.to_owned(),
            Some(url::Host::Ipv4(a)) => a.to_string(),
            Some(url::Host::Ipv6(a)) => format!("[{a}]"),
            _ => return Err(err(format!("{setting} has no host"))),
        };
        let db = u.path().trim_start_matches('/');
        if !db.is_empty() && db.parse::<u32>().is_err() {
            return Err(err(format!(
                "{setting}: the path must be a database number"
            )));
        }
        let mut shown = format!("{host}:{}", u.port().unwrap_or(6379));
        if !db.is_empty() && db != "0" {
            shown.push_str(&format!(" db {db}"));
        }
        if tls {
            shown.push_str(" (TLS)");
        }
        Ok(RedisUrl { shown })
    }

    /// The server, for messages: `host:port` (`db N`, `(TLS)`), never the credentials.
    pub fn shown(&self) -> &str {
        &self.shown
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked_and_shown_without_credentials() {
        let p = |s: &str| RedisUrl::parse(s, "--redis-url");
        assert_eq!(
            p("redis://relay:s3cr%40t@cache.internal:6380/2")
                .unwrap()
                .shown(),
            "cache.internal:6380 db 2"
        );
        assert_eq!(p("rediss://:pw@[::1]").unwrap().shown(), "[::1]:6379 (TLS)");
        assert_eq!(
            p("redis://127.0.0.1:6379/0").unwrap().shown(),
            "127.0.0.1:6379"
        );
        for bad in [
            "http://u:hunter2@h/",
            "redis://u:hunter2@h:notaport/",
            "redis://u:hunter2@h/notadb",
            "rediss://u:hunter2@h/#insecure",
            "redis://u:hunter2@/",
            "hunter2",
        ] {
            let e = p(bad).unwrap_err().to_string();
            assert!(
                e.contains("--redis-url") && !e.contains("hunter2"),
                "{bad}: {e}"
            );
        }
        assert_eq!(shown("redis://u:hunter2@h"), "h:6379");
        assert_eq!(shown("nonsense hunter2"), "<invalid>");
    }
}
