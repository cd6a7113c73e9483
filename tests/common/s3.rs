//! A real S3-compatible server on loopback for the object-storage tests:
//! moto's server mode, from the virtualenv `tests/tools/setup` builds
//! (the first test to need it builds it), behind a small fault proxy
//! that can take the server off the network, throttle it with `SlowDown`
//! answers, and count the requests that reach it.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as Key;
use object_store::{ObjectStore, ObjectStoreExt};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};

use super::WAIT;

pub const BUCKET: &str = "lake";

/// The test virtualenv: built once per machine (and once per process here),
/// under a file lock so test binaries running at once do not race.
pub fn venv() -> PathBuf {
    static VENV: OnceLock<PathBuf> = OnceLock::new();
    VENV.get_or_init(|| {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        // Beside the venv, where tests/tools/setup puts it: the same for
        // every test binary of this checkout, and owned by whoever builds.
        let venv = std::env::var_os("HARVESTD_TEST_VENV")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                std::env::var_os("CARGO_TARGET_DIR")
                    .map_or_else(|| root.join("target"), PathBuf::from)
                    .join("test-venv")
            });
        let lock_path = venv.with_extension("lock");
        std::fs::create_dir_all(lock_path.parent().unwrap()).unwrap();
        let lock = std::fs::File::create(&lock_path).unwrap();
        lock.lock().unwrap();
        let out = std::process::Command::new(root.join("tests/tools/setup"))
            .stderr(Stdio::inherit())
            .output()
            .expect("tests/tools/setup runs");
        assert!(out.status.success(), "tests/tools/setup failed");
        PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
    })
    .clone()
}

/// moto's S3 server, and the proxy the daemon talks to.
pub struct S3 {
    server: Child,
    pub server_addr: SocketAddr,
    pub proxy: Proxy,
}

impl S3 {
    /// A server with the bucket [`BUCKET`] created. `auth`: moto checks
    /// signatures against its own IAM users (none exist, so every key is
    /// refused), as a store given wrong credentials does.
    pub async fn start(auth: bool) -> S3 {
        let venv = venv();
        let mut cmd = Command::new(venv.join("bin/moto_server"));
        cmd.args(["-H", "127.0.0.1", "-p", "0"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if auth {
            // The bucket is made by the first request; every one after is
            // checked.
            cmd.env("INITIAL_NO_AUTH_ACTION_COUNT", "1");
        }
        let mut server = cmd.spawn().expect("moto_server starts");
        let mut lines = BufReader::new(server.stderr.take().unwrap()).lines();
        let port = tokio::time::timeout(WAIT, async {
            while let Some(line) = lines.next_line().await.unwrap() {
                if let Some(at) = line.find("Running on http://127.0.0.1:") {
                    let rest = &line[at + "Running on http://127.0.0.1:".len()..];
                    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
                    return digits.parse::<u16>().unwrap();
                }
            }
            panic!("moto_server ended before it listened");
        })
        .await
        .expect("moto_server listens");
        // Its log goes on being read, so the server never blocks on a
        // full pipe.
        #[allow(clippy::disallowed_methods)]
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let server_addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let s3 = S3 {
            server,
            server_addr,
            proxy: Proxy::start(server_addr).await,
        };
        let made = reqwest::Client::new()
            .put(format!("http://{server_addr}/{BUCKET}"))
            .send()
            .await
            .unwrap();
        assert!(made.status().is_success(), "bucket made: {}", made.status());
        s3
    }

    /// What the daemon is pointed at: the proxy.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.proxy.addr)
    }

    /// The `[storage]` section for the harness's config.
    pub fn config(&self) -> String {
        format!(
            "[storage]\nendpoint = \"{}\"\nallow_http = true\nregion = \"us-east-1\"\n",
            self.endpoint()
        )
    }

    /// Points the harness's daemon at this server, under `prefix`, with
    /// credentials in the environment as AWS's tools take them.
    pub fn attach(&self, h: &mut super::Harness, prefix: &str) {
        h.write_config(&self.config());
        for (k, v) in [
            ("HARVESTD_OUTPUT_DIR", format!("s3://{BUCKET}/{prefix}")),
            ("AWS_ACCESS_KEY_ID", "testing".into()),
            ("AWS_SECRET_ACCESS_KEY", "testing".into()),
        ] {
            h.env.push((k.into(), v));
        }
    }

    /// A client straight to the server (not through the proxy), to look.
    pub fn client(&self) -> AmazonS3 {
        AmazonS3Builder::new()
            .with_bucket_name(BUCKET)
            .with_endpoint(format!("http://{}", self.server_addr))
            .with_allow_http(true)
            .with_region("us-east-1")
            .with_access_key_id("testing")
            .with_secret_access_key("testing")
            .build()
            .unwrap()
    }

    /// Every object's key under `prefix`, sorted.
    pub async fn keys(&self, prefix: &str) -> Vec<String> {
        use futures::TryStreamExt;
        let client = self.client();
        let mut keys: Vec<String> = client
            .list(Some(&Key::from(prefix)))
            .map_ok(|m| m.location.to_string())
            .try_collect()
            .await
            .unwrap();
        keys.sort();
        keys
    }

    pub async fn get(&self, key: &str) -> Option<Vec<u8>> {
        match self.client().get(&Key::from(key)).await {
            Ok(got) => Some(got.bytes().await.unwrap().to_vec()),
            Err(object_store::Error::NotFound { .. }) => None,
            Err(e) => panic!("GET {key}: {e}"),
        }
    }

    /// Multipart uploads begun and neither completed nor aborted.
    pub async fn open_multipart_uploads(&self) -> usize {
        let answer = reqwest::get(format!("http://{}/{BUCKET}?uploads", self.server_addr))
            .await
            .unwrap();
        assert!(
            answer.status().is_success(),
            "list uploads: {}",
            answer.status()
        );
        let text = answer.text().await.unwrap();
        assert!(text.contains("ListMultipartUploadsResult"), "{text}");
        text.matches("<UploadId>").count()
    }
}

/// A loopback proxy in front of the server, one request per connection:
/// it can stop listening (the store is down), answer `SlowDown`, and it
/// counts requests by method.
pub struct Proxy {
    pub addr: SocketAddr,
    upstream: SocketAddr,
    throttle: Arc<AtomicU32>,
    pub requests: Arc<Mutex<Vec<String>>>,
    pub throttled: Arc<AtomicUsize>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Proxy {
    async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let proxy = Proxy {
            addr: listener.local_addr().unwrap(),
            upstream,
            throttle: Arc::new(AtomicU32::new(0)),
            requests: Arc::new(Mutex::new(Vec::new())),
            throttled: Arc::new(AtomicUsize::new(0)),
            task: Mutex::new(None),
        };
        proxy.serve(listener);
        proxy
    }

