//! `redrive console`: a web page for the people on call. It shows what fails, since when and why,
//! and replays, purges, pauses and reschedules rows with a preview first, through the same store
//! code as the CLI, so the page and the CLI cannot disagree.
//!
//! It is a door to production messages, so:
//! - it serves a loopback address unless users are configured (`[[console.users]]`), who sign in
//!   with HTTP basic authentication or a bearer token, and have a role: `read-only` or `operator`;
//! - changes are POSTs only, each with a CSRF token bound to the user, and refused when the browser
//!   says the request came from another site;
//! - every response carries a Content-Security-Policy that allows no script, no frame and no
//!   outside resource; text from the table is escaped ([`html::esc`]);
//! - every action is logged with its user, its filter and its count.

mod actions;
pub mod html;
mod pages;

use crate::config::{Config, ConsoleConfig, ConsoleUser, Role};
use crate::store::Store;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use hmac::{Hmac, Mac};
use secrecy::ExposeSecret;
use sha2::Sha256;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

pub use actions::Jobs;

/// The user a request is made by.
#[derive(Debug, Clone)]
pub struct Who {
    pub name: String,
    pub role: Role,
}

/// What every handler shares.
pub struct Console {
    pub store: Store,
    pub config: ConsoleConfig,
    /// The whole configuration, when it loads: replay to a topic needs its `[kafka]`.
    pub kafka: Result<Box<Config>, String>,
    /// Signs the CSRF tokens; new at each start, so a restart asks for a fresh page.
    csrf_key: [u8; 32],
    pub jobs: Jobs,
    /// Ends the bulk actions under way between two chunks when the console stops.
    pub stop: CancellationToken,
}

type Shared = Arc<Console>;

impl Console {
    pub fn new(
        store: Store,
        config: ConsoleConfig,
        kafka: Result<Box<Config>, String>,
        stop: CancellationToken,
    ) -> Shared {
        Arc::new(Console {
            store,
            config,
            kafka,
            csrf_key: rand::random(),
            jobs: Jobs::default(),
            stop,
        })
    }

    /// The CSRF token of `who`'s forms: an HMAC of the user's name under this process's key.
    pub fn csrf_token(&self, who: &Who) -> String {
        csrf_token(&self.csrf_key, &who.name)
    }

    fn csrf_ok(&self, who: &Who, token: &str) -> bool {
        csrf_ok(&self.csrf_key, &who.name, token)
    }
}

fn csrf_mac(key: &[u8; 32], user: &str) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("any key length");
    mac.update(user.as_bytes());
    mac
}

fn csrf_token(key: &[u8; 32], user: &str) -> String {
    hex(&csrf_mac(key, user).finalize().into_bytes())
}

/// Whether `token` is `user`'s, compared in constant time.
fn csrf_ok(key: &[u8; 32], user: &str, token: &str) -> bool {
    unhex(token).is_some_and(|bytes| csrf_mac(key, user).verify_slice(&bytes).is_ok())
}

/// `redrive console`: loads `[postgres]` and `[console]` (and the whole configuration, for replay
/// to a topic, when it loads), connects, and serves until SIGINT or SIGTERM.
pub async fn run(
    path: Option<&std::path::Path>,
    args: &crate::cli::ConsoleArgs,
) -> anyhow::Result<()> {
    use anyhow::Context;
    let mut settings = crate::config::ConsoleSettings::load(path)?;
    if let Some(listen) = args.listen {
        settings.console.listen = listen;
        settings.console.validate()?;
    }
    let store = crate::ops::connect(&settings.postgres).await?;
    let kafka = Config::load(path).map(Box::new).map_err(|e| format!("{e}"));
    let stop = crate::shutdown::on_signals().context("installing signal handlers")?;
    let console = Console::new(store, settings.console, kafka, stop.clone());
    serve(console, stop).await
}

/// Serves the console until `shutdown`.
pub async fn serve(console: Shared, shutdown: CancellationToken) -> anyhow::Result<()> {
    use anyhow::Context;
    let listen = console.config.listen;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding the console on {listen} (`console.listen`)"))?;
    let signin = if console.config.users.is_empty() {
        "no sign-in (loopback only)".to_string()
    } else {
        format!("{} user(s) may sign in", console.config.users.len())
    };
    tracing::info!(%listen, "console serving on http://{listen}/ ({signin})");
    println!("redrive console: http://{listen}/ ({signin})");
    axum::serve(listener, router(console))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await?;
    Ok(())
}

