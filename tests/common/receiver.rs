//! A webhook receiver on loopback for the notification tests.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use serde_json::Value;

use super::WAIT;

/// One POST the receiver took.
#[derive(Debug, Clone)]
pub struct Got {
    pub signature: Option<String>,
    pub raw: Vec<u8>,
    pub body: Value,
}

/// A webhook receiver: answers each POST with the next status of
/// `answers` (200 once they are used up) and keeps what it got.
pub struct Receiver {
    pub addr: SocketAddr,
    got: Arc<Mutex<Vec<Got>>>,
    told: Arc<tokio::sync::Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    pub async fn start(addr: SocketAddr, answers: &[u16]) -> Receiver {
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let got = Arc::new(Mutex::new(Vec::new()));
        let told = Arc::new(tokio::sync::Notify::new());
        let answers = Arc::new(Mutex::new(
            answers.iter().copied().collect::<VecDeque<u16>>(),
        ));
        let (g, t) = (got.clone(), told.clone());
        // Kept and aborted when the receiver is dropped.
        #[allow(clippy::disallowed_methods)]
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (g, t, answers) = (g.clone(), t.clone(), answers.clone());
                let service = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let (g, t, answers) = (g.clone(), t.clone(), answers.clone());
                        async move {
                            let signature = req
                                .headers()
                                .get("x-harvestd-signature")
                                .map(|v| v.to_str().unwrap().to_string());
                            let raw = req.into_body().collect().await.unwrap().to_bytes().to_vec();
                            let body = serde_json::from_slice(&raw).unwrap();
                            let status = answers.lock().unwrap().pop_front().unwrap_or(200);
                            g.lock().unwrap().push(Got {
                                signature,
                                raw,
                                body,
                            });
                            t.notify_waiters();
                            let mut answer =
                                hyper::Response::new(Full::new(Bytes::from_static(b"ok")));
                            *answer.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
                            Ok::<_, std::convert::Infallible>(answer)
                        }
                    },
                );
                // One connection; it ends with the test's runtime.
                #[allow(clippy::disallowed_methods)]
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Receiver {
            addr,
            got,
            told,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}/hook/secret-path", self.addr)
    }

    pub fn got(&self) -> Vec<Got> {
        self.got.lock().unwrap().clone()
    }

    /// Waits until `n` POSTs have arrived.
    pub async fn wait_for(&self, n: usize) -> Vec<Got> {
        tokio::time::timeout(WAIT, async {
            loop {
                let told = self.told.notified();
                tokio::pin!(told);
                told.as_mut().enable();
                if self.got().len() >= n {
                    return self.got();
                }
                told.await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{n} notification(s) never came: {:?}", self.got()))
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}
