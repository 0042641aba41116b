//! HTML for the console: every text from the table (payloads, keys, errors, topic names, reasons)
//! goes through [`esc`], so a stored `<script>` is shown as text. The pages load no script: the
//! Content-Security-Policy allows none.

use super::Who;
use chrono::{DateTime, Utc};
use std::fmt::Write;

/// Escapes text for an HTML element or a double- or single-quoted attribute.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A query-string component.
pub fn q(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// A time as the pages show it, UTC, with how long ago or how soon.
pub fn when(t: Option<DateTime<Utc>>, now: DateTime<Utc>) -> String {
    esc(&crate::ops::when(t, now))
}

/// A whole page: the header with the navigation and the signed-in user, then `body`.
pub fn page(title: &str, who: &Who, body: &str) -> String {
    let mut out = String::with_capacity(body.len() + 1024);
    let _ = write!(
        out,
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title} · redrive</title><link rel="stylesheet" href="/console.css"></head>
<body><header><a class="brand" href="/">redrive</a><nav><a href="/">Overview</a><a href="/messages">Messages</a><a href="/jobs">Actions</a></nav><span class="who">{user} · {role}</span></header>
<main><h1>{title}</h1>
"#,
        title = esc(title),
        user = esc(&who.name),
        role = who.role.as_str(),
    );
    out.push_str(body);
    out.push_str("</main></body></html>\n");
    out
}

/// A hidden form field.
pub fn hidden(name: &str, value: &str) -> String {
    format!(
        r#"<input type="hidden" name="{}" value="{}">"#,
        esc(name),
        esc(value)
    )
}

/// Text clipped to `max` characters, on one line.
pub fn clip(s: &str, max: usize) -> String {
    esc(&crate::ops::clip(s, max))
}

/// The style sheet, served as `/console.css` (the policy allows no inline style).
pub const CSS: &str = r#"
:root { --fg: #1d2430; --muted: #5b6472; --line: #d9dee5; --bg: #f6f7f9; --accent: #1f5fbf; --bad: #b3261e; --warn: #9a6700; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--fg); background: var(--bg); }
header { display: flex; gap: 1.5rem; align-items: center; padding: .6rem 1.2rem; background: #1d2430; color: #fff; }
header a { color: #fff; text-decoration: none; margin-right: 1rem; }
header .brand { font-weight: 700; letter-spacing: .02em; }
header .who { margin-left: auto; color: #c9d1dc; }
main { padding: 1rem 1.2rem 3rem; max-width: 1400px; }
h1 { font-size: 1.3rem; margin: .2rem 0 1rem; }
h2 { font-size: 1.05rem; margin: 1.6rem 0 .5rem; }
table { border-collapse: collapse; background: #fff; width: 100%; }
th, td { border-bottom: 1px solid var(--line); padding: .35rem .5rem; text-align: left; vertical-align: top; }
th { font-weight: 600; color: var(--muted); background: #fbfbfc; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
.muted, .note { color: var(--muted); }
.note { font-size: 12px; margin: .3rem 0; }
.err { color: var(--bad); }
.state-dead { color: var(--bad); font-weight: 600; }
.state-pending, .state-running { color: var(--accent); }
.state-paused, .state-waiting { color: var(--warn); }
code, pre, .mono { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 12.5px; }
pre { background: #fff; border: 1px solid var(--line); padding: .6rem; overflow: auto; max-height: 32rem; white-space: pre-wrap; word-break: break-all; }
form.filters { display: flex; flex-wrap: wrap; gap: .5rem .8rem; align-items: end; background: #fff; padding: .7rem; border: 1px solid var(--line); margin-bottom: .8rem; }
form.filters label { display: flex; flex-direction: column; font-size: 12px; color: var(--muted); }
input, select, button { font: inherit; padding: .25rem .4rem; }
button { cursor: pointer; border: 1px solid var(--line); background: #fff; border-radius: 3px; }
button.primary { background: var(--accent); border-color: var(--accent); color: #fff; }
button.danger { background: var(--bad); border-color: var(--bad); color: #fff; }
.actions { display: flex; flex-wrap: wrap; gap: .5rem; margin: .6rem 0; align-items: center; }
.cards { display: flex; flex-wrap: wrap; gap: .8rem; }
.card { background: #fff; border: 1px solid var(--line); padding: .6rem .9rem; min-width: 11rem; }
.card .big { font-size: 1.5rem; font-weight: 600; }
.pager { margin: .6rem 0; display: flex; gap: 1rem; }
.banner { background: #fff4e5; border: 1px solid #f0c36d; padding: .5rem .8rem; margin: .6rem 0; }
.ok { background: #e8f5e9; border-color: #9ccc9c; }
ol.timeline { padding-left: 1.2rem; }
ol.timeline li { margin: .3rem 0; }
svg .failed { fill: #f0a35e; } svg .died { fill: #b3261e; } svg text { font-size: 11px; fill: #5b6472; }
dl.kv { display: grid; grid-template-columns: max-content 1fr; gap: .2rem 1rem; background: #fff; border: 1px solid var(--line); padding: .6rem .9rem; margin: 0; }
dl.kv dt { color: var(--muted); } dl.kv dd { margin: 0; }
progress { width: 24rem; height: 1rem; }
input[name=reason] { width: 28rem; }
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markup_in_text_is_escaped() {
        assert_eq!(
            esc(r#"<script>alert("x")</script> & 'y'"#),
            "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &#39;y&#39;"
        );
        assert_eq!(q("a b&c=d/é"), "a+b%26c%3Dd%2F%C3%A9");
    }
}
