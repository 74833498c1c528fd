//! A run's way out. Each run has a network namespace of its own with only loopback; what its
//! egress rules allow appears there on 127.0.0.1, served by the runner from outside:
//!
//! - `https://` and `http://` destinations through a proxy on 127.0.0.1:[`PROXY_PORT`]
//!   (`HTTPS_PROXY` and friends are set in the run): `CONNECT` for HTTPS, absolute-form requests
//!   for HTTP. For an HTTPS destination with an injected credential the proxy terminates TLS with
//!   a per-run CA (its key exists only in this process's memory), adds the header to every
//!   request (replacing one of that name sent by the command) and forwards it over TLS verified
//!   against the system roots or `[egress] ca_file`. Without a credential the bytes are tunnelled
//!   unchanged.
//! - `tcp:host:port` forwards: a listener on 127.0.0.1:`port` in the run, connected to the
//!   destination.
//!
//! The runner resolves names itself, refuses private, loopback, link-local and metadata
//! addresses unless the rule allows private ones, and connects to the address it checked.
//! Anything not listed is refused. Each request or connection, allowed or refused, is a
//! `runner.egress` span under the run's `runner.exec` span (method, host, port, path without the
//! query, status, bytes; never headers or bodies) and is counted per destination.
//!
//! Guarantees:
//! - A request is forwarded with the listed destination's own name as `Host`, whatever the command
//!   wrote: an injected credential goes only to the site its rule names, also behind a front end
//!   that serves many sites on one address.
//! - What the command chose (the method, the host it asked for, the path) reaches spans, logs and
//!   the counts (and so the audit log) only through the run's redactor, as its output does: a run
//!   that names its secret as a destination does not get it stored.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use custodian_protocol::{EgressCount, EgressRule};
use custodian_redact::Redactor;
use http::header::{HOST, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tracing::Span;
use tracing::field::Empty as Unset;
use zeroize::Zeroizing;

use crate::sandbox::{EGRESS_BUNDLE_FILE, EGRESS_CA_FILE, NetPlan};

/// The proxy's port inside every run that has HTTP(S) rules.
pub const PROXY_PORT: u16 = 3128;
/// Most rules one run may carry.
pub const MAX_RULES: usize = 32;
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

type Body = BoxBody<Bytes, hyper::Error>;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// How the proxy verifies upstreams: the system roots, plus `ca_file` if configured.
pub fn upstream_tls(ca_file: Option<&Path>) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    if let Some(file) = ca_file {
        for cert in crate::tls::load_certs(file)? {
            roots.add(cert)?;
        }
    }
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Whether `ip` is private, loopback, link-local, metadata or otherwise not a public address.
pub fn is_restricted(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            v4.is_private()
                || v4.is_loopback()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || a == 0
                || (a == 100 && (64..128).contains(&b))
                || (a == 192 && b == 0)
                || (a == 198 && (18..20).contains(&b))
                || a >= 240
        }
        IpAddr::V6(v6) => {
            if v6.is_loopback() || v6.is_unspecified() {
                return true;
            }
            // IPv4-mapped (::ffff:a.b.c.d) and the deprecated IPv4-compatible (::a.b.c.d).
            if let Some(v4) = v6.to_ipv4() {
                return is_restricted(IpAddr::V4(v4));
            }
            let [first, second, third, fourth, ..] = v6.segments();
            // 6to4 (2002::/16) carries an IPv4 address, which a 6to4 relay would reach.
            if first == 0x2002 {
                let v4 = std::net::Ipv4Addr::from((u32::from(second) << 16) | u32::from(third));
                return is_restricted(IpAddr::V4(v4));
            }
            v6.is_multicast()
                || (first & 0xfe00) == 0xfc00 // unique local
                || (first & 0xffc0) == 0xfe80 // link-local
                || (first & 0xffc0) == 0xfec0 // site-local (deprecated)
                || first == 0x64 // NAT64 (64:ff9b::/96, 64:ff9b:1::/48)
                || (first == 0x2001 && second == 0) // Teredo: another network's tunnel
                || (first == 0x2001 && second == 0x0db8) // documentation
                || (first == 0x100 && second == 0 && third == 0 && fourth == 0) // discard-only
        }
    }
}

