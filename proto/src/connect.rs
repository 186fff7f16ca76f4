//! The connection to a `backy-server` (from `backy-client`, or from a
//! replica server to its source), and turning gRPC statuses into the
//! model's one-line errors.

use crate::backy_client::BackyClient;
use backy_common::{Error, ErrorKind, Reason, Result, MAX_MESSAGE_BYTES};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Status};

/// The generated client over a channel that adds the bearer token.
pub type Client = BackyClient<InterceptedService<Channel, TokenInterceptor>>;

/// What the client proves itself with and whom it trusts.
#[derive(Clone, Debug, Default)]
pub struct Credentials {
    /// `Bearer <token>`, ready for the authorization header.
    token: Option<MetadataValue<Ascii>>,
    /// CA certificate (PEM) the server's certificate must chain to.
    ca: Option<Vec<u8>>,
    /// Its file, named when the server's certificate does not chain to it.
    ca_path: Option<std::path::PathBuf>,
    /// Client certificate and key (PEM) for mutual TLS.
    identity: Option<(Vec<u8>, Vec<u8>)>,
    /// The name the server's certificate must carry, if not the URL's host.
    server_name: Option<String>,
}

/// Where the credentials come from (flags, env or client.yaml).
#[derive(Clone, Debug, Default)]
pub struct CredentialFiles<'a> {
    pub token_file: Option<&'a Path>,
    pub ca: Option<&'a Path>,
    pub cert: Option<&'a Path>,
    pub key: Option<&'a Path>,
    pub tls_server_name: Option<&'a str>,
}

fn read_secret(path: &Path, what: &str) -> Result<Vec<u8>> {
    let meta =
        std::fs::metadata(path).map_err(|e| Error::io(format!("reading {what} {}", path.display()), e))?;
    if meta.permissions().mode() & 0o004 != 0 {
        return Err(Error::invalid(format!(
            "{what} {} is world-readable: run chmod o-rwx on it",
            path.display()
        )));
    }
    read(path, what)
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::io(format!("reading {what} {}", path.display()), e))
}

/// A CA file must hold a certificate: anything else (a key, a token, DER)
/// would only fail later as an untrusted server.
fn read_ca(path: &Path) -> Result<Vec<u8>> {
    let bytes = read(path, "CA certificate")?;
    if !String::from_utf8_lossy(&bytes).contains("-----BEGIN CERTIFICATE-----") {
        return Err(Error::invalid(format!(
            "--ca/ca: {} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            path.display()
        )));
    }
    Ok(bytes)
}

impl Credentials {
    pub fn load(files: &CredentialFiles<'_>) -> Result<Self> {
        let token = match files.token_file {
            None => None,
            Some(p) => {
                let bytes = read_secret(p, "token file")?;
                let text = String::from_utf8(bytes)
                    .map_err(|_| Error::invalid(format!("token file {} is not text", p.display())))?;
                let token = backy_common::token::check_token(&text)
                    .map_err(|e| Error::invalid(format!("token file {}: {}", p.display(), e.message)))?;
                Some(
                    format!("Bearer {token}")
                        .parse()
                        .map_err(|_| Error::invalid("token is not a valid header value"))?,
                )
            }
        };
        let ca = files.ca.map(read_ca).transpose()?;
        let identity = match (files.cert, files.key) {
            (None, None) => None,
            (Some(c), Some(k)) => Some((read(c, "client certificate")?, read_secret(k, "client key")?)),
            _ => {
                return Err(Error::invalid(
                    "give both --cert and --key for a client certificate",
                ))
            }
        };
        Ok(Credentials {
            token,
            ca,
            ca_path: files.ca.map(Path::to_path_buf),
            identity,
            server_name: files.tls_server_name.map(str::to_string),
        })
    }
}

/// Adds the bearer token to every request.
#[derive(Clone, Debug, Default)]
pub struct TokenInterceptor(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for TokenInterceptor {
    fn call(&mut self, mut req: tonic::Request<()>) -> std::result::Result<tonic::Request<()>, Status> {
        // Every request says which protocol it speaks, so a server can
        // refuse an incompatible client with a clear message.
        req.metadata_mut()
            .insert(crate::PROTOCOL_HEADER, MetadataValue::from(crate::PROTOCOL));
        if let Ok(v) = crate::VERSION.parse() {
            req.metadata_mut().insert(crate::VERSION_HEADER, v);
        }
        if let Some(t) = &self.0 {
            req.metadata_mut()
                .insert(backy_common::token::AUTH_HEADER, t.clone());
        }
        Ok(req)
    }
}

/// Connects without credentials (loopback plaintext servers, tests).
#[cfg(test)]
async fn connect(url: &str) -> Result<Client> {
    connect_with(url, &Credentials::default()).await
}

/// Checks a server URL before anything else happens: `http://` or
/// `https://`, a host, an optional port, nothing more. Returns whether it
/// is https.
pub fn check_url(url: &str) -> Result<bool> {
    let bad = |why: &str| {
        Error::invalid(format!(
            "bad server URL {url:?}: {why}; give a URL like https://backup01:6023"
        ))
    };
    let uri: tonic::codegen::http::Uri = url.parse().map_err(|_| bad("not a URL"))?;
    let https = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        Some(other) => return Err(bad(&format!("scheme {other:?} is neither http nor https"))),
        None => return Err(bad("no scheme")),
    };
    let host = uri.host().unwrap_or("");
    if host.is_empty() {
        return Err(bad("no host"));
    }
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Err(bad("credentials do not go in the URL (use --token-file)"));
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(bad("a server URL has no path or query"));
    }
    Ok(https)
}