    fn serve(&self, listener: TcpListener) {
        let (upstream, throttle, requests, throttled) = (
            self.upstream,
            self.throttle.clone(),
            self.requests.clone(),
            self.throttled.clone(),
        );
        // Kept, and aborted by `down` and on drop.
        #[allow(clippy::disallowed_methods)]
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let (throttle, requests, throttled) =
                    (throttle.clone(), requests.clone(), throttled.clone());
                conns.spawn(async move {
                    let _ = one_request(client, upstream, &throttle, &requests, &throttled).await;
                });
            }
        });
        *self.task.lock().unwrap() = Some(task);
    }

    /// The store goes off the network: connections are refused, and those
    /// open are cut.
    pub fn down(&self) {
        if let Some(task) = self.task.lock().unwrap().take() {
            task.abort();
        }
    }

    /// Back on the network, at the same address.
    pub async fn up(&self) {
        let listener = TcpListener::bind(self.addr).await.unwrap();
        self.serve(listener);
    }

    /// Answer the next `n` requests with 503 `SlowDown`.
    pub fn throttle(&self, n: u32) {
        self.throttle.store(n, Ordering::SeqCst);
    }

    /// Requests passed to the server, as "METHOD path".
    pub fn passed(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.down();
    }
}

/// Reads one request, then answers `SlowDown` or passes it to the server
/// with `Connection: close` and copies the answer back.
async fn one_request(
    mut client: TcpStream,
    upstream: SocketAddr,
    throttle: &AtomicU32,
    requests: &Mutex<Vec<String>>,
    throttled: &AtomicUsize,
) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if client.read(&mut byte).await? == 0 {
            return Ok(());
        }
        head.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&head).to_string();
    let mut lines = text.split("\r\n");
    let request_line = lines.next().unwrap_or_default().to_string();
    let mut length = 0usize;
    let mut out_head = format!("{request_line}\r\n");
    for line in lines.filter(|l| !l.is_empty()) {
        let (name, value) = line.split_once(':').unwrap_or((line, ""));
        if name.eq_ignore_ascii_case("content-length") {
            length = value.trim().parse().unwrap_or(0);
        }
        if name.eq_ignore_ascii_case("connection") {
            continue;
        }
        out_head.push_str(line);
        out_head.push_str("\r\n");
    }
    out_head.push_str("Connection: close\r\n\r\n");
    let mut body = vec![0u8; length];
    client.read_exact(&mut body).await?;
    let take = throttle
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    if take {
        throttled.fetch_add(1, Ordering::SeqCst);
        let xml = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>";
        let answer = format!(
            "HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{xml}",
            xml.len()
        );
        client.write_all(answer.as_bytes()).await?;
        return client.shutdown().await;
    }
    let mut parts = request_line.split(' ');
    let method = parts.next().unwrap_or_default();
    let path = parts.next().unwrap_or_default();
    requests.lock().unwrap().push(format!("{method} {path}"));
    let mut server = TcpStream::connect(upstream).await?;
    server.write_all(out_head.as_bytes()).await?;
    server.write_all(&body).await?;
    tokio::io::copy(&mut server, &mut client).await?;
    client.shutdown().await
}