/// One rule as the runner uses it; the rendered header is secret material.
struct Rule {
    scheme: String,
    host: String,
    port: u16,
    allow_private: bool,
    header: Option<(HeaderName, Zeroizing<String>)>,
}

/// The run's CA: the key never leaves this process.
struct RunCa {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    der: CertificateDer<'static>,
    pem: String,
}

impl RunCa {
    fn new() -> Result<Self, rcgen::Error> {
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Custodian run egress CA");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key)?;
        Ok(Self {
            der: cert.der().clone(),
            pem: cert.pem(),
            issuer: rcgen::Issuer::new(params, key),
        })
    }

    fn leaf(&self, host: &str) -> Result<Arc<rustls::ServerConfig>, String> {
        let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
        let mut params =
            rcgen::CertificateParams::new(vec![host.to_owned()]).map_err(|e| e.to_string())?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, host);
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| e.to_string())?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_single_cert(vec![cert.der().clone(), self.der.clone()], key)
            .map_err(|e| e.to_string())?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

/// What a run's egress rules need, before the run starts.
pub struct Plan {
    rules: Vec<Rule>,
    ca: Option<RunCa>,
    /// Secret values of injected credentials, for the redactor: (name, value).
    secrets: Vec<(String, Zeroizing<String>)>,
}

fn render(
    inject: &custodian_protocol::InjectHeader,
) -> Result<(HeaderName, Zeroizing<String>), String> {
    use base64::Engine;
    let name = HeaderName::from_bytes(inject.header.as_bytes())
        .map_err(|_| format!("`{}` is not a header name", inject.header))?;
    let value = Zeroizing::new(match &inject.basic_user {
        Some(user) => format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD
                .encode(Zeroizing::new(format!("{user}:{}", inject.value)).as_bytes())
        ),
        None => inject.template.replace("{value}", &inject.value),
    });
    if HeaderValue::from_str(&value).is_err() {
        return Err(format!(
            "the credential {} does not fit in a header",
            inject.secret
        ));
    }
    Ok((name, value))
}

impl Plan {
    /// `None` when the run has no rules (it then has no way out at all).
    pub fn new(rules: Vec<EgressRule>) -> Result<Option<Self>, String> {
        if rules.is_empty() {
            return Ok(None);
        }
        if rules.len() > MAX_RULES {
            return Err(format!("at most {MAX_RULES} egress rules per run"));
        }
        let mut ports = std::collections::BTreeSet::new();
        let mut secrets = Vec::new();
        let mut out = Vec::with_capacity(rules.len());
        for rule in rules {
            let destination = rule.destination();
            match rule.scheme.as_str() {
                "http" | "https" => {}
                "tcp" if rule.inject.is_some() => {
                    return Err(format!(
                        "{destination}: credentials are injected into HTTP(S) only"
                    ));
                }
                "tcp" if rule.port == PROXY_PORT || !ports.insert(rule.port) => {
                    return Err(format!(
                        "{destination}: port {} is taken in the run",
                        rule.port
                    ));
                }
                "tcp" => {}
                _ => return Err(format!("{destination}: unknown scheme")),
            }
            let header = rule.inject.as_ref().map(render).transpose()?;
            if let Some(inject) = rule.inject {
                secrets.push((inject.secret, Zeroizing::new(inject.value)));
            }
            out.push(Rule {
                scheme: rule.scheme,
                host: rule.host.to_ascii_lowercase(),
                port: rule.port,
                allow_private: rule.allow_private,
                header,
            });
        }
        let ca = if out.iter().any(|r| r.scheme != "tcp") {
            Some(RunCa::new().map_err(|e| format!("cannot create the run's egress CA: {e}"))?)
        } else {
            None
        };
        Ok(Some(Self {
            rules: out,
            ca,
            secrets,
        }))
    }

