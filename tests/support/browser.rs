//! A real headless browser (Debian's `chromium`) loading a page: the DOM it built, after its
//! scripts ran, for the dashboard tests.

use std::time::Duration;

/// The browser to run: `$QUICTUN_CHROMIUM`, else the first of `chromium`, `chromium-browser`,
/// `google-chrome` that starts.
pub fn browser() -> String {
    let named = std::env::var("QUICTUN_CHROMIUM").ok();
    named
        .into_iter()
        .chain(["chromium", "chromium-browser", "google-chrome"].map(String::from))
        .find(|b| std::process::Command::new(b).arg("--version").output().is_ok_and(|o| o.status.success()))
        .expect("a headless browser: apt-get install chromium (or set QUICTUN_CHROMIUM)")
}

/// Loads `url` in a fresh headless browser profile and returns the DOM once the page has run
/// for `budget` of virtual time (its timers run; the time waiting on the network is not
/// counted), under a 60 s deadline.
pub async fn dump_dom(url: &str, budget: Duration) -> String {
    let profile = std::env::temp_dir().join(format!("quictun-browser-{}", uuid::Uuid::new_v4().simple()));
    let output = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(browser())
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--disable-extensions",
                "--disable-background-networking",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg(format!("--virtual-time-budget={}", budget.as_millis()))
            .arg("--dump-dom")
            .arg(url)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the browser did not finish within 60 s")
    .expect("the browser starts");
    let _ = std::fs::remove_dir_all(&profile);
    assert!(output.status.success(), "the browser failed: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The inner HTML of the element with `id` in a dumped DOM (up to its first closing tag of the
/// same name), or an empty string.
pub fn element<'a>(dom: &'a str, tag: &str, id: &str) -> &'a str {
    let open = format!("<{tag} id=\"{id}\"");
    let Some(start) = dom.find(&open) else { return "" };
    let rest = &dom[start..];
    let body = rest.find('>').map_or("", |i| &rest[i + 1..]);
    body.find(&format!("</{tag}>")).map_or(body, |end| &body[..end])
}
