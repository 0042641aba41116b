//! The web console (`redrive console`) in a real browser: headless Chromium from Debian's packages,
//! driven through chromedriver (`scripts/browser.sh install`, which `make test` runs), on a real
//! Postgres. The security checks that need no browser use plain HTTP.

use crate::helpers::*;
use fantoccini::{Client, ClientBuilder, Locator};
use redrive::config::ConsoleConfig;
use redrive::console::{router, Console};
use std::net::SocketAddr;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const ANN: (&str, &str) = ("ann", "ann-password-1234");
const RITA: (&str, &str) = ("rita", "rita-password-1234");

/// A console on a free loopback port, with an operator (ann) and a read-only user (rita).
async fn console(db: &TestDb) -> (SocketAddr, CancellationToken) {
    console_with(db, 50, Err("no [kafka] in this test".into())).await
}

async fn console_with(
    db: &TestDb,
    page_size: u32,
    kafka: Result<Box<redrive::Config>, String>,
) -> (SocketAddr, CancellationToken) {
    let config = ConsoleConfig::from_toml(&format!(
        "listen = \"127.0.0.1:0\"\nchunk_size = 2\npage_size = {page_size}\n\
         [[users]]\nname = \"{}\"\nrole = \"operator\"\npassword = \"{}\"\n\
         [[users]]\nname = \"{}\"\nrole = \"read-only\"\npassword = \"{}\"\n",
        ANN.0, ANN.1, RITA.0, RITA.1
    ))
    .unwrap();
    let stop = CancellationToken::new();
    let console = Console::new(db.store.clone(), config, kafka, stop.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let s = stop.clone();
    tokio::spawn(async move {
        axum::serve(listener, router(console))
            .with_graceful_shutdown(async move { s.cancelled().await })
            .await
            .unwrap();
    });
    (addr, stop)
}

/// Ann's HTTP client: GETs a page, and POSTs a form with her CSRF token as a browser would.
struct Operator {
    http: reqwest::Client,
    base: String,
    csrf: String,
}

impl Operator {
    async fn new(addr: SocketAddr) -> Operator {
        let http = reqwest::Client::new();
        let base = format!("http://{addr}");
        let page = http
            .get(format!("{base}/messages"))
            .basic_auth(ANN.0, Some(ANN.1))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let csrf = page
            .split(r#"name="csrf" value=""#)
            .nth(1)
            .expect("an operator's page holds a CSRF token")
            .split('"')
            .next()
            .unwrap()
            .to_string();
        Operator { http, base, csrf }
    }

    async fn get(&self, path: &str) -> String {
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .basic_auth(ANN.0, Some(ANN.1))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "GET {path}: {}", r.status());
        r.text().await.unwrap()
    }

    /// POSTs `form` (with the token added) to `path`; returns the final page after redirects.
    async fn post(&self, path: &str, form: &[(&str, &str)]) -> String {
        let mut fields: Vec<(&str, &str)> = form.to_vec();
        fields.push(("csrf", &self.csrf));
        let r = self
            .http
            .post(format!("{}{path}", self.base))
            .basic_auth(ANN.0, Some(ANN.1))
            .header("sec-fetch-site", "same-origin")
            .form(&fields)
            .send()
            .await
            .unwrap();
        let status = r.status();
        let body = r.text().await.unwrap();
        assert!(status.is_success(), "POST {path}: {status}: {body}");
        body
    }
}

/// Headless Chromium behind a chromedriver of its own; both end when it is dropped.
struct Browser {
    client: Client,
    _driver: tokio::process::Child,
}

impl Browser {
    async fn start() -> Browser {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let driver = tokio::process::Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("chromedriver is installed: run scripts/browser.sh install (make test does)");
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1400,1000"]
            }),
        );
        let client = wait_for(
            "chromedriver to start a browser",
            Duration::from_secs(60),
            || {
                let caps = caps.clone();
                async move {
                    // chromedriver speaks plain HTTP on loopback: no TLS.
                    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
                        .capabilities(caps)
                        .connect(&format!("http://127.0.0.1:{port}"))
                        .await
                        .ok()
                }
            },
        )
        .await;
        Browser {
            client,
            _driver: driver,
        }
    }

    /// Opens `path` of the console as `user` (credentials in the URL: HTTP basic authentication).
    async fn open(&self, addr: SocketAddr, user: (&str, &str), path: &str) {
        self.client
            .goto(&format!("http://{}:{}@{addr}{path}", user.0, user.1))
            .await
            .unwrap();
    }

    async fn texts(&self, css: &str) -> Vec<String> {
        let mut out = Vec::new();
        for e in self.client.find_all(Locator::Css(css)).await.unwrap() {
            out.push(e.text().await.unwrap());
        }
        out
    }

    async fn text(&self, css: &str) -> String {
        match self.client.find(Locator::Css(css)).await {
            Ok(e) => e.text().await.unwrap(),
            Err(e) => panic!("no {css} ({e}) on this page:\n{}", self.page().await),
        }
    }

    /// The page's text, for a failure's message.
    async fn page(&self) -> String {
        let url = self.client.current_url().await.map(|u| u.to_string());
        let source = self.client.source().await.unwrap_or_default();
        format!("{url:?}\n{source}")
    }

    async fn fill(&self, css: &str, value: &str) {
        let e = self.client.find(Locator::Css(css)).await.unwrap();
        e.clear().await.unwrap();
        e.send_keys(value).await.unwrap();
    }

    /// Clicks what `css` finds, and waits until the page it leads to has replaced this one.
    async fn click(&self, css: &str) {
        let old = self.client.find(Locator::Css("html")).await.unwrap();
        match self.client.find(Locator::Css(css)).await {
            Ok(e) => e.click().await.unwrap(),
            Err(e) => panic!("no {css} ({e}) on this page:\n{}", self.page().await),
        }
        wait_for("the next page", Duration::from_secs(30), || async {
            old.tag_name().await.is_err().then_some(())
        })
        .await;
    }

    /// Waits until the action page says how its action ended, and returns that.
    async fn outcome(&self) -> String {
        wait_for("the action to end", Duration::from_secs(30), || async {
            let text = self
                .client
                .find(Locator::Id("outcome"))
                .await
                .ok()?
                .text()
                .await
                .ok()?;
            (!text.starts_with("Running")).then_some(text)
        })
        .await
    }

    async fn close(self) {
        self.client.close().await.unwrap();
    }
}

