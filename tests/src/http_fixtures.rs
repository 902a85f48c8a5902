//! A loopback HTTP server for Retina's tests, on raw TCP so it can also
//! misbehave (stall, lie about Content-Length, redirect in circles).
//!
//! Routes: `/img/<file>` (a fixture image), `/photos/<file>` (a photo of
//! the near-duplicate set), `/truncated.jpg`, `/page.html`,
//! `/missing` (404), `/gone` (410), `/error` (503), `/stall` (headers never
//! come), `/huge` (64 MiB chunked), `/lying-length` (declares 1000 bytes,
//! sends 64 MiB), `/declared-huge` (declares 100 MB), `/bomb.png` (a PNG header
//! declaring 50000 x 50000), `/redirect-private` (302 to 10.0.0.1),
//! `/redirect-loop` (302 to itself), `/redirect-cat` (302 to `/img/cat.jpg`).

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

#[derive(Debug)]
pub struct ImageServer {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ImageServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ImageServer {
    pub async fn start() -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve(stream));
            }
        });
        Ok(Self { addr, task })
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

fn images() -> PathBuf {
    crate::fixtures().join("images")
}

/// A PNG whose header declares 50000 x 50000 RGB (7.5 GB decoded).
pub fn bomb_png() -> Vec<u8> {
    fn chunk(out: &mut Vec<u8>, kind: &[u8], data: &[u8]) {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut crc = crc32fast::Hasher::new();
        crc.update(kind);
        crc.update(data);
        out.extend_from_slice(kind);
        out.extend_from_slice(data);
        out.extend_from_slice(&crc.finalize().to_be_bytes());
    }
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&50_000u32.to_be_bytes());
    ihdr.extend_from_slice(&50_000u32.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    chunk(&mut png, b"IHDR", &ihdr);
    // A token IDAT: the decoder must refuse the image from its header alone,
    // before inflating anything.
    chunk(&mut png, b"IDAT", &[0x78, 0x9c, 0xed, 0xc1, 0x01, 0x0d, 0x00, 0x00, 0x00, 0xc2, 0xa0, 0xf7, 0x4f, 0x6d]);
    chunk(&mut png, b"IEND", &[]);
    png
}

async fn serve(mut stream: TcpStream) {
    let mut buf = vec![0u8; 8192];
    let mut n = 0;
    while !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") && n < buf.len() {
        match stream.read(&mut buf[n..]).await {
            Ok(0) | Err(_) => return,
            Ok(k) => n += k,
        }
    }
    let request = String::from_utf8_lossy(&buf[..n]);
    // The query is ignored, so tests can make distinct URLs of one image.
    let path = request.split_whitespace().nth(1).unwrap_or("/").split('?').next().unwrap_or("/").to_owned();
    let reply = |status: &str, kind: &str, body: Vec<u8>| {
        let mut r = format!(
            "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .into_bytes();
        r.extend(body);
        r
    };
    let redirect = |to: &str| {
        format!("HTTP/1.1 302 Found\r\nLocation: {to}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").into_bytes()
    };
    let response = match path.as_str() {
        p if p.starts_with("/img/") => match std::fs::read(images().join(&p[5..])) {
            Ok(b) => reply("200 OK", "application/octet-stream", b),
            Err(_) => reply("404 Not Found", "text/plain", b"no such fixture".to_vec()),
        },
        p if p.starts_with("/photos/") => match std::fs::read(crate::fixtures().join("photos").join(&p[8..])) {
            Ok(b) => reply("200 OK", "image/jpeg", b),
            Err(_) => reply("404 Not Found", "text/plain", b"no such photo".to_vec()),
        },
        "/truncated.jpg" => {
            let b = std::fs::read(images().join("cat.jpg")).unwrap_or_default();
            reply("200 OK", "image/jpeg", b[..b.len() / 3].to_vec())
        }
        "/page.html" => {
            reply("200 OK", "image/jpeg", b"<!doctype html><html><body>not an image</body></html>".to_vec())
        }
        "/missing" => reply("404 Not Found", "text/plain", b"nope".to_vec()),
        "/gone" => reply("410 Gone", "text/plain", b"gone".to_vec()),
        "/error" => reply("503 Service Unavailable", "text/plain", b"later".to_vec()),
        "/bomb.png" => reply("200 OK", "image/png", bomb_png()),
        "/redirect-private" => redirect("http://10.0.0.1/cat.jpg"),
        "/redirect-loop" => redirect("/redirect-loop"),
        "/redirect-cat" => redirect("/img/cat.jpg"),
        "/stall" => {
            tokio::time::sleep(Duration::from_secs(60)).await;
            return;
        }
        "/huge" => {
            // Chunked, no length: 64 MiB (or until the client hangs up).
            let head = "HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
            if stream.write_all(head.as_bytes()).await.is_err() {
                return;
            }
            let mut chunk = format!("{:x}\r\n", 64 << 10).into_bytes();
            chunk.extend(vec![0xffu8; 64 << 10]);
            chunk.extend_from_slice(b"\r\n");
            for _ in 0..1024 {
                if stream.write_all(&chunk).await.is_err() {
                    return;
                }
            }
            let _ = stream.write_all(b"0\r\n\r\n").await;
            return;
        }
        "/lying-length" => {
            // Declares 1000 bytes, then keeps sending: nothing past the
            // declared length may be read.
            let head =
                "HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: 1000\r\nConnection: close\r\n\r\n";
            if stream.write_all(head.as_bytes()).await.is_err() {
                return;
            }
            let block = vec![0xffu8; 64 << 10];
            for _ in 0..1024 {
                if stream.write_all(&block).await.is_err() {
                    return;
                }
            }
            return;
        }
        "/declared-huge" => {
            let head =
                "HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: 100000000\r\nConnection: close\r\n\r\n";
            let _ = stream.write_all(head.as_bytes()).await;
            tokio::time::sleep(Duration::from_secs(5)).await;
            return;
        }
        _ => reply("404 Not Found", "text/plain", b"unknown route".to_vec()),
    };
    let _ = stream.write_all(&response).await;
    let _ = stream.shutdown().await;
}
