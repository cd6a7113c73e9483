//! The object store an `output_dir` URL names, reached through Apache
//! Arrow's `object_store`: the client built from `[storage]` and the
//! store's standard credentials, and one staged file put as one object.
//!
//! A file is sent whole when it is small and as a multipart upload
//! otherwise, a part at a time from disk, so memory stays at about two
//! parts whatever the file's size. Either way the object appears whole or
//! not at all: a single PUT is atomic, and a multipart upload becomes an
//! object only when it is completed. The file's sha256 is computed as it is
//! sent and checked against the manifest's before the object is made, so
//! no object differs from what the manifest says.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path as Key;
use object_store::{ClientOptions, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig};
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;

use crate::config::{find_token, Config, Env, ObjectUrl, StorageConfig, StoreKind};

/// Files larger than this are sent as multipart uploads, in parts of this
/// size: above S3's 5 MiB minimum part, and the same size for every part
/// but the last, as R2 requires.
pub const PART_SIZE: usize = 8 * 1024 * 1024;

/// What an object store client is to the uploader: objects and multipart
/// uploads by id, so that an upload begun before a crash can be aborted.
pub trait Bucket: ObjectStore + MultipartStore {}
impl<T: ObjectStore + MultipartStore> Bucket for T {}

#[derive(Debug, thiserror::Error)]
pub enum BucketError {
    #[error("{0}")]
    Store(#[from] object_store::Error),
    #[error("reading the staged file {file}: {source}")]
    Read {
        file: String,
        source: std::io::Error,
    },
    /// The daemon is stopping; what was sent is recorded.
    #[error("stopped")]
    Stopped,
    #[error(
        "the staged file {file} has sha256 {found}, not the manifest's {expected}; it changed \
         after the run was written, so it is not uploaded (rerun the job, or put the file back)"
    )]
    Changed {
        file: String,
        expected: String,
        found: String,
    },
}

/// The object store runs are uploaded to, and the prefix they go under.
pub struct Target {
    /// `s3://bucket/prefix`, as logs and `status` show it.
    pub url: ObjectUrl,
    pub client: Arc<dyn Bucket>,
    /// The credentials' values, taken out of any error text: a store's
    /// error body may echo the access key id (S3's `InvalidAccessKeyId`).
    secrets: Vec<String>,
    /// Held while `latest` is read and written: two runs of one job
    /// uploading at once (after a restart, a retry) must not move it back.
    pub latest: tokio::sync::Mutex<()>,
}

impl Target {
    /// The key of `parts` joined under the prefix: `<prefix>/<job>/…`.
    pub fn key(&self, parts: &[&str]) -> Key {
        let prefix = self.url.prefix.split('/').filter(|s| !s.is_empty());
        Key::from_iter(prefix.chain(parts.iter().copied()))
    }

    /// The target `config.output_dir` names, if it names an object store.
    pub fn from_config(config: &Config, env: &dyn Env) -> Result<Option<Target>, String> {
        let Some(url) = config.object_url() else {
            return Ok(None);
        };
        let (client, secrets) = connect(&url, &config.storage, env)?;
        Ok(Some(Target {
            url,
            client,
            secrets,
            latest: tokio::sync::Mutex::new(()),
        }))
    }

    /// `text` with every credential value in it replaced by `***`, and
    /// no longer than a log line should be.
    pub fn redact(&self, text: &str) -> String {
        let mut text = text.to_string();
        // What an S3 error body says of the request's signing: the key id
        // and, with temporary credentials the daemon never saw (an
        // instance role), the session token inside the canonical request.
        for tag in SIGNING_TAGS {
            text = blank_element(&text, tag);
        }
        for secret in &self.secrets {
            text = text.replace(secret.as_str(), "***");
        }
        if text.len() > 600 {
            let mut cut = 600;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
            text.push('…');
        }
        text
    }
}