    fn proxied(&self) -> bool {
        self.ca.is_some()
    }

    /// The listeners the run opens (the proxy first, then each forward) and the CA it trusts.
    pub fn net(&self) -> NetPlan {
        let mut ports: Vec<u16> = self.proxied().then_some(PROXY_PORT).into_iter().collect();
        ports.extend(
            self.rules
                .iter()
                .filter(|r| r.scheme == "tcp")
                .map(|r| r.port),
        );
        NetPlan {
            ports,
            ca_pem: self.ca.as_ref().map(|ca| ca.pem.clone()),
        }
    }

    /// Variables that send the run's HTTP clients through the proxy and make them trust its CA.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        if !self.proxied() {
            return Vec::new();
        }
        let proxy = format!("http://127.0.0.1:{PROXY_PORT}");
        let mut env: Vec<(&'static str, String)> =
            ["HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"]
                .into_iter()
                .map(|name| (name, proxy.clone()))
                .collect();
        for name in ["NO_PROXY", "no_proxy"] {
            env.push((name, "localhost,127.0.0.1".to_owned()));
        }
        for name in [
            "SSL_CERT_FILE",
            "REQUESTS_CA_BUNDLE",
            "CURL_CA_BUNDLE",
            "GIT_SSL_CAINFO",
        ] {
            env.push((name, EGRESS_BUNDLE_FILE.to_owned()));
        }
        env.push(("NODE_EXTRA_CA_CERTS", EGRESS_CA_FILE.to_owned()));
        env
    }

    /// Injected secrets (name, value), for the redactor.
    pub fn secrets(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.secrets
            .iter()
            .map(|(name, value)| (name.as_str(), value.as_bytes()))
    }

    /// Serves the run's listeners (`fds`, in the order of [`Plan::net`]) until the returned
    /// [`Serving`] is dropped. Spans are children of `span`.
    pub fn serve(
        self,
        fds: Vec<OwnedFd>,
        upstream: Arc<rustls::ClientConfig>,
        span: Span,
        redactor: Arc<Redactor>,
    ) -> Result<Serving, String> {
        let ports = self.net().ports;
        if fds.len() != ports.len() {
            return Err(format!(
                "the run sent {} listeners, {} expected",
                fds.len(),
                ports.len()
            ));
        }
        let shared = Arc::new(Shared {
            rules: self.rules,
            ca: self.ca,
            leaves: Mutex::new(HashMap::new()),
            upstream,
            counts: Mutex::new(BTreeMap::new()),
            span,
            redactor,
        });
        let mut tasks = JoinSet::new();
        for (index, (port, fd)) in ports.into_iter().zip(fds).enumerate() {
            let std_listener = std::net::TcpListener::from(fd);
            std_listener
                .set_nonblocking(true)
                .map_err(|e| e.to_string())?;
            let listener = TcpListener::from_std(std_listener).map_err(|e| e.to_string())?;
            let shared = shared.clone();
            if index == 0 && shared.ca.is_some() {
                tasks.spawn(accept_loop(listener, shared, Forward::Proxy));
            } else {
                let rule = shared
                    .rules
                    .iter()
                    .position(|r| r.scheme == "tcp" && r.port == port)
                    .ok_or("a listener without a rule")?;
                tasks.spawn(accept_loop(listener, shared, Forward::Tcp(rule)));
            }
        }
        Ok(Serving {
            shared,
            _tasks: tasks,
        })
    }
}

/// The run's listeners, served until this is dropped (every connection is then closed).
pub struct Serving {
    shared: Arc<Shared>,
    _tasks: JoinSet<()>,
}

