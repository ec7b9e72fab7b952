//! A route's policies, compiled from its `[[routes]]` entry at start and on every reload, and
//! checked in the request path's `policy` phase ([`crate::proxy`]) before anything is sent to an
//! agent:
//!
//! 1. [`AddressRule`]: `allow_ips` / `deny_ips` (a match on the deny list wins): 403.
//! 2. [`RateLimit`]: `rate_limit_per_ip` requests a second with `rate_limit_burst`: 429 with
//!    `Retry-After`. A bounded table of buckets, so that a flood of addresses cannot grow it.
//! 3. [`BasicAuth`]: `basic_auth_file` (htpasswd, bcrypt only): 401 with `WWW-Authenticate`.
//!    Verified credentials are remembered for a while under an HMAC of them with a key made at
//!    start (never the password itself), so that only the first request of a user pays bcrypt's
//!    milliseconds; failed attempts are limited per address, and bcrypt runs off the async
//!    threads, a few at a time.
//!
//! Header rewrites (`request_headers_set`/`_remove`, `response_headers_set`/`_remove`) are
//! [`HeaderEdits`], applied where the request head is built and where the response head is.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use http::{HeaderMap, HeaderName, HeaderValue};
use ipnet::IpNet;
use quictun_core::edge::forwarded::TrustedProxies;
use tokio::sync::Semaphore;

use crate::config::RouteEntry;

/// Everything a route checks and rewrites.
#[derive(Debug, Default)]
pub struct Policies {
    /// Who may send requests on the route.
    pub addresses: Option<AddressRule>,
    /// How fast one address may send them.
    pub rate: Option<RateLimit>,
    /// Who the request must say it is.
    pub basic_auth: Option<BasicAuth>,
    /// Headers set on and removed from the request the upstream gets.
    pub request_headers: HeaderEdits,
    /// Headers set on and removed from the response the client gets.
    pub response_headers: HeaderEdits,
}

/// Why a policy key cannot be compiled: the key (relative to its route) and what is wrong.
pub type PolicyError = (String, String);

impl Policies {
    /// Compiles `keys`; an error names the key (`allow_ips[2]`, `basic_auth_file`) and says why.
    pub fn compile(keys: &RouteEntry) -> Result<Self, PolicyError> {
        let addresses = AddressRule::compile(&keys.allow_ips, &keys.deny_ips)?;
        let rate = match keys.rate_limit_per_ip {
            None => None,
            Some(rate) if rate.is_finite() && rate > 0.0 => {
                let burst = keys.rate_limit_burst.unwrap_or_else(|| rate.ceil().max(1.0) as u32);
                if burst == 0 {
                    return Err(("rate_limit_burst".into(), "must be at least 1".into()));
                }
                Some(RateLimit::new(rate, burst, RATE_KEYS))
            }
            Some(rate) => return Err(("rate_limit_per_ip".into(), format!("{rate} is not a positive rate"))),
        };
        if keys.rate_limit_burst.is_some() && keys.rate_limit_per_ip.is_none() {
            return Err(("rate_limit_burst".into(), "needs rate_limit_per_ip".into()));
        }
        let basic_auth = match &keys.basic_auth_file {
            Some(file) => {
                let realm = keys.basic_auth_realm.clone().unwrap_or_else(|| "quictun".into());
                if realm.contains('"') || realm.chars().any(char::is_control) {
                    return Err(("basic_auth_realm".into(), "may not contain quotes or control characters".into()));
                }
                Some(BasicAuth::load(file, &realm).map_err(|why| ("basic_auth_file".into(), why))?)
            }
            None if keys.basic_auth_realm.is_some() => {
                return Err(("basic_auth_realm".into(), "needs basic_auth_file".into()));
            }
            None => None,
        };
        let request_headers =
            HeaderEdits::compile(&keys.request_headers_set, &keys.request_headers_remove, "request_headers")?;
        let response_headers =
            HeaderEdits::compile(&keys.response_headers_set, &keys.response_headers_remove, "response_headers")?;
        Ok(Self { addresses, rate, basic_auth, request_headers, response_headers })
    }

    /// The policies the route has, by key family, for the admin endpoint.
    pub fn names(&self) -> Vec<&'static str> {
        let mut names = Vec::new();
        if self.basic_auth.is_some() {
            names.push("basic_auth");
        }
        if self.addresses.is_some() {
            names.push("ip_rules");
        }
        if self.rate.is_some() {
            names.push("rate_limit");
        }
        if !self.request_headers.is_empty() {
            names.push("request_headers");
        }
        if !self.response_headers.is_empty() {
            names.push("response_headers");
        }
        names
    }

    /// True when the route checks anything before dispatch.
    pub fn checks_anything(&self) -> bool {
        self.addresses.is_some() || self.rate.is_some() || self.basic_auth.is_some()
    }
}

