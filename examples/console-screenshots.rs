//! Screenshots of the web console for docs/: the overview, the messages of the demo's topic, one
//! dead message and a replay's preview, taken by headless Chromium through chromedriver.
//!
//!   console-screenshots http://127.0.0.1:8089 docs
//!
//! `scripts/screenshots.sh` (`make screenshots`) runs it on the demo's data.

use anyhow::{bail, Context};
use fantoccini::{Client, ClientBuilder, Locator};
use std::time::{Duration, Instant};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, base, dir] = args.as_slice() else {
        bail!("usage: console-screenshots <console URL> <directory>");
    };
    let base = base.trim_end_matches('/');
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let _driver = tokio::process::Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting chromedriver: run scripts/browser.sh install")?;
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({
            "binary": "/usr/bin/chromium",
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                     "--disable-dev-shm-usage", "--window-size=1280,860"]
        }),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let client = loop {
        let attempt = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps.clone())
            .connect(&format!("http://127.0.0.1:{port}"))
            .await;
        match attempt {
            Ok(c) => break c,
            Err(e) if Instant::now() >= deadline => bail!("chromedriver did not start: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    let result = shoot(&client, base, dir).await;
    client.close().await?;
    result
}

async fn shoot(c: &Client, base: &str, dir: &str) -> anyhow::Result<()> {
    let save = |name: &'static str| async move {
        let png = c.screenshot().await?;
        let path = std::path::Path::new(dir).join(name);
        std::fs::write(&path, png)?;
        println!("wrote {}", path.display());
        anyhow::Ok(())
    };
    c.goto(&format!("{base}/")).await?;
    save("console-overview.png").await?;
    c.goto(&format!("{base}/messages?state=dead")).await?;
    save("console-messages.png").await?;
    let first = c
        .find(Locator::Css("td.num a"))
        .await?
        .attr("href")
        .await?
        .context("a row link")?;
    c.set_window_size(1280, 1500).await?;
    c.goto(&format!("{base}{first}")).await?;
    save("console-message.png").await?;
    c.set_window_size(1280, 860).await?;
    c.goto(&format!("{base}/messages?state=dead")).await?;
    c.find(Locator::Css("button[value=replay-matching]"))
        .await?
        .click()
        .await?;
    c.wait()
        .at_most(Duration::from_secs(10))
        .for_element(Locator::Css("input[name=reason]"))
        .await?
        .send_keys("INC-1234: the handler is fixed")
        .await?;
    save("console-replay-preview.png").await?;
    Ok(())
}
