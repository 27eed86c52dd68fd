//! AMQP 0-9-1 connection settings (cargo feature `amqp`), shared by the relay's RabbitMQ sink and
//! the inbox's RabbitMQ consumer adapter: an `amqp://` or `amqps://` URL taken apart so that its
//! password never reaches a log line or an error.
//!
//! lapin keeps the URI it connects with and traces the handshake frames (the SASL response
//! included) at trace level. So lapin gets the URI *without* the password, and the credentials
//! through an authentication provider; errors and `Debug` name host, port and vhost only.

use lapin::auth::AuthProvider;
use lapin::tcp::OwnedTLSConfig;
use lapin::types::{LongString, ShortString};
use lapin::uri::{
    AMQPAuthority, AMQPQueryString, AMQPScheme, AMQPUri, AMQPUserInfo, SASLMechanism,
};
use lapin::{Connection, ConnectionProperties};

/// Why an AMQP URL is unusable. The message names the setting it came from and never repeats
/// the URL (it may hold a password).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct UrlError(String);

/// An AMQP URL taken apart: the URI lapin gets (no password in it), the credentials, and how the
/// server is named in messages.
#[derive(Clone)]
pub struct AmqpUrl {
    uri: AMQPUri,
    /// The SASL PLAIN response, `\0user\0password`.
    plain: String,
    /// `host:port vhost "/"`.
    shown: String,
}

/// Shows the server only (host, port, vhost), never the credentials.
impl std::fmt::Debug for AmqpUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("AmqpUrl").field(&self.shown).finish()
    }
}

/// How a URL is shown in a `Debug` of a config: its server (host, port, vhost), or `<invalid>`.
pub fn shown(url: &str) -> String {
    AmqpUrl::parse(url, "url")
        .map(|u| u.shown)
        .unwrap_or_else(|_| "<invalid>".into())
}

impl AmqpUrl {
    /// Parses `amqp://user:password@host:port/vhost` or `amqps://...` (percent-encoded; vhost
    /// `/` is `%2f`, no path is vhost `/`; no credentials are guest/guest), with the query
    /// parameters `heartbeat`, `frame_max`, `channel_max` and `auth_mechanism` (`plain` only).
    /// `setting` names where the URL came from (`--amqp-url`) in the error.
    pub fn parse(s: &str, setting: &str) -> Result<AmqpUrl, UrlError> {
        let err = |m: String| UrlError(m);
        let url = url::Url::parse(s).map_err(|e| {
            err(format!(
                "{setting} is not a URL ({e}); expected amqp://user:password@host:port/vhost, with special characters in credentials percent-encoded"
            ))
        })?;
        // A '/', '?' or '#' left unencoded in a password ends the host part early, and the
        // rest of the password would become the vhost, the query or the fragment (shown in
        // logs and errors, sent to the broker). An '@' there gives it away.
        if [Some(url.path()), url.query(), url.fragment()]
            .into_iter()
            .flatten()
            .any(|p| p.contains('@'))
        {
            return Err(err(format!(
                "{setting}: an '@' after the host: percent-encode '/', '?', '#' and '@' in the user name and password"
            )));
        }
        let scheme = match url.scheme() {
            "amqp" => AMQPScheme::AMQP,
            "amqps" => AMQPScheme::AMQPS,
            other => {
                return Err(err(format!(
                    "{setting}: unsupported scheme {:?} (use amqp:// or amqps://)",
                    other.escape_debug().to_string()
                )))
            }
        };
        let host = match url.host() {
            Some(url::Host::Domain(d)) if !d.is_empty() => d.to_owned(),
            Some(url::Host::Ipv4(ip)) => ip.to_string(),
            Some(url::Host::Ipv6(ip)) => ip.to_string(),
            _ => return Err(err(format!("{setting} has no host"))),
        };
        let port = url.port().unwrap_or_else(|| scheme.default_port());
        let decode = |what: &str, v: &str| {
            percent_encoding::percent_decode_str(v)
                .decode_utf8()
                .map(|c| c.into_owned())
                .map_err(|_| {
                    err(format!(
                        "{setting}: the {what} is not UTF-8 after percent-decoding"
                    ))
                })
        };
        let vhost = match url.path() {
            "" => "/".to_owned(),
            p => decode("vhost", &p[1..])?,
        };
        let (mut username, mut password) = ("guest".to_owned(), "guest".to_owned());
        if !url.username().is_empty() || url.password().is_some() {
            username = decode("user name", url.username())?;
            password = decode("password", url.password().unwrap_or(""))?;
        }
        let mut query = AMQPQueryString::default();
        for (k, v) in url.query_pairs() {
            let number = |what: &str| {
                v.parse::<u32>()
                    .map_err(|_| err(format!("{setting}: {what} must be a whole number")))
            };
            match k.as_ref() {
                "heartbeat" => {
                    query.heartbeat = Some(u16::try_from(number("heartbeat")?).map_err(|_| {
                        err(format!("{setting}: heartbeat must be at most 65535 seconds"))
                    })?)
                }
                "frame_max" => query.frame_max = Some(number("frame_max")?),
                "channel_max" => {
                    query.channel_max =
                        Some(u16::try_from(number("channel_max")?).map_err(|_| {
                            err(format!("{setting}: channel_max must be at most 65535"))
                        })?)
                }
                "auth_mechanism" => match v.to_ascii_lowercase().as_str() {
                    "plain" => query.auth_mechanism = Some(SASLMechanism::Plain),
                    _ => {
                        return Err(err(format!(
                            "{setting}: only auth_mechanism=plain is supported (no client certificate is presented)"
                        )))
                    }
                },
                other => {
                    return Err(err(format!(
                        "{setting}: unknown query parameter {:?} (known: heartbeat, frame_max, channel_max, auth_mechanism)",
                        other.chars().take(40).collect::<String>()
                    )))
                }
            }
        }
        let shown = format!("{host}:{port} vhost {vhost:?}");
        Ok(AmqpUrl {
            uri: AMQPUri {
                scheme,
                authority: AMQPAuthority {
                    // The password stays out of what lapin keeps (and could log): it goes
                    // through `PlainAuth`.
                    userinfo: AMQPUserInfo {
                        username: username.clone(),
                        password: String::new(),
                    },
                    host,
                    port,
                },
                vhost,
                query,
            },
            plain: format!("\0{username}\0{password}"),
            shown,
        })
    }