impl Serving {
    /// Allowed and refused requests and connections per destination so far.
    pub fn counts(&self) -> BTreeMap<String, EgressCount> {
        self.shared
            .counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

struct Shared {
    rules: Vec<Rule>,
    ca: Option<RunCa>,
    leaves: Mutex<HashMap<String, Arc<rustls::ServerConfig>>>,
    upstream: Arc<rustls::ClientConfig>,
    counts: Mutex<BTreeMap<String, EgressCount>>,
    span: Span,
    /// The run's secrets, replaced in whatever of the run's choosing is recorded.
    redactor: Arc<Redactor>,
}

#[derive(Clone, Copy)]
enum Forward {
    Proxy,
    Tcp(usize),
}

/// An admitted destination: its rule and the address that was checked.
struct Admitted {
    rule: usize,
    addr: SocketAddr,
}

impl Admitted {
    /// The destination's name, as its rule lists it.
    fn host<'a>(&self, shared: &'a Shared) -> &'a str {
        &shared.rules[self.rule].host
    }
}

impl Shared {
    /// Text the run chose (a host, a path) as it may be recorded: its secrets replaced.
    fn shown(&self, text: &str) -> String {
        String::from_utf8_lossy(&self.redactor.redact(text.as_bytes()).0).into_owned()
    }

    fn span(&self, method: &str, host: &str, port: u16, path: &str) -> Span {
        // A method is the run's text too (HTTP allows any token).
        let (method, host, path) = (self.shown(method), self.shown(host), self.shown(path));
        tracing::info_span!(
            parent: &self.span,
            "runner.egress",
            custodian.egress.method = %method,
            custodian.egress.host = %host,
            custodian.egress.port = port,
            custodian.egress.path = %path,
            custodian.egress.allowed = Unset,
            custodian.egress.refused = Unset,
            custodian.egress.status = Unset,
            custodian.egress.bytes = Unset,
        )
    }

    fn count(&self, host: &str, port: u16, allowed: bool) {
        let key = format!("{}:{port}", self.shown(host));
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let entry = counts.entry(key).or_default();
        if allowed {
            entry.allowed += 1;
        } else {
            entry.refused += 1;
        }
    }

    fn refuse(&self, span: &Span, host: &str, port: u16, reason: &str) {
        span.record("custodian.egress.allowed", false);
        span.record("custodian.egress.refused", reason);
        self.count(host, port, false);
        let host = self.shown(host);
        tracing::info!(parent: span, host, port, reason, "egress refused");
    }

    /// Finds the rule for `scheme://host:port` (`host` as the run wrote it; names match in any
    /// case), resolves the name and picks an address the rule allows; refusals are counted and
    /// recorded on `span`. From here on the destination is the rule's: its host is
    /// [`Admitted::host`].
    async fn admit(&self, span: &Span, scheme: &str, host: &str, port: u16) -> Option<Admitted> {
        let found = self.rules.iter().position(|r| {
            r.scheme == scheme && r.host.eq_ignore_ascii_case(host) && r.port == port
        });
        let Some(rule) = found else {
            self.refuse(span, host, port, "not listed");
            return None;
        };
        let host = self.rules[rule].host.as_str();
        let addrs: Vec<SocketAddr> = match host.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, port)],
            Err(_) => {
                match tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((host, port)))
                    .await
                {
                    Ok(Ok(addrs)) => addrs.collect(),
                    _ => {
                        self.refuse(span, host, port, "name does not resolve");
                        return None;
                    }
                }
            }
        };
        let allow_private = self.rules[rule].allow_private;
        match addrs
            .into_iter()
            .find(|a| allow_private || !is_restricted(a.ip()))
        {
            Some(addr) => {
                span.record("custodian.egress.allowed", true);
                self.count(host, port, true);
                Some(Admitted { rule, addr })
            }
            None => {
                self.refuse(span, host, port, "private address");
                None
            }
        }
    }

    fn leaf(&self, host: &str) -> Result<Arc<rustls::ServerConfig>, String> {
        let ca = self.ca.as_ref().ok_or("no CA")?;
        let mut leaves = self.leaves.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(config) = leaves.get(host) {
            return Ok(config.clone());
        }
        let config = ca.leaf(host)?;
        leaves.insert(host.to_owned(), config.clone());
        Ok(config)
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, forward: Forward) {
    // Connections live in this set: when the loop is aborted (the run ended) they are too.
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        match forward {
            Forward::Proxy => connections.spawn(proxy_connection(shared, stream)),
            Forward::Tcp(rule) => connections.spawn(tcp_forward(shared, rule, stream)),
        };
    }
}