/// A dead row, published to its DLQ topic (so a purge may take it).
struct Dead<'a> {
    topic: &'a str,
    offset: i64,
    error: &'a str,
    key: Option<&'a [u8]>,
    payload: &'a [u8],
    headers: serde_json::Value,
}

impl Dead<'_> {
    fn of(topic: &str, offset: i64, error: &str) -> Dead<'static> {
        Dead {
            topic: Box::leak(topic.to_string().into_boxed_str()),
            offset,
            error: Box::leak(error.to_string().into_boxed_str()),
            key: Some(b"k"),
            payload: br#"{"order": 42}"#,
            headers: serde_json::json!([]),
        }
    }

    async fn insert(&self, db: &TestDb) -> Uuid {
        let id = Uuid::now_v7();
        sqlx::query(
            r#"INSERT INTO redrive.retry_messages (id, consumer_group, topic, "partition",
                   kafka_offset, key, payload, headers, state, attempts, max_attempts,
                   next_attempt_at, last_error, error_kind, error_history, dead_at,
                   dlq_published_at, dlq_topic)
               VALUES ($1, 'g', $2, 0, $3, $4, $5, $6, 'dead', 3, 3, now(), $7, 'retryable',
                   jsonb_build_array(jsonb_build_object('at', now(), 'attempt', 3,
                                                        'kind', 'retryable', 'error', $7)),
                   now(), now(), $2 || '.dlq')"#,
        )
        .bind(id)
        .bind(self.topic)
        .bind(self.offset)
        .bind(self.key)
        .bind(self.payload)
        .bind(&self.headers)
        .bind(self.error)
        .execute(db.pool())
        .await
        .unwrap();
        id
    }
}