    /// The URI lapin connects with: everything but the password.
    pub fn uri(&self) -> &AMQPUri {
        &self.uri
    }

    /// The server as messages name it: `host:port vhost "name"`.
    pub fn shown(&self) -> &str {
        &self.shown
    }

    /// Whether it is `amqps://`.
    pub fn is_tls(&self) -> bool {
        self.uri.scheme == AMQPScheme::AMQPS
    }

    /// Connection properties naming the connection `name` (shown by RabbitMQ) and carrying the
    /// credentials in an authentication provider.
    pub fn properties(&self, name: &str) -> ConnectionProperties {
        ConnectionProperties::default()
            .with_connection_name(LongString::from(name.as_bytes().to_vec()))
            .with_auth_provider(PlainAuth(self.plain.clone()))
    }

    /// Opens a connection on the tokio runtime (the caller bounds it with a timeout). Its errors
    /// name no credentials.
    pub async fn connect(&self, name: &str, tls: OwnedTLSConfig) -> lapin::Result<Connection> {
        let runtime = lapin::runtime::default_runtime()?;
        Connection::connect_uri_with_config(self.uri.clone(), self.properties(name), tls, runtime)
            .await
    }
}

/// SASL PLAIN with the URL's credentials (the response is `\0user\0password`).
struct PlainAuth(String);

impl AuthProvider for PlainAuth {
    fn mechanism(&self) -> ShortString {
        ShortString::from("PLAIN")
    }
    fn auth_starter(&self) -> Result<LongString, String> {
        Ok(LongString::from(self.0.as_bytes().to_vec()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_credentials_never_reach_lapin_or_a_message() {
        let t = AmqpUrl::parse(
            "amqps://relay:s3cr%40t@mq.internal:5671/shop?heartbeat=10",
            "--amqp-url",
        )
        .unwrap();
        assert_eq!(t.uri().authority.userinfo.username, "relay");
        assert_eq!(t.uri().authority.userinfo.password, "");
        assert_eq!(t.uri().authority.host, "mq.internal");
        assert_eq!(t.uri().vhost, "shop");
        assert_eq!(t.uri().query.heartbeat, Some(10));
        assert!(t.is_tls());
        assert_eq!(t.plain, "\0relay\0s3cr@t");
        assert_eq!(t.shown(), "mq.internal:5671 vhost \"shop\"");
        assert!(!format!("{:?}", t.uri()).contains("s3cr"));
        assert!(!format!("{t:?}").contains("s3cr"), "{t:?}");
        assert_eq!(
            shown("amqp://u:hunter2@h:5672/%2f"),
            "h:5672 vhost \"/\"",
            "what a config's Debug shows"
        );
        assert_eq!(shown("amqp://u:hunter2@h:notaport/"), "<invalid>");

        let t = AmqpUrl::parse("amqp://127.0.0.1:5672/%2f", "url").unwrap();
        assert_eq!(
            (t.uri().authority.host.as_str(), t.uri().vhost.as_str()),
            ("127.0.0.1", "/")
        );
        assert_eq!(t.plain, "\0guest\0guest");
        assert_eq!(AmqpUrl::parse("amqp://h", "url").unwrap().uri().vhost, "/");
        assert_eq!(
            AmqpUrl::parse("amqp://[::1]:5672/v", "url")
                .unwrap()
                .uri()
                .authority
                .host,
            "::1"
        );

        for bad in [
            "http://u:hunter2@h/",
            "amqp://u:hunter2@h/?password=hunter2",
            "amqp://u:hunter2@h:notaport/",
            "amqp://u:hunter2@h/?heartbeat=hunter2",
            "amqp:///nohost",
            "amqp://u:hunter2@h/?auth_mechanism=external",
            "amqp://u:hunter2@h/?auth_mechanism=hunter2",
            "amqp://u:hunter2@h/%ff",
            // Unencoded '/', '?', '#' in the password end the host part early.
            "amqp://u:/hunter2@h/v",
            "amqp://u:hun/ter2@h/v",
            "amqp://u:hun?ter2@h/v",
            "amqp://u:hun#ter2@h/v",
            "amqp://u:123/hunter2@h/v",
        ] {
            let e = AmqpUrl::parse(bad, "the setting")
                .err()
                .unwrap()
                .to_string();
            assert!(
                e.contains("the setting") && !e.contains("hunter2"),
                "{bad}: {e}"
            );
        }
    }
}