/// Every route, behind sign-in and the security headers.
pub fn router(console: Shared) -> Router {
    Router::new()
        .route("/", get(pages::overview))
        .route("/messages", get(pages::browse))
        .route("/messages/{id}", get(pages::detail))
        .route("/preview", post(actions::preview))
        .route("/run", post(actions::run))
        .route("/jobs", get(actions::jobs))
        .route("/jobs/{id}", get(actions::job))
        .route("/console.css", get(css))
        .layer(middleware::from_fn_with_state(console.clone(), sign_in))
        .layer(middleware::from_fn(security_headers))
        .with_state(console)
}

async fn css() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        html::CSS,
    )
}

/// Finds who is asking, or answers 401. With no users configured the console listens on loopback
/// only, and everyone is the operating-system user who started it, as an operator.
async fn sign_in(State(console): State<Shared>, mut request: Request, next: Next) -> Response {
    let who = if console.config.users.is_empty() {
        if let Err(why) = loopback_host(request.headers()) {
            tracing::warn!("console: refused a request: {why}");
            return (StatusCode::FORBIDDEN, format!("refused: {why}\n")).into_response();
        }
        Some(Who {
            name: whoami::username().unwrap_or_else(|_| "console".into()),
            role: Role::Operator,
        })
    } else {
        identify(&console.config.users, request.headers())
    };
    let Some(who) = who else {
        return (
            StatusCode::UNAUTHORIZED,
            [(
                header::WWW_AUTHENTICATE,
                r#"Basic realm="redrive console", charset="UTF-8""#,
            )],
            "sign in: a console user's name and password, or a bearer token\n",
        )
            .into_response();
    };
    if request.method() == Method::POST {
        if let Err(why) = same_site(request.headers()) {
            tracing::warn!(user = %who.name, path = %request.uri().path(), "console: refused a POST: {why}");
            return (StatusCode::FORBIDDEN, format!("refused: {why}\n")).into_response();
        }
    }
    request.extensions_mut().insert(who);
    next.run(request).await
}

/// Without sign-in, a request must name the console by a loopback address or `localhost`: a page
/// of another site whose name was made to resolve to 127.0.0.1 (DNS rebinding) is refused.
fn loopback_host(headers: &HeaderMap) -> Result<(), String> {
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    let loopback = name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if loopback {
        Ok(())
    } else {
        Err(format!(
            "the console without sign-in answers only to a loopback address or localhost, not to {host:?}"
        ))
    }
}

/// The user whose password or token the request carries.
fn identify(users: &[ConsoleUser], headers: &HeaderMap) -> Option<Who> {
    use base64::Engine;
    let auth = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, value) = auth.split_once(' ')?;
    let found = if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(value.trim())
            .ok()?;
        let decoded = String::from_utf8(decoded).ok()?;
        let (name, password) = decoded.split_once(':')?;
        users.iter().find(|u| {
            u.name == name
                && u.password
                    .as_ref()
                    .is_some_and(|p| same(p.expose_secret(), password))
        })
    } else if scheme.eq_ignore_ascii_case("bearer") {
        let token = value.trim();
        users.iter().find(|u| {
            u.token
                .as_ref()
                .is_some_and(|t| same(t.expose_secret(), token))
        })
    } else {
        None
    }?;
    Some(Who {
        name: found.name.clone(),
        role: found.role,
    })
}

/// Compares two secrets in time that does not depend on where they differ.
fn same(a: &str, b: &str) -> bool {
    use sha2::Digest;
    let (a, b) = (Sha256::digest(a.as_bytes()), Sha256::digest(b.as_bytes()));
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// Refuses a POST the browser says came from another site: by `Sec-Fetch-Site` where the browser
/// sends it, else by an `Origin` that is not this host. Requests with neither (scripts, old
/// browsers) still need the CSRF token.
fn same_site(headers: &HeaderMap) -> Result<(), String> {
    let text = |name| {
        headers
            .get(name)
            .and_then(|v: &HeaderValue| v.to_str().ok())
    };
    if let Some(site) = text("sec-fetch-site") {
        return match site {
            "same-origin" | "none" => Ok(()),
            _ => Err(format!(
                "the request came from another site (Sec-Fetch-Site: {site})"
            )),
        };
    }
    if let (Some(origin), Some(host)) = (text("origin"), text("host")) {
        let origin_host = origin.split_once("://").map_or(origin, |(_, h)| h);
        if origin_host != host {
            return Err(format!("the request came from {origin}, not {host}"));
        }
    }
    Ok(())
}

/// The headers of every response: a policy that allows no script, frame, plugin or outside
/// resource, and no caching of pages that show production data.
async fn security_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let h = response.headers_mut();
    let set = |h: &mut HeaderMap, name: &'static str, value: &'static str| {
        h.insert(name, HeaderValue::from_static(value));
    };
    set(
        h,
        "content-security-policy",
        "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; \
         frame-ancestors 'none'; base-uri 'none'",
    );
    set(h, "x-content-type-options", "nosniff");
    set(h, "x-frame-options", "DENY");
    set(h, "referrer-policy", "same-origin");
    set(h, "cache-control", "no-store");
    response
}