async fn connect(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

async fn tcp_forward(shared: Arc<Shared>, rule: usize, mut stream: TcpStream) {
    let (host, port) = (shared.rules[rule].host.clone(), shared.rules[rule].port);
    let span = shared.span("TCP", &host, port, "");
    let Some(admitted) = shared.admit(&span, "tcp", &host, port).await else {
        return;
    };
    match connect(admitted.addr).await {
        Ok(mut upstream) => {
            let copied = tokio::io::copy_bidirectional(&mut stream, &mut upstream).await;
            let (up, down) = copied.unwrap_or_default();
            span.record("custodian.egress.bytes", up + down);
        }
        Err(e) => {
            span.record("custodian.egress.status", 502);
            tracing::info!(parent: &span, error = %e, "egress connection failed");
        }
    }
}

fn answer(status: StatusCode) -> Response<Body> {
    let mut response = Response::new(Empty::<Bytes>::new().map_err(|n| match n {}).boxed());
    *response.status_mut() = status;
    response
}

/// A `CONNECT` that was admitted: what to do once the connection is handed over.
struct Tunnel {
    upgrade: hyper::upgrade::OnUpgrade,
    admitted: Admitted,
    host: String,
    port: u16,
    span: Span,
}

type TunnelSlot = Arc<Mutex<Option<Tunnel>>>;

async fn proxy_connection(shared: Arc<Shared>, stream: TcpStream) {
    let slot: TunnelSlot = Arc::default();
    let service = {
        let (shared, slot) = (shared.clone(), slot.clone());
        service_fn(move |request| proxy_request(shared.clone(), slot.clone(), request))
    };
    let served = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades()
        .await;
    if served.is_err() {
        return;
    }
    let tunnel = slot.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(tunnel) = tunnel {
        let Ok(upgraded) = tunnel.upgrade.await else {
            return;
        };
        let io = TokioIo::new(upgraded);
        if shared.rules[tunnel.admitted.rule].header.is_some() {
            intercept(
                shared,
                tunnel.admitted,
                tunnel.host,
                tunnel.port,
                io,
                tunnel.span,
            )
            .await;
        } else {
            let span = tunnel.span;
            match connect(tunnel.admitted.addr).await {
                Ok(mut upstream) => {
                    let mut io = io;
                    let (up, down) = tokio::io::copy_bidirectional(&mut io, &mut upstream)
                        .await
                        .unwrap_or_default();
                    span.record("custodian.egress.bytes", up + down);
                }
                Err(e) => tracing::info!(parent: &span, error = %e, "egress connection failed"),
            }
        }
    }
}

/// The host (as the run wrote it, without an IPv6 literal's brackets) and port of `uri`.
fn authority(uri: &Uri, default_port: u16) -> Option<(&str, u16)> {
    let authority = uri.authority()?;
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    Some((host, authority.port_u16().unwrap_or(default_port)))
}

async fn proxy_request(
    shared: Arc<Shared>,
    slot: TunnelSlot,
    request: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    if request.method() == Method::CONNECT {
        let Some((host, port)) = authority(request.uri(), 443) else {
            return Ok(answer(StatusCode::BAD_REQUEST));
        };
        let span = shared.span("CONNECT", host, port, "");
        let Some(admitted) = shared.admit(&span, "https", host, port).await else {
            span.record("custodian.egress.status", 403);
            return Ok(answer(StatusCode::FORBIDDEN));
        };
        span.record("custodian.egress.status", 200);
        let host = admitted.host(&shared).to_owned();
        *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(Tunnel {
            upgrade: hyper::upgrade::on(request),
            admitted,
            host,
            port,
            span,
        });
        return Ok(answer(StatusCode::OK));
    }
    // A forward-proxy request: absolute-form `http://host[:port]/path`.
    let uri = request.uri().clone();
    let (Some("http"), Some((host, port))) = (uri.scheme_str(), authority(&uri, 80)) else {
        return Ok(answer(StatusCode::BAD_REQUEST));
    };
    let span = shared.span(request.method().as_str(), host, port, uri.path());
    let Some(admitted) = shared.admit(&span, "http", host, port).await else {
        span.record("custodian.egress.status", 403);
        return Ok(answer(StatusCode::FORBIDDEN));
    };
    let sender = match connect(admitted.addr).await {
        Ok(stream) => handshake(TokioIo::new(stream)).await,
        Err(e) => Err(e.to_string()),
    };
    let mut sender = match sender {
        Ok(sender) => sender,
        Err(e) => {
            tracing::info!(parent: &span, error = %e, "egress connection failed");
            span.record("custodian.egress.status", 502);
            return Ok(answer(StatusCode::BAD_GATEWAY));
        }
    };
    Ok(forward(
        &shared,
        admitted.rule,
        admitted.host(&shared),
        port,
        &mut sender,
        request,
        span,
    )
    .await)
}

async fn handshake<T>(io: TokioIo<T>) -> Result<SendRequest<Incoming>, String>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| e.to_string())?;
    // Ends when the sender is dropped (the run's connection is gone).
    tokio::spawn(connection);
    Ok(sender)
}