async fn states(db: &TestDb, topic: &str) -> Vec<(i64, String, Option<String>, Option<String>)> {
    sqlx::query_as(
        "SELECT kafka_offset, state, last_replayed_by, last_replay_reason
         FROM redrive.retry_messages WHERE topic = $1 ORDER BY kafka_offset",
    )
    .bind(topic)
    .fetch_all(db.pool())
    .await
    .unwrap()
}

/// An operator filters by topic and error text, opens a binary message, replays the filtered rows
/// after a preview, purges others after a preview, and pauses and resumes a topic. Each change is
/// checked in SQL: exactly the previewed rows, with the user and the reason recorded.
#[tokio::test]
async fn an_operator_filters_inspects_replays_purges_and_pauses_in_the_browser() {
    let db = TestDb::new().await;
    for (offset, error) in [
        (1, "HTTP 500 from billing"),
        (2, "timeout after 10s"),
        (3, "HTTP 500 from billing"),
        (4, "HTTP 500 from billing"),
    ] {
        Dead::of("orders", offset, error).insert(&db).await;
    }
    for offset in [1, 2, 3] {
        Dead::of("payments", offset, "HTTP 500 from billing")
            .insert(&db)
            .await;
    }
    let binary = Dead {
        key: Some(&[0xff, 0x00, 0x41]),
        payload: &[0x00, 0xff, 0xfe, 0x10, b'<', b'a'],
        headers: serde_json::json!([
            {"key": "trace", "value": "/wA="},
            {"key": "content-type", "value": "dGV4dC9wbGFpbg=="},
            {"key": "empty", "value": null}
        ]),
        ..Dead::of("binary", 7, "bad bytes")
    }
    .insert(&db)
    .await;
    let (addr, stop) = console(&db).await;
    let b = Browser::start().await;

    // Filter by topic and error text through the form: the URL carries the filters.
    b.open(addr, ANN, "/messages").await;
    b.fill("form.filters input[name=topic]", "orders").await;
    b.fill("form.filters input[name=error]", "BILLING").await;
    b.click("form.filters button.primary").await;
    let url = b.client.current_url().await.unwrap();
    assert!(
        url.as_str().contains("topic=orders") && url.as_str().contains("error=BILLING"),
        "{url}"
    );
    let mut offsets = b.texts("td.num a").await;
    offsets.sort();
    assert_eq!(offsets, ["1", "3", "4"]);

    // Replay what the filter matches: the preview counts and samples them, then asks why.
    b.click("button[value=replay-matching]").await;
    assert_eq!(b.text("p.banner strong").await, "3");
    assert_eq!(b.texts("table tr td:nth-child(2)").await.len(), 3);
    b.fill("input[name=reason]", "INC-7 billing fixed").await;
    b.click("form[action='/run'] button").await;
    assert!(b.outcome().await.starts_with("Done: 3 row(s)"));
    let replayed = Some("ann".to_string());
    let reason = Some("INC-7 billing fixed".to_string());
    assert_eq!(
        states(&db, "orders").await,
        [
            (1, "pending".into(), replayed.clone(), reason.clone()),
            (2, "dead".into(), None, None),
            (3, "pending".into(), replayed.clone(), reason.clone()),
            (4, "pending".into(), replayed, reason),
        ]
    );

    // A binary message: the payload as hex, the key and a header that are not UTF-8 in base64,
    // and the trace id of its first delivery.
    sqlx::query("UPDATE redrive.retry_messages SET trace_context = $2 WHERE id = $1")
        .bind(binary)
        .bind("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        .execute(db.pool())
        .await
        .unwrap();
    b.open(addr, ANN, &format!("/messages/{binary}")).await;
    let hex = b.text("pre.hex").await;
    assert!(hex.contains("00 ff fe 10 3c 61"), "{hex}");
    let headers = b.texts("table tr").await.join("\n");
    assert!(
        headers.contains("trace not UTF-8, base64: /wA="),
        "{headers}"
    );
    assert!(headers.contains("content-type text/plain"), "{headers}");
    assert!(headers.contains("empty (null)"), "{headers}");
    let body = b.text("main").await;
    assert!(body.contains("not UTF-8: base64\n/wBB"), "{body}");
    assert!(
        body.contains("trace\n4bf92f3577b34da6a3ce929d0e0e4736"),
        "{body}"
    );

    // Purge two selected rows of payments, after a preview.
    b.open(addr, ANN, "/messages?topic=payments").await;
    let boxes = b
        .client
        .find_all(Locator::Css("input[name=id]"))
        .await
        .unwrap();
    assert_eq!(boxes.len(), 3);
    for checkbox in &boxes[..2] {
        checkbox.click().await.unwrap();
    }
    b.click("button[value=purge-selected]").await;
    assert_eq!(b.text("p.banner strong").await, "2");
    b.fill("input[name=reason]", "old noise").await;
    b.click("form[action='/run'] button").await;
    assert!(b.outcome().await.starts_with("Done: 2 row(s)"));
    assert_eq!(states(&db, "payments").await.len(), 1);

    // Pause a topic, then resume it, each after a preview.
    b.open(addr, ANN, "/").await;
    b.fill("input[name=pause_topic]", "orders").await;
    b.click("form.actions button").await;
    assert!(b
        .text("p.banner")
        .await
        .contains("3 pending row(s) become paused"));
    b.fill("input[name=reason]", "billing deploy").await;
    b.click("form[action='/run'] button").await;
    assert!(b.outcome().await.starts_with("Done: topic orders paused"));
    let paused: (String, Option<String>) = sqlx::query_as(
        "SELECT paused_by, reason FROM redrive.paused_topics WHERE topic = 'orders'",
    )
    .fetch_one(db.pool())
    .await
    .unwrap();
    assert_eq!(paused, ("ann".into(), Some("billing deploy".into())));
    assert_eq!(db.count("topic = 'orders' AND state = 'paused'").await, 3);
    b.open(addr, ANN, "/").await;
    b.click("form[action='/preview'] button").await;
    assert!(b
        .text("p.banner")
        .await
        .contains("3 paused row(s) become pending"));
    b.fill("input[name=reason]", "deploy done").await;
    b.click("form[action='/run'] button").await;
    assert!(b.outcome().await.starts_with("Done: topic orders resumed"));
    assert_eq!(db.count("topic = 'orders' AND state = 'pending'").await, 3);
    assert_eq!(db.count("true").await, 6);

    b.close().await;
    stop.cancel();
}

/// A payload and an error made of markup are shown as text and never run; a read-only user sees
/// no action and no selection box.
#[tokio::test]
async fn markup_in_a_message_is_text_and_a_read_only_user_sees_no_action() {
    let db = TestDb::new().await;
    let attack =
        r#"<script>document.title='pwned'</script><img src=x onerror="document.title='pwned'">"#;
    let id = Dead {
        payload: attack.as_bytes(),
        key: Some(attack.as_bytes()),
        headers: serde_json::json!([{"key": "<b>h</b>", "value": "PHNjcmlwdD54PC9zY3JpcHQ+"}]),
        ..Dead::of("<i>topic</i>", 1, attack)
    }
    .insert(&db)
    .await;
    let (addr, stop) = console(&db).await;
    let b = Browser::start().await;

    for path in [format!("/messages/{id}"), "/messages".into(), "/".into()] {
        b.open(addr, ANN, &path).await;
        assert_ne!(b.client.title().await.unwrap(), "pwned", "{path}");
        let injected: serde_json::Value = b
            .client
            .execute(
                "return document.querySelectorAll('main script, main img, main b, main i').length",
                vec![],
            )
            .await
            .unwrap();
        assert_eq!(injected, 0, "{path}: markup from the table became elements");
        let text = b.text("main").await;
        assert!(
            text.contains("<script>document.title='pwned'</script>")
                || text.contains("<i>topic</i>"),
            "{path}: {text}"
        );
    }

    b.open(addr, RITA, "/messages").await;
    assert!(b.text("main").await.contains("<i>topic</i>"));
    assert!(b
        .client
        .find_all(Locator::Css(
            "main button:not(.primary), input[type=checkbox]"
        ))
        .await
        .unwrap()
        .is_empty());
    b.open(addr, RITA, &format!("/messages/{id}")).await;
    assert!(b
        .client
        .find_all(Locator::Css("form[action='/preview']"))
        .await
        .unwrap()
        .is_empty());
    b.open(addr, RITA, "/").await;
    assert!(b
        .client
        .find_all(Locator::Css("form[action='/preview']"))
        .await
        .unwrap()
        .is_empty());

    b.close().await;
    stop.cancel();
}

/// The doors without a browser: no sign-in, a forged POST of a read-only user, a POST without or
/// with a wrong CSRF token, and one from another site are all refused, and change nothing.
#[tokio::test]
async fn sign_in_roles_and_csrf_tokens_guard_every_change() {
    let db = TestDb::new().await;
    Dead::of("orders", 1, "boom").insert(&db).await;
    let (addr, stop) = console(&db).await;
    let http = reqwest::Client::new();
    let base = format!("http://{addr}");

    let anon = http.get(format!("{base}/")).send().await.unwrap();
    assert_eq!(anon.status(), 401);
    assert!(anon.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .starts_with("Basic"));
    let wrong = http
        .get(format!("{base}/"))
        .basic_auth(ANN.0, Some("nope"))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);

    // Ann's page holds her token; every response has the policy.
    let page = http
        .get(format!("{base}/messages"))
        .basic_auth(ANN.0, Some(ANN.1))
        .send()
        .await
        .unwrap();
    let csp = page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        csp.contains("default-src 'none'") && csp.contains("frame-ancestors 'none'"),
        "{csp}"
    );
    let body = page.text().await.unwrap();
    let token = body
        .split(r#"name="csrf" value=""#)
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap()
        .to_string();

    let post = |user: (&'static str, &'static str), form: String, site: Option<&'static str>| {
        let mut r = http
            .post(format!("{base}/run"))
            .basic_auth(user.0, Some(user.1))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form);
        if let Some(site) = site {
            r = r.header("sec-fetch-site", site);
        }
        r.send()
    };
    let form =
        |csrf: &str| format!("action=replay-matching&topic=orders&reason=forged&csrf={csrf}");

    let r = post(RITA, form(&token), None).await.unwrap();
    assert_eq!(r.status(), 403);
    assert!(r
        .text()
        .await
        .unwrap()
        .contains("your role is read-only: actions need the operator role"));
    let r = post(
        ANN,
        "action=replay-matching&topic=orders&reason=forged".into(),
        None,
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 403);
    assert!(r
        .text()
        .await
        .unwrap()
        .contains("CSRF token is missing or stale"));
    assert_eq!(post(ANN, form("00ff"), None).await.unwrap().status(), 403);
    assert_eq!(
        post(ANN, form(&token), Some("cross-site"))
            .await
            .unwrap()
            .status(),
        403
    );
    assert_eq!(
        db.count("state = 'dead'").await,
        1,
        "a refused POST changed a row"
    );

    // The same form with the token, from the page's own site, goes through.
    let r = http
        .post(format!("{base}/run"))
        .basic_auth(ANN.0, Some(ANN.1))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("sec-fetch-site", "same-origin")
        .body(form(&token))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    wait_for("the replay", Duration::from_secs(10), || async {
        (db.count("state = 'pending'").await == 1).then_some(())
    })
    .await;
    stop.cancel();
}