/// How long connecting may take, TCP and TLS handshakes and the version
/// exchange together, unless `--timeout` says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(15);

/// Connects eagerly, so an unreachable server (or a certificate that does
/// not verify) is reported as such before any work starts; within
/// [`DEFAULT_TIMEOUT`].
pub async fn connect_with(url: &str, creds: &Credentials) -> Result<Client> {
    connect_within(url, creds, DEFAULT_TIMEOUT).await
}

/// [`connect_with`] within `timeout`: a host that accepts the connection
/// but never answers (a hung server, a wrong port) fails after `timeout`
/// with the URL named, instead of waiting for HTTP/2 keepalives to give up.
/// Streams that follow are not bounded by it (a restore may take hours);
/// keepalives notice a peer that dies during one.
pub async fn connect_within(url: &str, creds: &Credentials, timeout: Duration) -> Result<Client> {
    tokio::time::timeout(timeout, connect_now(url, creds, timeout))
        .await
        .map_err(|_| {
            Error::unavailable(format!(
                "no answer from {url} within {} s: is backy-server running and listening there? \
                 (--timeout SECS waits longer)",
                timeout.as_secs_f64()
            ))
        })?
}

async fn connect_now(url: &str, creds: &Credentials, timeout: Duration) -> Result<Client> {
    let https = check_url(url)?;
    let mut endpoint = Endpoint::from_shared(url.to_string())
        .map_err(|e| Error::invalid(format!("bad server URL {url:?}: {}", chain(&e))))?
        .connect_timeout(timeout)
        .tcp_nodelay(true)
        // Windows of several 1 MiB frames, so a stream never waits for the
        // peer's window update between two frames; larger HTTP/2 frames
        // cut the per-frame work.
        .initial_stream_window_size(16 << 20)
        .initial_connection_window_size(32 << 20)
        .max_frame_size(1 << 20)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(true);
    match (https, &creds.ca) {
        (true, ca) => {
            // Without --ca: the system's trust store (rustls-native-certs:
            // what the host's other tools trust, including a site CA the
            // operator installed; SSL_CERT_FILE/SSL_CERT_DIR override it),
            // never a list compiled into the binary.
            let mut tls = match ca {
                Some(ca) => ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)),
                None => ClientTlsConfig::new().with_native_roots(),
            };
            if let Some((cert, key)) = &creds.identity {
                tls = tls.identity(Identity::from_pem(cert, key));
            }
            if let Some(name) = &creds.server_name {
                tls = tls.domain_name(name.clone());
            }
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| Error::invalid(format!("TLS settings: {}", chain(&e))))?;
        }
        (false, _) if creds.ca.is_some() || creds.identity.is_some() || creds.server_name.is_some() => {
            return Err(Error::invalid(format!(
                "{url}: TLS settings given for a plaintext URL; use https://"
            )))
        }
        (false, _) => {}
    }
    let channel = endpoint.connect().await.map_err(|e| {
        let why = chain(&e);
        let hint = match &creds.ca_path {
            _ if !https || !tls_rejected(&e) => String::new(),
            None => " (without --ca the system's trust store decides: give --ca FILE for a private CA)".into(),
            Some(ca) if why.contains("UnknownIssuer") => format!(
                " (the server's certificate is not signed by the CA in {}: give --ca/ca: the CA that signed it)",
                ca.display()
            ),
            Some(_) => String::new(),
        };
        Error::unavailable(format!("cannot connect to {url}: {why}{hint}"))
    })?;
    let mut client = BackyClient::with_interceptor(channel, TokenInterceptor(creds.token.clone()))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    hello(&mut client).await?;
    Ok(client)
}

/// This program's name as operators know it (`backy-client`, or
/// `backy-server` as a replica), for messages about versions.
fn program() -> String {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .filter(|n| n.starts_with("backy"))
        .unwrap_or_else(|| "backy".to_string())
}

