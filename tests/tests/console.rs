//! The web console (`/console` on the operator port) of `embark up` with
//! the image model, in a real browser (Debian's Chromium, headless):
//! - the overview lists the model with its coverage and hit rate, read
//!   from the live `/metrics`;
//! - the near-duplicate explorer, opened on a fixture photo, shows its
//!   stored neighbours as loaded thumbnails with scores, the same bytes
//!   under another URL marked `identical`, the photo re-encoded marked
//!   near, distinct photos not;
//! - the console API answers errors as JSON, and every page carries its
//!   Content-Security-Policy.
//!
//! `EMBARK_CONSOLE_SCREENSHOT=path` also saves the page as a PNG there
//! (how docs/console.png is made).

use std::{collections::HashMap, path::PathBuf, time::Duration};

use embark_proto::embark::v1::{LookupRequest, Source};
use embark_tests::{Server, binary, eventually, http_fixtures::ImageServer};

const MODEL: &str = "efficientnet-lite0";

const PHOTOS: [&str; 22] = [
    "astronaut.jpg",
    "brick.jpg",
    "camera.jpg",
    "cell.jpg",
    "chelsea.jpg",
    "clock_motion.jpg",
    "coffee.jpg",
    "coins.jpg",
    "color.jpg",
    "grass.jpg",
    "gravel.jpg",
    "horse.jpg",
    "hubble_deep_field.jpg",
    "ihc.jpg",
    "logo.jpg",
    "microaneurysms.jpg",
    "moon.jpg",
    "motorcycle_left.jpg",
    "page.jpg",
    "retina.jpg",
    "rocket.jpg",
    "text.jpg",
];

fn chromium() -> PathBuf {
    let path = std::env::var_os("EMBARK_CHROMIUM").map(PathBuf::from).unwrap_or_else(|| "/usr/bin/chromium".into());
    assert!(
        path.is_file(),
        "no Chromium at {}: run scripts/install-chromium.sh (scripts/test.sh does)",
        path.display()
    );
    path
}