/// Builds the client for `url`. Nothing is sent yet: a store that is down
/// or refuses the credentials shows on the first upload, as an upload
/// failing, not as a daemon that cannot start.
fn connect(
    url: &ObjectUrl,
    storage: &StorageConfig,
    env: &dyn Env,
) -> Result<(Arc<dyn Bucket>, Vec<String>), String> {
    // Every value that could sign a request, from the environment or
    // systemd's credentials (short values would redact ordinary words).
    let mut secrets: Vec<String> = SECRET_VARS.iter().filter_map(|v| env.var(v)).collect();
    // A few quick retries inside the client for a dropped connection or a
    // 5xx or throttling answer (S3 `SlowDown`); past them the uploader's
    // own backoff takes over, and the upload is reported as failing.
    let retry = RetryConfig {
        max_retries: 4,
        retry_timeout: Duration::from_secs(30),
        ..RetryConfig::default()
    };
    let options = ClientOptions::new()
        .with_allow_http(storage.allow_http)
        .with_connect_timeout(Duration::from_secs(10))
        .with_timeout(Duration::from_secs(300));
    // Credentials from systemd's `LoadCredential=` when the environment
    // has none (the environment is read by each builder's `from_env`).
    let mut credential = |vars: &[&str], name: &str| {
        let found = find_token(env, vars, None, name)
            .map_err(|e| e.to_string())
            .map(|t| t.map(|t| t.expose().to_string()))?;
        secrets.extend(found.clone());
        Ok::<_, String>(found)
    };
    let built = match url.kind {
        StoreKind::S3 => {
            let mut b = object_store::aws::AmazonS3Builder::from_env()
                .with_bucket_name(&url.bucket)
                .with_retry(retry)
                .with_client_options(options)
                // The server checks each part's sha256 as it arrives.
                .with_checksum_algorithm(object_store::aws::Checksum::SHA256);
            if let Some(id) = credential(&["AWS_ACCESS_KEY_ID"], "storage-access-key-id")? {
                b = b.with_access_key_id(id);
            }
            if let Some(secret) =
                credential(&["AWS_SECRET_ACCESS_KEY"], "storage-secret-access-key")?
            {
                b = b.with_secret_access_key(secret);
            }
            let region = storage
                .region
                .clone()
                .or_else(|| env.var("AWS_REGION"))
                .or_else(|| env.var("AWS_DEFAULT_REGION"))
                .unwrap_or_else(|| "us-east-1".into());
            b = b.with_region(region);
            if let Some(endpoint) = &storage.endpoint {
                // S3-compatible servers address buckets by path, not by
                // a host name per bucket.
                b = b
                    .with_endpoint(endpoint)
                    .with_virtual_hosted_style_request(false);
            }
            b.build().map(|s| Arc::new(s) as Arc<dyn Bucket>)
        }
        StoreKind::Gcs => {
            let mut b = object_store::gcp::GoogleCloudStorageBuilder::from_env()
                .with_bucket_name(&url.bucket)
                .with_retry(retry)
                .with_client_options(options);
            if let Some(path) = env.var("GOOGLE_APPLICATION_CREDENTIALS") {
                // A key file others can read is refused, as a token file is;
                // systemd's credentials directory may be group-readable.
                let in_credentials = env
                    .var("CREDENTIALS_DIRECTORY")
                    .is_some_and(|d| Path::new(&path).starts_with(d));
                crate::config::secret_file_mode(Path::new(&path), in_credentials)
                    .map_err(|e| e.to_string())?;
                b = b.with_application_credentials(path);
            }
            if let Some(endpoint) = &storage.endpoint {
                b = b.with_config(object_store::gcp::GoogleConfigKey::BaseUrl, endpoint);
            }
            b.build().map(|s| Arc::new(s) as Arc<dyn Bucket>)
        }
        StoreKind::Azure => {
            let mut b = object_store::azure::MicrosoftAzureBuilder::from_env()
                .with_container_name(&url.bucket)
                .with_retry(retry)
                .with_client_options(options);
            if let Some(name) =
                credential(&["AZURE_STORAGE_ACCOUNT_NAME"], "storage-access-key-id")?
            {
                b = b.with_account(name);
            }
            if let Some(key) =
                credential(&["AZURE_STORAGE_ACCOUNT_KEY"], "storage-secret-access-key")?
            {
                b = b.with_access_key(key);
            }
            if let Some(endpoint) = &storage.endpoint {
                b = b.with_endpoint(endpoint.clone());
            }
            b.build().map(|s| Arc::new(s) as Arc<dyn Bucket>)
        }
    };
    // The builders' errors name missing settings, never their values.
    let client = built.map_err(|e| format!("output_dir {url}: {e}"))?;
    secrets.retain(|s| s.len() >= 8);
    Ok((client, secrets))
}