/// An HTML page response.
pub fn html_response(body: String) -> Response {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        Body::from(body),
    )
        .into_response()
}

/// An error page: the status, and what went wrong in words.
pub fn problem(status: StatusCode, who: &Who, what: &str) -> Response {
    let body = html::page(
        status.canonical_reason().unwrap_or("Error"),
        who,
        &format!(r#"<p class="err">{}</p>"#, html::esc(what)),
    );
    (status, html_response(body)).into_response()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str, role: Role, password: Option<&str>, token: Option<&str>) -> ConsoleUser {
        ConsoleUser {
            name: name.into(),
            role,
            password: password.map(Into::into),
            token: token.map(Into::into),
        }
    }

    #[test]
    fn a_user_is_known_by_password_or_token_and_nothing_else() {
        use base64::Engine;
        let users = [
            user("ann", Role::Operator, Some("correct horse"), None),
            user("bot", Role::ReadOnly, None, Some("a-long-bearer-token")),
        ];
        let with = |auth: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, auth.parse().unwrap());
            identify(&users, &h).map(|w| (w.name, w.role))
        };
        let basic = |s: &str| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(s)
            )
        };
        assert_eq!(
            with(&basic("ann:correct horse")),
            Some(("ann".into(), Role::Operator))
        );
        assert_eq!(with(&basic("ann:wrong")), None);
        assert_eq!(
            with(&basic("bot:a-long-bearer-token")),
            None,
            "a token is no password"
        );
        assert_eq!(
            with("Bearer a-long-bearer-token"),
            Some(("bot".into(), Role::ReadOnly))
        );
        assert_eq!(with("Bearer correct horse"), None);
        assert_eq!(identify(&users, &HeaderMap::new()).map(|w| w.name), None);
    }

    #[test]
    fn a_csrf_token_is_bound_to_its_user_and_its_process() {
        let token = csrf_token(&[7; 32], "ann");
        assert!(csrf_ok(&[7; 32], "ann", &token));
        assert!(!csrf_ok(&[7; 32], "bob", &token));
        assert!(!csrf_ok(&[8; 32], "ann", &token));
        assert!(!csrf_ok(&[7; 32], "ann", ""));
        assert!(!csrf_ok(&[7; 32], "ann", "zz"));
    }

    #[test]
    fn without_sign_in_only_a_loopback_host_is_served() {
        let host = |h: &str| {
            let mut m = HeaderMap::new();
            m.insert(header::HOST, h.parse().unwrap());
            loopback_host(&m).is_ok()
        };
        assert!(host("127.0.0.1:8089") && host("localhost:8089") && host("[::1]:8089"));
        assert!(host("127.0.0.2") && host("LOCALHOST"));
        assert!(!host("evil.example:8089") && !host("10.0.0.5:8089") && !host("[2001:db8::1]:80"));
        assert!(loopback_host(&HeaderMap::new()).is_err());
    }

    #[test]
    fn a_post_from_another_site_is_refused() {
        let headers = |pairs: &[(&'static str, &str)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.insert(*k, v.parse().unwrap());
            }
            h
        };
        assert!(same_site(&headers(&[])).is_ok());
        assert!(same_site(&headers(&[("sec-fetch-site", "same-origin")])).is_ok());
        assert!(same_site(&headers(&[("sec-fetch-site", "cross-site")])).is_err());
        assert!(same_site(&headers(&[
            ("origin", "http://127.0.0.1:8089"),
            ("host", "127.0.0.1:8089")
        ]))
        .is_ok());
        assert!(same_site(&headers(&[
            ("origin", "https://evil.example"),
            ("host", "127.0.0.1:8089")
        ]))
        .is_err());
        assert!(same_site(&headers(&[("origin", "null"), ("host", "127.0.0.1:8089")])).is_err());
        assert!(same_site(&headers(&[
            ("sec-fetch-site", "same-origin"),
            ("origin", "null")
        ]))
        .is_ok());
    }
}