/// Exchanges protocol versions: a server too old for this client, or one
/// that refuses it, fails here with one line naming both versions.
async fn hello(client: &mut Client) -> Result<()> {
    let ours = format!(
        "this {} {} speaks protocol {}",
        program(),
        crate::VERSION,
        crate::PROTOCOL
    );
    let reply = match client
        .hello(crate::HelloRequest {
            protocol: crate::PROTOCOL,
            version: crate::VERSION.to_string(),
        })
        .await
    {
        Ok(r) => r.into_inner(),
        Err(s) if s.code() == Code::Unimplemented => {
            return Err(Error::precondition(format!(
                "the server predates protocol versioning (protocol 0); {ours} and needs {} or newer: \
                 upgrade backy-server",
                crate::MIN_SERVER_PROTOCOL
            ))
            .with_reason(Reason::IncompatibleVersion))
        }
        Err(s) => return Err(status_error(s)),
    };
    if reply.protocol < crate::MIN_SERVER_PROTOCOL {
        return Err(Error::precondition(format!(
            "backy-server {} speaks protocol {}; {ours} and needs {} or newer: upgrade backy-server",
            one_line(&reply.version),
            reply.protocol,
            crate::MIN_SERVER_PROTOCOL
        ))
        .with_reason(Reason::IncompatibleVersion));
    }
    Ok(())
}

/// The protocol of the server `client` talks to (asked again per push:
/// one short round trip, and a client holds no state per connection).
pub async fn server_protocol(client: &mut Client) -> Result<u32> {
    let reply = client
        .hello(crate::HelloRequest {
            protocol: crate::PROTOCOL,
            version: crate::VERSION.to_string(),
        })
        .await
        .map_err(status_error)?;
    Ok(reply.into_inner().protocol)
}

/// A server's answer as a one-line error: its message plus the code name,
/// e.g. `unknown job vm9 (NOT_FOUND)`.
pub fn status_error(status: Status) -> Error {
    let message = status.message().trim();
    let message = if message.is_empty() {
        status.code().description()
    } else {
        message
    };
    // The server's details say what happened; the code is the fallback
    // for errors without them (the transport's own).
    let (kind, reason) =
        crate::error_of_detail(status.details()).unwrap_or((kind_of(status.code()), Reason::Unspecified));
    Error {
        kind,
        // The server's text may carry a peer's (a failure report, a
        // source's error): escaped, so it cannot drive the terminal.
        message: format!(
            "{} ({})",
            backy_common::escape::escape(&one_line(message)),
            code_name(status.code())
        ),
        reason,
        redirect: crate::redirect_of_detail(status.details()),
    }
}

fn kind_of(code: Code) -> ErrorKind {
    match code {
        Code::InvalidArgument | Code::OutOfRange => ErrorKind::InvalidArgument,
        Code::NotFound => ErrorKind::NotFound,
        Code::AlreadyExists => ErrorKind::AlreadyExists,
        Code::FailedPrecondition => ErrorKind::FailedPrecondition,
        Code::Aborted => ErrorKind::Busy,
        Code::ResourceExhausted => ErrorKind::ResourceExhausted,
        Code::DataLoss => ErrorKind::DataLoss,
        Code::Unauthenticated => ErrorKind::Unauthenticated,
        Code::PermissionDenied => ErrorKind::PermissionDenied,
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled => ErrorKind::Unavailable,
        _ => ErrorKind::Internal,
    }
}

/// The canonical gRPC name of a code, as operators see it in other tools.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// An error and its sources joined on one line: tonic's transport errors
/// say only "transport error" at the top.
/// Whether the TLS handshake failed on the data the server sent (its
/// certificate): rustls reports that as an I/O error of kind
/// `InvalidData` somewhere in the error's chain.
fn tls_rejected(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(e);
    while let Some(s) = source {
        if s.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::InvalidData)
        {
            return true;
        }
        source = s.source();
    }
    false
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    one_line(&out)
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_becomes_one_line_error() {
        let e = status_error(Status::not_found("unknown job vm9"));
        assert_eq!(e.kind, ErrorKind::NotFound);
        assert_eq!(e.message, "unknown job vm9 (NOT_FOUND)");
        let e = status_error(Status::internal("a\nb \x1b[2J\u{202e}x"));
        assert_eq!(e.message, "a b \\u{1b}[2J\\u{202e}x (INTERNAL)");
        let e = status_error(Status::data_loss("checksum\nmismatch"));
        assert_eq!(e.message, "checksum mismatch (DATA_LOSS)");
        assert_eq!(e.kind, ErrorKind::DataLoss);
        let e = status_error(Status::new(Code::Unavailable, ""));
        assert!(e.message.ends_with("(UNAVAILABLE)"), "{}", e.message);
        assert!(e.kind.is_retryable());
    }

    #[tokio::test]
    async fn bad_url_and_refused_connection() {
        let e = connect("not a url").await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidArgument, "{}", e.message);
        // Port 1 on localhost: nobody listens there.
        let e = connect("http://127.0.0.1:1").await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::Unavailable);
        assert!(
            e.message.starts_with("cannot connect to http://127.0.0.1:1: "),
            "{}",
            e.message
        );
        assert!(!e.message.contains('\n'));
    }
}