/// Elements of S3 error bodies that carry signing material.
const SIGNING_TAGS: &[&str] = &[
    "AWSAccessKeyId",
    "StringToSign",
    "StringToSignBytes",
    "CanonicalRequest",
    "CanonicalRequestBytes",
    "SignatureProvided",
];

/// `text` with the content of every `<tag>…</tag>` replaced by `***`.
fn blank_element(text: &str, tag: &str) -> String {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find(&open) {
        let inner = start + open.len();
        out.push_str(&rest[..inner]);
        out.push_str("***");
        match rest[inner..].find(&close) {
            Some(end) => rest = &rest[inner + end..],
            // Cut short: drop the rest rather than keep half a secret.
            None => return out,
        }
    }
    out.push_str(rest);
    out
}

/// Environment variables that hold credentials for one of the stores.
const SECRET_VARS: &[&str] = &[
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AZURE_STORAGE_ACCOUNT_KEY",
    "AZURE_STORAGE_ACCESS_KEY",
    "AZURE_STORAGE_SAS_KEY",
    "AZURE_STORAGE_TOKEN",
    "AZURE_CLIENT_SECRET",
    "GOOGLE_SERVICE_ACCOUNT_KEY",
];

/// Compares a file's sha256 with the manifest's, when it lists the file.
fn check(file: &Path, hasher: Sha256, expected: Option<&str>) -> Result<(), BucketError> {
    let Some(expected) = expected else {
        return Ok(());
    };
    let found = hex::encode(hasher.finalize());
    if found == expected {
        return Ok(());
    }
    Err(BucketError::Changed {
        file: file.display().to_string(),
        expected: expected.to_string(),
        found,
    })
}

fn read_error(file: &Path) -> impl Fn(std::io::Error) -> BucketError + '_ {
    move |source| BucketError::Read {
        file: file.display().to_string(),
        source,
    }
}

/// Sends a small file (up to [`PART_SIZE`]) as one PUT. `expected` is the
/// manifest's sha256 for it (none for the manifest itself and the
/// markers). Returns the bytes sent.
pub async fn put_whole(
    bucket: &dyn Bucket,
    key: &Key,
    file: &Path,
    expected: Option<&str>,
) -> Result<u64, BucketError> {
    let bytes = tokio::fs::read(file).await.map_err(read_error(file))?;
    check(file, Sha256::new_with_prefix(&bytes), expected)?;
    let sent = bytes.len() as u64;
    bucket.put(key, PutPayload::from(bytes)).await?;
    Ok(sent)
}

/// Sends a file as the parts of the multipart upload `id` (begun, and its
/// id kept, by the caller), then completes it; aborts it on any failure.
pub async fn put_parts(
    bucket: &dyn Bucket,
    key: &Key,
    id: &str,
    file: &Path,
    expected: Option<&str>,
    stop: &tokio_util::sync::CancellationToken,
) -> Result<u64, BucketError> {
    let id = id.to_string();
    let sent = async {
        let mut f = tokio::fs::File::open(file)
            .await
            .map_err(read_error(file))?;
        let mut hasher = Sha256::new();
        let mut parts: Vec<PartId> = Vec::new();
        let mut sent = 0u64;
        loop {
            // Between parts, not inside one: the id is recorded, so the
            // next start aborts what was sent.
            if stop.is_cancelled() {
                return Err(BucketError::Stopped);
            }
            let part = read_part(&mut f).await.map_err(read_error(file))?;
            if part.is_empty() {
                break;
            }
            hasher.update(&part);
            sent += part.len() as u64;
            let payload = PutPayload::from(part);
            parts.push(bucket.put_part(key, &id, parts.len(), payload).await?);
        }
        check(file, hasher, expected)?;
        bucket.complete_multipart(key, &id, parts).await?;
        Ok::<u64, BucketError>(sent)
    }
    .await;
    if matches!(sent, Err(ref e) if !matches!(e, BucketError::Stopped)) {
        // Parts already sent are stored, and billed, until the upload is
        // aborted; if this fails too, the next attempt aborts it by id.
        let _ = bucket.abort_multipart(key, &id).await;
    }
    sent
}