/// Sends one request upstream in origin form to `host` (the rule's), named in `Host` whatever the
/// command wrote there, with the rule's credential in place of any header of that name the
/// command sent; the status and response bytes go on `span`.
async fn forward(
    shared: &Shared,
    rule: usize,
    host: &str,
    port: u16,
    sender: &mut SendRequest<Incoming>,
    request: Request<Incoming>,
    span: Span,
) -> Response<Body> {
    let (mut parts, body) = request.into_parts();
    let default_port = if shared.rules[rule].scheme == "https" {
        443
    } else {
        80
    };
    parts.uri = parts
        .uri
        .path_and_query()
        .map_or_else(|| Uri::from_static("/"), |pq| Uri::from(pq.clone()));
    for name in ["proxy-authorization", "proxy-connection"] {
        parts.headers.remove(name);
    }
    // Behind a front end that routes by `Host`, another name would reach another site, with the
    // credential.
    let name = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_owned()
    };
    let value = if port == default_port {
        name
    } else {
        format!("{name}:{port}")
    };
    let Ok(value) = HeaderValue::from_str(&value) else {
        span.record("custodian.egress.status", 502);
        return answer(StatusCode::BAD_GATEWAY);
    };
    parts.headers.insert(HOST, value);
    if let Some((name, value)) = &shared.rules[rule].header {
        parts.headers.remove(name);
        if let Ok(mut value) = HeaderValue::from_str(value) {
            value.set_sensitive(true);
            parts.headers.insert(name.clone(), value);
        }
    }
    match sender.send_request(Request::from_parts(parts, body)).await {
        Ok(response) => {
            span.record("custodian.egress.status", response.status().as_u16());
            let counted = span.clone();
            let mut total = 0u64;
            response.map(move |body| {
                body.map_frame(move |frame| {
                    if let Some(data) = frame.data_ref() {
                        total += data.len() as u64;
                        counted.record("custodian.egress.bytes", total);
                    }
                    frame
                })
                .boxed()
            })
        }
        Err(e) => {
            tracing::info!(parent: &span, error = %e, "egress request failed");
            span.record("custodian.egress.status", 502);
            answer(StatusCode::BAD_GATEWAY)
        }
    }
}