/// Without users the console serves loopback only: any other address is refused at startup, with
/// the reason.
#[tokio::test]
async fn without_users_a_non_loopback_address_is_refused() {
    let db = TestDb::new().await;
    let config = ops_config(&db.url);
    let ran = redrive(&config.0, &["console", "--listen", "0.0.0.0:0"]).await;
    assert_eq!(ran.code, Some(1), "{}", ran.stderr);
    assert!(
        ran.stderr
            .contains("`console.listen` is 0.0.0.0:0, which is not a loopback address"),
        "{}",
        ran.stderr
    );
}

/// Browsing pages through a filter with keyset links: every row once, newest first, and the
/// filters kept in each link.
#[tokio::test]
async fn pages_of_a_filter_hold_every_row_once_newest_first() {
    let db = TestDb::new().await;
    for offset in 0..7 {
        Dead::of("paged", offset, "boom").insert(&db).await;
        Dead::of("other", offset, "boom").insert(&db).await;
    }
    let (addr, stop) = console_with(&db, 3, Err(String::new())).await;
    let ann = Operator::new(addr).await;
    let mut seen = Vec::new();
    let mut path = "/messages?topic=paged&state=dead".to_string();
    for _ in 0..10 {
        let page = ann.get(&path).await;
        for cell in page.split(r#"<td class="num"><a href="/messages/"#).skip(1) {
            let offset = cell.split("\">").nth(1).unwrap().split('<').next().unwrap();
            seen.push(offset.parse::<i64>().unwrap());
        }
        match page
            .split(r#"<a href="/messages?"#)
            .find(|p| p.contains("next page"))
        {
            Some(link) => {
                let query = link.split('"').next().unwrap().replace("&amp;", "&");
                assert!(
                    query.starts_with("topic=paged&state=dead&before="),
                    "{query}"
                );
                path = format!("/messages?{query}");
            }
            None => break,
        }
    }
    assert_eq!(seen, [6, 5, 4, 3, 2, 1, 0]);
    stop.cancel();
}

/// "Retry now" makes a pending row due at once; a dead row is left alone.
#[tokio::test]
async fn retry_now_makes_a_pending_row_due() {
    let db = TestDb::new().await;
    let dead = Dead::of("t", 1, "boom").insert(&db).await;
    let pending = Dead::of("t", 2, "boom").insert(&db).await;
    sqlx::query(
        "UPDATE redrive.retry_messages SET state = 'pending', dead_at = NULL,
                dlq_published_at = NULL, next_attempt_at = now() + interval '1 hour'
         WHERE id = $1",
    )
    .bind(pending)
    .execute(db.pool())
    .await
    .unwrap();
    let (addr, stop) = console(&db).await;
    let ann = Operator::new(addr).await;
    let due = || async {
        db.count(&format!("id = '{pending}' AND next_attempt_at <= now()"))
            .await
    };
    assert_eq!(due().await, 0);
    let preview = ann
        .post(
            "/preview",
            &[("action", "retry-now"), ("id", &pending.to_string())],
        )
        .await;
    assert!(
        preview.contains("<strong>1</strong> pending row(s) become due now"),
        "{preview}"
    );
    let done = ann
        .post(
            "/run",
            &[
                ("action", "retry-now"),
                ("id", &pending.to_string()),
                ("reason", "customer waiting"),
            ],
        )
        .await;
    assert!(done.contains("Done: 1 row(s) due now"), "{done}");
    assert_eq!(due().await, 1);
    let queued: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM redrive.queue WHERE id = $1 AND next_attempt_at <= now()",
    )
    .bind(pending)
    .fetch_one(db.pool())
    .await
    .unwrap();
    assert_eq!(queued, 1, "the workers' queue did not follow");
    let refused = ann
        .post(
            "/preview",
            &[("action", "retry-now"), ("id", &dead.to_string())],
        )
        .await;
    assert!(
        refused.contains("Nothing to do: the row is not pending"),
        "{refused}"
    );
    stop.cancel();
}