/// Reads up to [`PART_SIZE`] bytes: a whole part unless the file ends.
async fn read_part(f: &mut tokio::fs::File) -> std::io::Result<Vec<u8>> {
    let mut part = vec![0; PART_SIZE];
    let mut filled = 0;
    while filled < PART_SIZE {
        let n = f.read(&mut part[filled..]).await?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    part.truncate(filled);
    Ok(part)
}

/// Reads a small object, `None` when it does not exist.
pub async fn get_small(bucket: &dyn Bucket, key: &Key) -> Result<Option<Vec<u8>>, BucketError> {
    match bucket.get(key).await {
        Ok(got) => Ok(Some(got.bytes().await?.to_vec())),
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A store's error body may echo the access key id (S3's
    /// `InvalidAccessKeyId` does on AWS); what is logged and shown never
    /// holds a credential.
    #[test]
    fn credentials_are_taken_out_of_error_text() {
        let target = Target {
            url: ObjectUrl::parse(Path::new("s3://b/p")).unwrap().unwrap(),
            client: Arc::new(object_store::memory::InMemory::new()),
            secrets: vec!["AKIAEXAMPLE0001".into(), "s3cr3t-value-long".into()],
            latest: Default::default(),
        };
        let text = "403: <AWSAccessKeyId>AKIAEXAMPLE0001</AWSAccessKeyId> sig of s3cr3t-value-long";
        assert_eq!(
            target.redact(text),
            "403: <AWSAccessKeyId>***</AWSAccessKeyId> sig of ***"
        );
        // Temporary credentials the daemon never saw, as AWS echoes them.
        let text = "<Code>SignatureDoesNotMatch</Code><AWSAccessKeyId>ASIATEMP</AWSAccessKeyId>\
                    <CanonicalRequest>PUT /b\nx-amz-security-token:FQoGZXIvYXdzE</CanonicalRequest>\
                    <SignatureProvided>abc</SignatureProvided><CanonicalRequestBytes>50 55";
        let out = target.redact(text);
        for secret in ["ASIATEMP", "FQoGZXIvYXdzE", "abc", "50 55"] {
            assert!(!out.contains(secret), "{out}");
        }
        assert!(out.contains("SignatureDoesNotMatch"), "{out}");
        let long = "é".repeat(1000);
        assert!(target.redact(&long).chars().count() <= 301);
    }

    #[test]
    fn keys_join_the_prefix_and_the_parts() {
        let target = Target {
            url: ObjectUrl::parse(Path::new("s3://b/harvest/team-a"))
                .unwrap()
                .unwrap(),
            client: Arc::new(object_store::memory::InMemory::new()),
            secrets: Vec::new(),
            latest: Default::default(),
        };
        assert_eq!(
            target
                .key(&["job", "20261204T000000Z", "data.csv"])
                .as_ref(),
            "harvest/team-a/job/20261204T000000Z/data.csv"
        );
        let root = Target {
            url: ObjectUrl::parse(Path::new("s3://b")).unwrap().unwrap(),
            client: target.client.clone(),
            secrets: Vec::new(),
            latest: Default::default(),
        };
        assert_eq!(root.key(&["job", "latest"]).as_ref(), "job/latest");
    }
}