/// Runs headless Chromium on `url` with `args` (bounded), returns stdout.
async fn browse(url: &str, args: &[&str]) -> anyhow::Result<String> {
    let profile = tempfile::tempdir()?;
    let mut command = tokio::process::Command::new(chromium());
    command
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars"])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        // Virtual time: the page's timers and fetches run, then the
        // browser reports (network waits do not use up the budget).
        .args(["--virtual-time-budget=15000", "--window-size=1280,1500"])
        .args(args)
        .arg(url)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(120), command.output()).await??;
    anyhow::ensure!(out.status.success(), "chromium failed: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The attributes of every start tag in `html` that begins with `prefix`
/// (e.g. `<li class="neighbour`), as name → value.
fn tags(html: &str, prefix: &str) -> Vec<HashMap<String, String>> {
    html.match_indices(prefix)
        .map(|(at, _)| {
            let tag = &html[at + 1..at + html[at..].find('>').unwrap_or(0)];
            let mut attributes = HashMap::new();
            let mut rest = tag.split_once(' ').map_or("", |(_, r)| r);
            while let Some((name, after)) = rest.split_once("=\"") {
                let Some((value, next)) = after.split_once('"') else { break };
                let value = value.replace("&quot;", "\"").replace("&amp;", "&");
                attributes.insert(name.trim().to_owned(), value);
                rest = next;
            }
            attributes
        })
        .collect()
}

async fn json(response: reqwest::Response) -> anyhow::Result<serde_json::Value> {
    Ok(serde_json::from_slice(&response.bytes().await?)?)
}

fn encode(query: &str) -> String {
    query
        .bytes()
        .map(|b| if b.is_ascii_alphanumeric() { (b as char).to_string() } else { format!("%{b:02X}") })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_shows_coverage_and_the_near_duplicates_of_a_photo_in_a_browser() -> anyhow::Result<()> {
    let images = ImageServer::start().await?;
    let data = tempfile::tempdir()?;
    let embark = Server::start(
        &binary("embark"),
        // The photos are served on loopback.
        &[
            "up",
            "--models",
            MODEL,
            "--data-dir",
            data.path().to_str().expect("UTF-8"),
            "--fetch-allow-nets",
            "127.0.0.0/8",
        ],
    )
    .await?;

    // The catalogue: 22 distinct photos, and one of them again under a
    // second URL (the same bytes, as a CDN variant would serve them).
    let query = images.url("/photos/chelsea.jpg");
    let copy = images.url("/photos/chelsea.jpg?variant=cdn-2");
    let mut keys: Vec<String> = PHOTOS.iter().map(|p| images.url(&format!("/photos/{p}"))).collect();
    keys.push(copy.clone());
    // And near-duplicates: the same photos re-encoded or resized.
    let near = images.url("/img/cat.jpg");
    for variant in ["/img/cat.jpg", "/img/coffee.webp", "/img/astronaut.png", "/img/rocket.bmp"] {
        keys.push(images.url(variant));
    }
    let mut client = embark.embark_client().await?;
    let request = || LookupRequest { model: MODEL.into(), keys: keys.clone(), ..Default::default() };
    let first = client.lookup(request()).await?.into_inner();
    assert!(first.sources.iter().all(|s| *s == Source::OovPending as i32), "{:?}", first.sources);
    eventually(Duration::from_secs(120), "every photo embedded", || {
        let mut client = client.clone();
        let request = request();
        async move {
            let sources = client.lookup(request).await?.into_inner().sources;
            anyhow::ensure!(!sources.contains(&(Source::OovFailed as i32)), "a photo failed: {sources:?}");
            Ok(sources.iter().all(|s| *s == Source::Store as i32 || *s == Source::Cache as i32).then_some(()))
        }
    })
    .await?;
    // Rankers at work: the catalogue looked up again, from the tier.
    for _ in 0..50 {
        client.lookup(request()).await?;
    }
    let console = format!("http://{}", embark.metrics);
    let http = reqwest::Client::new();
    eventually(Duration::from_secs(30), "the index to hold every photo", || async {
        let models = json(http.get(format!("{console}/console/api/models")).send().await?).await?;
        Ok((models["models"][0]["coverage"] == keys.len()).then_some(()))
    })
    .await?;

    // The API: neighbours best first, the same bytes marked identical.
    let url = format!("{console}/console/api/similar?model={MODEL}&q={}&k=5", encode(&query));
    let response = http.get(&url).send().await?;
    let policy = response.headers().get("content-security-policy").cloned();
    assert!(policy.is_some_and(|p| p.to_str().is_ok_and(|p| p.contains("script-src 'self'"))));
    let answer = json(response).await?;
    let neighbours = answer["neighbours"].as_array().cloned().unwrap_or_default();
    assert_eq!(neighbours.len(), 5, "{answer}");
    assert_eq!(neighbours[0]["key"], copy.as_str(), "{answer}");
    assert_eq!(neighbours[0]["identical"], true, "{answer}");
    assert_eq!(neighbours[1]["key"], near.as_str(), "{answer}");
    assert_eq!(neighbours[1]["identical"], false, "{answer}");
    assert_eq!(answer["query"]["image"], true);
    // Errors are JSON with a reason; an unknown key is queued, not an error.
    let missing = http.get(format!("{console}/console/api/similar?model={MODEL}")).send().await?;
    assert_eq!(missing.status(), 400);
    let body = json(missing).await?;
    assert!(body["error"].as_str().is_some_and(|e| e.contains("q")), "{body}");
    let unknown = images.url("/photos/not-yet.jpg");
    let pending =
        http.get(format!("{console}/console/api/similar?model={MODEL}&q={}", encode(&unknown))).send().await?;
    assert_eq!(pending.status(), 409);
    let body = json(pending).await?;
    assert_eq!((body["source"].as_str(), body["queued"].as_bool()), (Some("OOV_PENDING"), Some(true)), "{body}");

    // The page, in a browser, opened on the photo as a shared link would.
    let page = format!("{console}/console?model={MODEL}&q={}&k=8", encode(&query));
    let dom = browse(&page, &["--dump-dom"]).await?;
    assert!(dom.contains("data-overview-loaded=\"true\""), "the overview did not load:\n{dom}");
    assert!(dom.contains("data-explorer-loaded=\"true\""), "the explorer did not finish:\n{dom}");
    let rows = tags(&dom, "<tr data-model=");
    assert_eq!(rows.len(), 1, "one model row:\n{dom}");
    assert_eq!(rows[0]["data-model"], MODEL);
    let coverage = tags(&dom, "<td data-field=\"coverage\"");
    assert_eq!(coverage.len(), 1);
    let cell_at = dom.find("data-field=\"coverage\"").unwrap_or(0);
    let cell_text = dom[cell_at..].split('>').nth(1).and_then(|t| t.split('<').next()).unwrap_or("");
    assert_eq!(cell_text, keys.len().to_string(), "coverage shown:\n{dom}");
    let hit_rate = tags(&dom, "<td data-field=\"hit_rate\"");
    let rate: f64 = hit_rate[0].get("data-value").and_then(|v| v.parse().ok()).unwrap_or(-1.0);
    assert!(rate > 0.0 && rate < 1.0, "a hit rate between the first (all OOV) and later Lookups: {rate}\n{dom}");

    let shown = tags(&dom, "<li class=\"neighbour");
    assert_eq!(shown.len(), 8, "{dom}");
    assert_eq!(shown[0]["data-key"], copy, "{dom}");
    assert_eq!(shown[0]["data-mark"], "identical");
    let scores: Vec<f64> = shown.iter().map(|a| a["data-score"].parse().unwrap_or(f64::NAN)).collect();
    assert!(scores.windows(2).all(|w| w[0] >= w[1]), "best first: {scores:?}");
    // The photo re-encoded is a near-duplicate; distinct photos score well
    // below the threshold (docs/similarity.md: at most 0.488 between two).
    assert_eq!((shown[1]["data-key"].as_str(), shown[1]["data-mark"].as_str()), (near.as_str(), "near"));
    assert!(shown[2..].iter().all(|a| a["data-mark"] == "distant"), "{shown:?}");
    let thumbs = tags(&dom, "<img class=\"thumb\"");
    assert_eq!(thumbs.len(), 8, "{dom}");
    let loaded = thumbs.iter().filter(|t| t.get("data-loaded").map(String::as_str) == Some("true")).count();
    assert!(loaded >= 4, "thumbnails loaded from their URLs: {loaded} of 8\n{dom}");
    let query_card = tags(&dom, "<img class=\"query-image\"");
    assert_eq!(query_card.len(), 1, "{dom}");
    assert_eq!(query_card[0]["src"], query);

    // The screenshot (docs/console.png when asked for).
    let shots = tempfile::tempdir()?;
    let png = shots.path().join("console.png");
    browse(&page, &[&format!("--screenshot={}", png.display())]).await?;
    let bytes = std::fs::read(&png)?;
    assert!(bytes.starts_with(b"\x89PNG") && bytes.len() > 20_000, "a real screenshot: {} bytes", bytes.len());
    if let Some(out) = std::env::var_os("EMBARK_CONSOLE_SCREENSHOT") {
        std::fs::copy(&png, out)?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_can_be_turned_off() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let embark = Server::start(
        &binary("embark"),
        &["up", "--models", "minilm-l6-v2", "--data-dir", data.path().to_str().expect("UTF-8"), "--console", "false"],
    )
    .await?;
    let base = format!("http://{}", embark.metrics);
    assert_eq!(reqwest::get(format!("{base}/console")).await?.status(), 404);
    assert_eq!(reqwest::get(format!("{base}/metrics")).await?.status(), 200);
    Ok(())
}