/// Replay to a topic from the console: the records go to Kafka with the row's key, value and
/// headers and the replayed row's id, and the rows are marked replayed by the operator.
#[tokio::test]
async fn replay_to_a_topic_produces_the_records_and_marks_the_rows() {
    let db = TestDb::new().await;
    let (source, target) = (unique("source"), unique("target"));
    create_topic(&target, 1).await;
    for offset in [1, 2] {
        Dead {
            payload: format!("{{\"n\":{offset}}}").into_bytes().leak(),
            headers: serde_json::json!([{"key": "trace", "value": "dA=="}]),
            ..Dead::of(&source, offset, "boom")
        }
        .insert(&db)
        .await;
    }
    let kafka = Box::new(config(&db.url, &[&source], "g", None, ""));
    let (addr, stop) = console_with(&db, 50, Ok(kafka)).await;
    let ann = Operator::new(addr).await;
    let preview = ann
        .post(
            "/preview",
            &[("action", "replay-topic-matching"), ("topic", &source)],
        )
        .await;
    assert!(
        preview.contains("<strong>2</strong> row(s) are <strong>produced back to Kafka</strong>"),
        "{preview}"
    );
    let job = ann
        .post(
            "/run",
            &[
                ("action", "replay-topic-matching"),
                ("topic", &source),
                ("to_topic", &target),
                ("reason", "rebuild"),
            ],
        )
        .await;
    assert!(job.contains("id=\"outcome\""), "{job}");
    let records = read_topic_raw(&target, 2, Duration::from_secs(30)).await;
    let mut values: Vec<String> = records
        .iter()
        .map(|m| String::from_utf8(m.payload.clone().unwrap()).unwrap())
        .collect();
    values.sort();
    assert_eq!(values, [r#"{"n":1}"#, r#"{"n":2}"#]);
    assert!(records.iter().all(|m| m.key.as_deref() == Some(&b"k"[..])));
    assert!(records.iter().all(|m| m
        .headers
        .iter()
        .any(|h| h.key == b"redrive.replay.of" && h.value.is_some())));
    wait_for("the rows to be marked", Duration::from_secs(10), || async {
        let n = db
            .count(&format!(
                "topic = '{source}' AND state = 'replayed' AND replayed_to_topic = '{target}' \
                 AND last_replayed_by = 'ann' AND last_replay_reason = 'rebuild'"
            ))
            .await;
        (n == 2).then_some(())
    })
    .await;
    stop.cancel();
}

/// The browse list reads each kind of state apart (the queue for pending rows, their indexes for
/// the others) and merges them. Over rows of every state, two groups, three topics and four keys,
/// each filter's pages, read through `before`, hold exactly the rows `redrive.find` matches,
/// newest first, with a claimed row shown as running.
#[tokio::test]
async fn browse_pages_every_state_as_find_matches_them() {
    let db = TestDb::new().await;
    let states = ["pending", "paused", "waiting", "dead", "replayed"];
    for i in 0..60_i64 {
        let state = states[i as usize % 5];
        let finished = matches!(state, "dead" | "replayed");
        let id = Uuid::now_v7();
        sqlx::query(
            r#"INSERT INTO redrive.retry_messages (id, consumer_group, topic, "partition",
                   kafka_offset, key, payload, state, attempts, max_attempts, next_attempt_at,
                   last_error, error_kind, dead_at, order_key, order_on_dead)
               VALUES ($1, $2, $3, 0, $4, $5, 'x', $6, 1, 3, now(), $7, 'retryable',
                   CASE WHEN $8 THEN now() - make_interval(hours => $4::int) END,
                   CASE WHEN $6 = 'waiting' THEN sha256($5) END,
                   CASE WHEN $6 = 'waiting' THEN 'block' END)"#,
        )
        .bind(id)
        .bind(["g1", "g2"][i as usize % 2])
        .bind(["a", "b", "c"][i as usize % 3])
        .bind(i)
        .bind(format!("k{}", i % 4).into_bytes())
        .bind(state)
        .bind(format!("error {}", i % 6))
        .bind(finished)
        .execute(db.pool())
        .await
        .unwrap();
    }
    // Two pending rows claimed by a worker.
    sqlx::query(
        "UPDATE redrive.queue SET state = 'running', lease_expires_at = now() + interval '1 hour',
             locked_by = 'w', claim_token = gen_random_uuid()
         WHERE id IN (SELECT id FROM redrive.queue ORDER BY id LIMIT 2)",
    )
    .execute(db.pool())
    .await
    .unwrap();
    let of = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let every = of(&states);
    let state_sets = [
        every.clone(),
        of(&["pending"]),
        of(&["paused"]),
        of(&["waiting"]),
        of(&["dead"]),
        of(&["replayed"]),
        of(&["pending", "dead"]),
        of(&["paused", "waiting", "replayed"]),
    ];
    let some: Vec<Uuid> =
        sqlx::query_scalar("SELECT id FROM redrive.retry_messages ORDER BY id LIMIT 12 OFFSET 5")
            .fetch_all(db.pool())
            .await
            .unwrap();
    let filters = [
        redrive::store::find::Filter::default(),
        redrive::store::find::Filter {
            ids: some,
            ..Default::default()
        },
        redrive::store::find::Filter {
            topics: of(&["b"]),
            ..Default::default()
        },
        redrive::store::find::Filter {
            topics: of(&["a", "c"]),
            consumer_groups: of(&["g2"]),
            ..Default::default()
        },
        redrive::store::find::Filter {
            topics: of(&["nothing"]),
            ..Default::default()
        },
        redrive::store::find::Filter {
            key: Some("k1".into()),
            ..Default::default()
        },
        redrive::store::find::Filter {
            key: Some("k2".into()),
            error_contains: Some("ERROR 4".into()),
            ..Default::default()
        },
        redrive::store::find::Filter {
            dead_since: Some(chrono::Utc::now() - chrono::Duration::hours(30)),
            ..Default::default()
        },
        redrive::store::find::Filter {
            consumer_groups: of(&["g1"]),
            dead_before: Some(chrono::Utc::now()),
            ..Default::default()
        },
    ];
    let mut shown = 0;
    for states in &state_sets {
        for filter in &filters {
            let (ids, topics, groups, kinds) = (
                (!filter.ids.is_empty()).then_some(&filter.ids),
                (!filter.topics.is_empty()).then_some(&filter.topics),
                (!filter.consumer_groups.is_empty()).then_some(&filter.consumer_groups),
                (!filter.error_kinds.is_empty()).then_some(&filter.error_kinds),
            );
            let want: Vec<(Uuid, String)> = sqlx::query_as(
                "SELECT f.id, CASE WHEN q.state = 'running' THEN 'running' ELSE f.state END
                 FROM redrive.find($1, $2, $3, $4, $5, $6, $7, $8, $9) f
                 LEFT JOIN redrive.queue q ON q.id = f.id ORDER BY f.id DESC",
            )
            .bind(states)
            .bind(ids)
            .bind(topics)
            .bind(groups)
            .bind(&filter.key)
            .bind(&filter.error_contains)
            .bind(kinds)
            .bind(filter.dead_since)
            .bind(filter.dead_before)
            .fetch_all(db.pool())
            .await
            .unwrap();
            let mut got = Vec::new();
            let mut before = None;
            loop {
                let page = db.store.browse(states, filter, before, 4).await.unwrap();
                got.extend(page.iter().map(|r| (r.id, r.state.clone())));
                match page.last() {
                    Some(last) if page.len() == 4 => before = Some(last.id),
                    _ => break,
                }
            }
            assert_eq!(got, want, "states {states:?}, {filter:?}");
            shown += got.len();
        }
    }
    // The filters match something: every state, and the claimed rows as running.
    let all = db
        .store
        .browse(&every, &Default::default(), None, 100)
        .await
        .unwrap();
    assert_eq!(all.len(), 60);
    for state in [
        "pending", "running", "paused", "waiting", "dead", "replayed",
    ] {
        assert!(
            all.iter().any(|r| r.state == state),
            "no {state} row listed"
        );
    }
    assert!(shown > 300, "the filters matched {shown} rows in all");
}