/// Terminates the run's TLS with a leaf for `host` from the run's CA and forwards each request
/// over one verified upstream connection (opened again when it closes).
async fn intercept(
    shared: Arc<Shared>,
    admitted: Admitted,
    host: String,
    port: u16,
    io: TokioIo<hyper::upgrade::Upgraded>,
    span: Span,
) {
    let config = match shared.leaf(&host) {
        Ok(config) => config,
        Err(e) => {
            tracing::warn!(parent: &span, error = %e, "cannot mint a certificate for the run");
            return;
        }
    };
    let Ok(tls) = tokio_rustls::TlsAcceptor::from(config).accept(io).await else {
        return;
    };
    drop(span);
    let upstream: Arc<tokio::sync::Mutex<Option<SendRequest<Incoming>>>> = Arc::default();
    let addr = admitted.addr;
    let rule = admitted.rule;
    let service = service_fn(move |request: Request<Incoming>| {
        let (shared, host, upstream) = (shared.clone(), host.clone(), upstream.clone());
        async move {
            let span = shared.span(request.method().as_str(), &host, port, request.uri().path());
            span.record("custodian.egress.allowed", true);
            shared.count(&host, port, true);
            let mut sender = upstream.lock().await;
            if sender.as_ref().is_none_or(SendRequest::is_closed) {
                *sender = match open_tls(&shared, &host, addr).await {
                    Ok(opened) => Some(opened),
                    Err(e) => {
                        tracing::info!(parent: &span, error = %e, "egress connection failed");
                        span.record("custodian.egress.status", 502);
                        return Ok::<_, Infallible>(answer(StatusCode::BAD_GATEWAY));
                    }
                };
            }
            let Some(sender) = sender.as_mut() else {
                return Ok(answer(StatusCode::BAD_GATEWAY));
            };
            if sender.ready().await.is_err() {
                return Ok(answer(StatusCode::BAD_GATEWAY));
            }
            Ok(forward(&shared, rule, &host, port, sender, request, span).await)
        }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(tls), service)
        .await;
}

async fn open_tls(
    shared: &Shared,
    host: &str,
    addr: SocketAddr,
) -> Result<SendRequest<Incoming>, String> {
    let name = ServerName::try_from(host.to_owned()).map_err(|e| e.to_string())?;
    let stream = connect(addr).await.map_err(|e| e.to_string())?;
    let tls = tokio_rustls::TlsConnector::from(shared.upstream.clone())
        .connect(name, stream)
        .await
        .map_err(|e| e.to_string())?;
    handshake(TokioIo::new(tls)).await
}

#[cfg(test)]
mod tests {
    use super::is_restricted;

    #[test]
    fn addresses_that_reach_private_networks_are_restricted_in_every_spelling() {
        let restricted = [
            "10.1.2.3",
            "127.0.0.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "::",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
            "::10.0.0.1",
            "2002:7f00:1::",
            "2002:a9fe:a9fe::1",
            "2002:c0a8:0101::",
            "2001:0:4136:e378:8000:63bf:3fff:fdd2",
            "2001:db8::1",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "fec0::1",
            "64:ff9b::7f00:1",
            "100::1",
            "ff02::1",
        ];
        for ip in restricted {
            assert!(
                is_restricted(ip.parse().unwrap()),
                "{ip} must be restricted"
            );
        }
        let public = [
            "8.8.8.8",
            "140.82.112.3",
            "::ffff:8.8.8.8",
            "2002:808:808::",
            "2606:4700::6810:84e5",
            "2a00:1450:4001:80b::200e",
        ];
        for ip in public {
            assert!(!is_restricted(ip.parse().unwrap()), "{ip} is public");
        }
    }
}