/// The client address a policy judges: the TCP peer, or, when the peer is a trusted proxy, the
/// right-most address in `X-Forwarded-For` that is not one (what the last proxy we trust saw).
pub fn client_address(trusted: &TrustedProxies, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
    let peer = peer.to_canonical();
    if !trusted.contains(peer) {
        return peer;
    }
    let entries: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    for entry in entries.iter().rev() {
        let Ok(ip) = entry.parse::<IpAddr>() else {
            // Unparseable: nothing to its left can be trusted either; judge the proxy itself.
            return peer;
        };
        let ip = ip.to_canonical();
        if !trusted.contains(ip) {
            return ip;
        }
    }
    peer
}

/// `allow_ips` and `deny_ips`, compiled.
#[derive(Debug)]
pub struct AddressRule {
    allow: Vec<IpNet>,
    deny: Vec<IpNet>,
}

impl AddressRule {
    fn compile(allow: &[String], deny: &[String]) -> Result<Option<Self>, PolicyError> {
        let parse = |key: &str, list: &[String]| {
            list.iter()
                .enumerate()
                .map(|(i, entry)| TrustedProxies::parse_network(entry).map_err(|why| (format!("{key}[{i}]"), why)))
                .collect::<Result<Vec<_>, _>>()
        };
        let (allow, deny) = (parse("allow_ips", allow)?, parse("deny_ips", deny)?);
        Ok((!allow.is_empty() || !deny.is_empty()).then_some(Self { allow, deny }))
    }

    /// True when `ip` may use the route.
    pub fn admits(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        if self.deny.iter().any(|net| net.contains(&ip)) {
            return false;
        }
        self.allow.is_empty() || self.allow.iter().any(|net| net.contains(&ip))
    }
}

/// Addresses a rate limit remembers at most: past this, addresses whose bucket has refilled are
/// forgotten, and if that is not enough, all are (each bucket is 40 bytes or so).
pub const RATE_KEYS: usize = 100_000;

/// A token bucket per client address, in a bounded table.
#[derive(Debug)]
pub struct RateLimit {
    rate: f64,
    burst: f64,
    max_keys: usize,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl RateLimit {
    /// `rate` a second, `burst` at once, remembering at most `max_keys` addresses.
    pub fn new(rate: f64, burst: u32, max_keys: usize) -> Self {
        Self { rate, burst: f64::from(burst), max_keys, buckets: Mutex::new(HashMap::new()) }
    }

    /// Takes one request's token for `ip`, or says how long until one is there.
    pub fn take(&self, ip: IpAddr) -> Result<(), Duration> {
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if buckets.len() >= self.max_keys && !buckets.contains_key(&ip) {
            let full_after = self.burst / self.rate;
            buckets.retain(|_, b| now.duration_since(b.at).as_secs_f64() < full_after);
            if buckets.len() >= self.max_keys {
                buckets.clear();
            }
        }
        let bucket = buckets.entry(ip).or_insert(Bucket { tokens: self.burst, at: now });
        let refill = now.duration_since(bucket.at).as_secs_f64() * self.rate;
        bucket.tokens = (bucket.tokens + refill).min(self.burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - bucket.tokens) / self.rate))
        }
    }

    /// Addresses remembered now.
    #[cfg(test)]
    fn keys(&self) -> usize {
        self.buckets.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).len()
    }
}

/// The longest `Authorization` value checked; a longer one is refused without bcrypt.
const MAX_CREDENTIALS: usize = 1024;
/// How long verified credentials are remembered.
const REMEMBER_FOR: Duration = Duration::from_secs(300);
/// Verified credentials remembered at most.
const REMEMBERED: usize = 4096;
/// bcrypt verifications at once (each holds a blocking thread for milliseconds).
const VERIFYING: usize = 4;
/// Failed attempts one address may make a second, and at once.
const FAILURES_PER_SEC: f64 = 1.0;
const FAILURE_BURST: u32 = 10;

/// `basic_auth_file`, loaded.
#[derive(Debug)]
pub struct BasicAuth {
    users: HashMap<String, String>,
    /// A hash of the first user's cost, verified against for users not in the file.
    decoy: String,
    realm: String,
    key: ring::hmac::Key,
    remembered: Mutex<HashMap<[u8; 32], Instant>>,
    verifying: Arc<Semaphore>,
    failures: RateLimit,
}

/// What a basic-auth check decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthOutcome {
    /// A user of the file, with the right password.
    Allowed,
    /// No credentials, or wrong ones: 401 with the challenge.
    Refused,
    /// Too many failed attempts from this address: 429 for this long.
    TooManyFailures(Duration),
}

impl BasicAuth {
    /// Reads an htpasswd file of bcrypt entries; an error names the line and what is wrong.
    pub fn load(file: &Path, realm: &str) -> Result<Self, String> {
        let text = std::fs::read_to_string(file).map_err(|err| format!("cannot read {}: {err}", file.display()))?;
        let mut users = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let at = format!("{}, line {}", file.display(), i + 1);
            let Some((user, hash)) = line.split_once(':') else {
                return Err(format!("{at}: not user:hash"));
            };
            if user.is_empty() {
                return Err(format!("{at}: empty user name"));
            }
            if hash.parse::<bcrypt::HashParts>().is_err() {
                return Err(format!("{at}: not a bcrypt hash (make one with htpasswd -B)"));
            }
            users.insert(user.to_owned(), hash.to_owned());
        }
        let Some(cost) =
            users.values().next().and_then(|hash| hash.parse::<bcrypt::HashParts>().ok()).map(|h| h.get_cost())
        else {
            return Err(format!("{} has no users", file.display()));
        };
        let decoy = bcrypt::hash("decoy", cost).map_err(|err| format!("bcrypt: {err}"))?;
        let mut key = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut key)
            .map_err(|_| "no randomness for the credential cache's key".to_owned())?;
        Ok(Self {
            users,
            decoy,
            realm: realm.to_owned(),
            key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key),
            remembered: Mutex::new(HashMap::new()),
            verifying: Arc::new(Semaphore::new(VERIFYING)),
            failures: RateLimit::new(FAILURES_PER_SEC, FAILURE_BURST, RATE_KEYS),
        })
    }

    /// The challenge a refusal carries.
    pub fn challenge(&self) -> HeaderValue {
        HeaderValue::from_str(&format!("Basic realm=\"{}\", charset=\"UTF-8\"", self.realm))
            .unwrap_or_else(|_| HeaderValue::from_static("Basic"))
    }

    /// Checks a request's `Authorization` header for `client`.
    pub async fn check(&self, authorization: Option<&HeaderValue>, client: IpAddr) -> AuthOutcome {
        if let Some(outcome) = self.failures_left(client) {
            return outcome;
        }
        let Some((user, password)) = authorization.and_then(credentials) else {
            return AuthOutcome::Refused;
        };
        let tag = ring::hmac::sign(&self.key, &[user.as_bytes(), b"\0", password.as_bytes()].concat());
        let tag: [u8; 32] = tag.as_ref().try_into().unwrap_or([0; 32]);
        if self.is_remembered(&tag) {
            return AuthOutcome::Allowed;
        }
        // An unknown user costs a bcrypt too, so that the time taken does not tell users apart.
        let verified = match self.users.get(&user) {
            Some(hash) => self.verify(password, hash.clone()).await,
            None => {
                let _same_cost = self.verify(password, self.decoy.clone()).await;
                false
            }
        };
        if verified {
            self.remember(tag);
            return AuthOutcome::Allowed;
        }
        match self.failures.take(client) {
            Ok(()) => AuthOutcome::Refused,
            Err(wait) => AuthOutcome::TooManyFailures(wait),
        }
    }

    /// `Some(TooManyFailures)` while `client` has used up its failed attempts.
    fn failures_left(&self, client: IpAddr) -> Option<AuthOutcome> {
        let buckets = self.failures.buckets.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let bucket = buckets.get(&client)?;
        let tokens = bucket.tokens + bucket.at.elapsed().as_secs_f64() * self.failures.rate;
        (tokens < 1.0)
            .then(|| AuthOutcome::TooManyFailures(Duration::from_secs_f64((1.0 - tokens) / self.failures.rate)))
    }

    async fn verify(&self, password: String, hash: String) -> bool {
        let Ok(_turn) = self.verifying.clone().acquire_owned().await else { return false };
        tokio::task::spawn_blocking(move || bcrypt::verify(password, &hash).unwrap_or(false)).await.unwrap_or(false)
    }

    fn is_remembered(&self, tag: &[u8; 32]) -> bool {
        let remembered = self.remembered.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        remembered.get(tag).is_some_and(|until| Instant::now() < *until)
    }

    fn remember(&self, tag: [u8; 32]) {
        let mut remembered = self.remembered.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if remembered.len() >= REMEMBERED {
            let now = Instant::now();
            remembered.retain(|_, until| now < *until);
            if remembered.len() >= REMEMBERED {
                remembered.clear();
            }
        }
        remembered.insert(tag, Instant::now() + REMEMBER_FOR);
    }
}

/// The user and password of a `Basic` authorization, when it is one and not over the size limit.
fn credentials(value: &HeaderValue) -> Option<(String, String)> {
    let value = value.as_bytes();
    if value.len() > MAX_CREDENTIALS {
        return None;
    }
    let value = std::str::from_utf8(value).ok()?.trim();
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD.decode(encoded.trim()).ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (user, password) = decoded.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

/// Headers to set and to remove, compiled (names and values checked once, at load).
#[derive(Debug, Default)]
pub struct HeaderEdits {
    set: Vec<(HeaderName, HeaderValue)>,
    remove: Vec<HeaderName>,
}

/// Headers no rewrite may touch: they frame the message or belong to the relay.
const NOT_REWRITTEN: [&str; 8] = [
    "connection",
    "content-length",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "host",
    quictun_core::edge::forwarded::REQUEST_ID_HEADER,
];

impl HeaderEdits {
    fn compile(set: &BTreeMap<String, String>, remove: &[String], key: &str) -> Result<Self, PolicyError> {
        let name = |key: String, name: &str| {
            let parsed = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| (key.clone(), format!("{name:?} is not a header name")))?;
            if NOT_REWRITTEN.contains(&parsed.as_str()) {
                return Err((key, format!("{name:?} frames the message or is the relay's; it cannot be rewritten")));
            }
            Ok(parsed)
        };
        let mut edits = Self::default();
        for (header, value) in set {
            let at = format!("{key}_set.{header}");
            let parsed = name(at.clone(), header)?;
            let value = HeaderValue::from_str(value).map_err(|_| (at, format!("{value:?} is not a header value")))?;
            edits.set.push((parsed, value));
        }
        for (i, header) in remove.iter().enumerate() {
            edits.remove.push(name(format!("{key}_remove[{i}]"), header)?);
        }
        Ok(edits)
    }

    /// True when there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.remove.is_empty()
    }

    /// Removes, then sets.
    pub fn apply(&self, headers: &mut HeaderMap) {
        for name in &self.remove {
            headers.remove(name);
        }
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
    }

    /// The same on wire headers (lower-case names).
    pub fn apply_to_wire(&self, headers: &mut Vec<quictun_proto::Header>) {
        if self.is_empty() {
            return;
        }
        headers.retain(|h| {
            !self.remove.iter().any(|n| n.as_str() == h.name) && !self.set.iter().any(|(n, _)| n.as_str() == h.name)
        });
        for (name, value) in &self.set {
            headers.push(quictun_proto::Header { name: name.as_str().to_owned(), value: value.as_bytes().to_vec() });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn deny_wins_over_allow_and_v4_mapped_addresses_match_v4_networks() {
        let rule = AddressRule::compile(&["10.0.0.0/8".into(), "2001:db8::/32".into()], &["10.9.0.0/16".into()])
            .unwrap()
            .unwrap();
        assert!(rule.admits(ip("10.1.2.3")));
        assert!(rule.admits(ip("::ffff:10.1.2.3")));
        assert!(!rule.admits(ip("10.9.1.1")));
        assert!(rule.admits(ip("2001:db8::7")));
        assert!(!rule.admits(ip("192.0.2.1")));
        let err = AddressRule::compile(&["10.0.0.0/8".into(), "10.0.0.0/33".into()], &[]).unwrap_err();
        assert_eq!(err.0, "allow_ips[1]");
    }

    #[test]
    fn a_bucket_allows_its_burst_then_says_when() {
        let limit = RateLimit::new(2.0, 3, 10);
        for _ in 0..3 {
            assert!(limit.take(ip("192.0.2.1")).is_ok());
        }
        let wait = limit.take(ip("192.0.2.1")).unwrap_err();
        assert!(wait > Duration::from_millis(400) && wait <= Duration::from_millis(500), "{wait:?}");
        assert!(limit.take(ip("192.0.2.2")).is_ok(), "another address has its own bucket");
    }

    #[test]
    fn a_flood_of_addresses_keeps_the_table_bounded() {
        let limit = RateLimit::new(1.0, 1, 1_000);
        for i in 0..200_000u32 {
            let _ = limit.take(IpAddr::from(i.to_be_bytes()));
            assert!(limit.keys() <= 1_000);
        }
    }

    #[test]
    fn the_client_is_the_rightmost_untrusted_forwarded_address() {
        let trusted = TrustedProxies::new(vec![TrustedProxies::parse_network("10.0.0.0/8").unwrap()]);
        let mut headers = HeaderMap::new();
        headers.append("x-forwarded-for", HeaderValue::from_static("198.51.100.9, 203.0.113.5"));
        headers.append("x-forwarded-for", HeaderValue::from_static("10.0.0.2"));
        assert_eq!(client_address(&trusted, ip("10.0.0.1"), &headers), ip("203.0.113.5"));
        assert_eq!(client_address(&trusted, ip("192.0.2.1"), &headers), ip("192.0.2.1"), "an untrusted peer");
        let mut forged = HeaderMap::new();
        forged.append("x-forwarded-for", HeaderValue::from_static("nonsense"));
        assert_eq!(client_address(&trusted, ip("10.0.0.1"), &forged), ip("10.0.0.1"));
    }

    #[test]
    fn rewrites_are_checked_at_load() {
        let set = |name: &str, value: &str| BTreeMap::from([(name.to_owned(), value.to_owned())]);
        assert!(HeaderEdits::compile(&set("x-env", "prod"), &["server".into()], "request_headers").is_ok());
        let err = HeaderEdits::compile(&set("x-env", "bad\nvalue"), &[], "request_headers").unwrap_err();
        assert_eq!(err.0, "request_headers_set.x-env");
        let err = HeaderEdits::compile(&set("bad name", "v"), &[], "response_headers").unwrap_err();
        assert_eq!(err.0, "response_headers_set.bad name");
        let err = HeaderEdits::compile(&BTreeMap::new(), &["content-length".into()], "response_headers").unwrap_err();
        assert_eq!(err.0, "response_headers_remove[0]");
    }

    #[test]
    fn a_broken_htpasswd_line_is_named() {
        let dir = std::env::temp_dir().join(format!("quictun-htpasswd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("users");
        let good = bcrypt::hash("secret", 4).unwrap();
        std::fs::write(&file, format!("# users\nalice:{good}\nbob:{{SHA}}notbcrypt\n")).unwrap();
        let err = BasicAuth::load(&file, "r").unwrap_err();
        assert!(err.contains("line 3") && err.contains("bcrypt"), "{err}");
        std::fs::write(&file, format!("alice:{good}\n")).unwrap();
        assert!(BasicAuth::load(&file, "r").is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn credentials_are_verified_once_then_remembered() {
        let dir = std::env::temp_dir().join(format!("quictun-htpasswd-cache-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("users");
        std::fs::write(&file, format!("alice:{}\n", bcrypt::hash("secret", 4).unwrap())).unwrap();
        let auth = BasicAuth::load(&file, "r").unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let header = |user_pass: &str| {
            let encoded = base64::engine::general_purpose::STANDARD.encode(user_pass);
            HeaderValue::from_str(&format!("Basic {encoded}")).unwrap()
        };
        let client = ip("192.0.2.1");
        assert_eq!(auth.check(Some(&header("alice:secret")), client).await, AuthOutcome::Allowed);
        assert_eq!(auth.remembered.lock().unwrap().len(), 1);
        assert_eq!(auth.check(Some(&header("alice:secret")), client).await, AuthOutcome::Allowed);
        assert_eq!(auth.check(Some(&header("alice:wrong")), client).await, AuthOutcome::Refused);
        assert_eq!(auth.check(None, client).await, AuthOutcome::Refused);
        let long = format!("alice:{}", "x".repeat(10_000));
        assert_eq!(auth.check(Some(&header(&long)), client).await, AuthOutcome::Refused, "over the size, unchecked");
        // Ten failures a burst, one a second: the address is told to wait.
        let mut limited = false;
        for _ in 0..12 {
            limited |=
                matches!(auth.check(Some(&header("alice:wrong")), client).await, AuthOutcome::TooManyFailures(_));
        }
        assert!(limited);
        assert_eq!(auth.check(Some(&header("alice:wrong")), ip("192.0.2.2")).await, AuthOutcome::Refused);
    }
}
