//! What keeps unauthenticated load away from the database.
//!
//! Rules:
//! * Each client address has a bucket of authentication failures
//!   (`AUTH_FAILURES_PER_SEC`, `AUTH_FAILURE_BURST`). A missing, unknown or
//!   revoked key costs one token; a request from an address whose bucket is
//!   empty is answered `429` before its key is looked up, so it costs no
//!   query. The token is taken before the lookup (so requests arriving
//!   together cannot all pass on the last one) and given back when the key
//!   is good: successful authentications cost nothing, and a busy client
//!   with a good key is never limited by it.
//! * A key that authenticated recently ("known good", by digest) skips the
//!   address check, so a good client keeps working while something else at
//!   its address (a misconfigured process, an attacker behind the same NAT or
//!   proxy) has used up the address's failures. It is still looked up each
//!   time: revocation stays immediate.
//! * A digest found unknown is remembered for `AUTH_NEGATIVE_CACHE_SECS` and
//!   refused from memory meanwhile; a key created in that time is refused
//!   until its digest's entry expires.
//! * Everything here is bounded: the caches evict their oldest entries, and
//!   addresses past [`MAX_ADDRESSES`] share one bucket, so a flood of
//!   distinct keys or addresses cannot grow memory without bound.
//!
//! An address is the TCP peer: behind a proxy every client has the proxy's
//! address (no `X-Forwarded-For` is trusted, as any client could send it).
//! IPv6 addresses count by their /64, the block one host usually gets.

use std::{
    collections::{HashMap, VecDeque},
    net::{IpAddr, SocketAddr},
    sync::{Mutex, PoisonError},
    time::{Duration, Instant},
};

/// Most addresses with a bucket of their own; past it, new addresses share
/// one bucket (about 4 MB of state at most).
pub const MAX_ADDRESSES: usize = 100_000;
/// Most digests remembered as unknown (about 5 MB).
pub const NEGATIVE_CACHE_MAX: usize = 50_000;
/// Most digests remembered as good: real keys are few.
pub const KNOWN_GOOD_MAX: usize = 10_000;
/// How long a key that authenticated stays known good without being used.
pub const KNOWN_GOOD_TTL: Duration = Duration::from_secs(600);

/// Whom a bucket of failures belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Client {
    V4(u32),
    /// The first 64 bits of an IPv6 address.
    V6(u64),
    /// Requests without a known peer (a router driven without the server).
    Unknown,
    /// Every address that found the table full.
    Overflow,
}

impl Client {
    fn of(addr: Option<SocketAddr>) -> Self {
        match addr.map(|a| a.ip().to_canonical()) {
            Some(IpAddr::V4(ip)) => Self::V4(ip.to_bits()),
            Some(IpAddr::V6(ip)) => Self::V6((ip.to_bits() >> 64) as u64),
            None => Self::Unknown,
        }
    }
}

/// Token buckets of failures per client address (GCRA: each address keeps
/// the time at which its bucket will be full again). `governor`'s keyed
/// limiter cannot tell whether a bucket is empty without taking a token,
/// and here only failures may take one.
#[derive(Debug)]
pub struct AddressLimiter {
    /// Time one token takes to come back.
    interval: Duration,
    /// The bucket's size, as time: `burst × interval`.
    capacity: Duration,
    inner: Mutex<Buckets>,
}

#[derive(Debug)]
struct Buckets {
    /// When each address's bucket is full again; an address past that time
    /// has a full bucket and is dropped at the next sweep.
    full_at: HashMap<Client, Instant>,
    /// Sweep when the table reaches this size (doubling: amortised O(1)).
    sweep_at: usize,
    /// When the last sweep ran: a full table is swept again once every
    /// bucket's time has passed since, not on every failure.
    swept: Option<Instant>,
}

impl AddressLimiter {
    /// `per_sec` tokens a second, at most `burst` saved up.
    pub fn new(per_sec: u32, burst: u32) -> Self {
        let interval = Duration::from_secs(1) / per_sec.max(1);
        Self {
            interval,
            capacity: interval * burst.max(1),
            inner: Mutex::new(Buckets {
                full_at: HashMap::new(),
                sweep_at: 1024,
                swept: None,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Buckets> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// How long until the bucket has a token, if it has none now.
    fn wait(&self, full_at: Option<Instant>, now: Instant) -> Option<Duration> {
        let next = full_at.map_or(now, |t| t.max(now)) + self.interval;
        let limit = now + self.capacity;
        (next > limit).then(|| next - limit)
    }

    /// `Err(wait)` when `addr`'s bucket is empty; takes nothing.
    pub fn check(&self, addr: Option<SocketAddr>, now: Instant) -> Result<(), Duration> {
        let buckets = self.lock();
        let client = buckets.client(Client::of(addr));
        match self.wait(buckets.full_at.get(&client).copied(), now) {
            Some(wait) => Err(wait),
            None => Ok(()),
        }
    }

    /// Gives back a token taken from `addr`'s bucket (for a request that
    /// turned out not to fail).
    pub fn give_back(&self, addr: Option<SocketAddr>, now: Instant) {
        let mut buckets = self.lock();
        let client = buckets.client(Client::of(addr));
        if let Some(full_at) = buckets.full_at.get_mut(&client) {
            match full_at.checked_sub(self.interval) {
                Some(earlier) if earlier > now => *full_at = earlier,
                _ => {
                    buckets.full_at.remove(&client);
                }
            }
        }
    }

    /// Takes a token from `addr`'s bucket; `Err(wait)` when it had none.
    pub fn take(&self, addr: Option<SocketAddr>, now: Instant) -> Result<(), Duration> {
        let mut buckets = self.lock();
        let len = buckets.full_at.len();
        let due = len >= buckets.sweep_at
            || (len >= MAX_ADDRESSES && buckets.swept.is_none_or(|at| now >= at + self.capacity));
        if due {
            buckets.full_at.retain(|_, full| *full > now);
            buckets.sweep_at = (buckets.full_at.len() * 2).max(1024);
            buckets.swept = Some(now);
        }
        let client = buckets.client(Client::of(addr));
        let full_at = buckets.full_at.get(&client).copied();
        if let Some(wait) = self.wait(full_at, now) {
            return Err(wait);
        }
        let next = full_at.map_or(now, |t| t.max(now)) + self.interval;
        buckets.full_at.insert(client, next);
        Ok(())
    }

    /// Addresses holding state now (for tests and the bound).
    pub fn len(&self) -> usize {
        self.lock().full_at.len()
    }

    /// Whether no address holds state.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Buckets {
    /// The bucket `client` uses: its own, unless the table is full and it has
    /// none yet.
    fn client(&self, client: Client) -> Client {
        if self.full_at.len() >= MAX_ADDRESSES && !self.full_at.contains_key(&client) {
            Client::Overflow
        } else {
            client
        }
    }
}

/// A bounded set of key digests, each remembered for a time.
#[derive(Debug)]
pub struct DigestSet {
    ttl: Duration,
    max: usize,
    inner: Mutex<Digests>,
}

#[derive(Debug, Default)]
struct Digests {
    until: HashMap<[u8; 32], Instant>,
    /// Insertion order (so expiry order, the time to live being one): the
    /// oldest entries are dropped first. An entry whose digest was inserted
    /// again or removed since is stale and dropped without touching `until`.
    order: VecDeque<([u8; 32], Instant)>,
}

impl DigestSet {
    /// Remembers at most `max` digests for `ttl` each (`ttl` zero: none).
    pub fn new(ttl: Duration, max: usize) -> Self {
        Self {
            ttl,
            max,
            inner: Mutex::new(Digests::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Digests> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether `digest` is remembered and not expired.
    pub fn contains(&self, digest: &[u8; 32], now: Instant) -> bool {
        self.lock().until.get(digest).is_some_and(|t| *t > now)
    }

    /// Remembers `digest` from `now` on; when it is already remembered for
    /// more than half its time, leaves it (a key used a thousand times a
    /// second must not fill the order with copies of itself).
    pub fn insert(&self, digest: [u8; 32], now: Instant) {
        if self.ttl.is_zero() || self.max == 0 {
            return;
        }
        let mut d = self.lock();
        if d.until
            .get(&digest)
            .is_some_and(|t| *t > now + self.ttl / 2)
        {
            return;
        }
        while d.order.len() >= self.max || d.order.front().is_some_and(|(_, t)| *t <= now) {
            let Some((old, t)) = d.order.pop_front() else {
                break;
            };
            if d.until.get(&old) == Some(&t) {
                d.until.remove(&old);
            }
        }
        let until = now + self.ttl;
        d.until.insert(digest, until);
        d.order.push_back((digest, until));
    }

    /// Forgets `digest`.
    pub fn remove(&self, digest: &[u8; 32]) {
        self.lock().until.remove(digest);
    }

    /// Digests remembered now, expired ones not yet dropped included.
    pub fn len(&self) -> usize {
        self.lock().until.len()
    }

    /// Whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The address limiter and the two digest caches, as the API uses them.
#[derive(Debug)]
pub struct AuthGuard {
    /// Failures per client address.
    pub addresses: AddressLimiter,
    /// Digests found unknown (or revoked), refused from memory.
    pub unknown: DigestSet,
    /// Digests that authenticated recently: exempt from the address check.
    pub known_good: DigestSet,
}

impl AuthGuard {
    /// From `AUTH_FAILURES_PER_SEC`, `AUTH_FAILURE_BURST` and
    /// `AUTH_NEGATIVE_CACHE_SECS`.
    pub fn new(failures_per_sec: u32, failure_burst: u32, negative_ttl: Duration) -> Self {
        Self {
            addresses: AddressLimiter::new(failures_per_sec, failure_burst),
            unknown: DigestSet::new(negative_ttl, NEGATIVE_CACHE_MAX),
            known_good: DigestSet::new(KNOWN_GOOD_TTL, KNOWN_GOOD_MAX),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> Option<SocketAddr> {
        s.parse().ok()
    }

    #[test]
    fn an_address_may_fail_its_burst_then_one_per_interval() {
        let limiter = AddressLimiter::new(10, 3);
        let a = addr("10.0.0.1:1000");
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(limiter.check(a, t0), Ok(()));
            assert_eq!(limiter.take(a, t0), Ok(()));
        }
        let wait = limiter.check(a, t0).expect_err("empty");
        assert_eq!(wait, Duration::from_millis(100));
        assert!(limiter.take(a, t0).is_err(), "no token taken on credit");
        // Another port of the same host shares the bucket; another host not.
        assert!(limiter.check(addr("10.0.0.1:2000"), t0).is_err());
        assert_eq!(limiter.check(addr("10.0.0.2:1000"), t0), Ok(()));
        // One interval later, one failure more.
        let t1 = t0 + Duration::from_millis(100);
        assert_eq!(limiter.take(a, t1), Ok(()));
        assert!(limiter.check(a, t1).is_err());
        // After the whole bucket's time, a full bucket again.
        let t2 = t1 + Duration::from_millis(300);
        for _ in 0..3 {
            assert_eq!(limiter.take(a, t2), Ok(()));
        }
        assert!(limiter.take(a, t2).is_err());
    }

    #[test]
    fn a_token_given_back_can_be_taken_again() {
        let limiter = AddressLimiter::new(10, 2);
        let a = addr("10.0.0.1:1000");
        let t0 = Instant::now();
        assert_eq!(limiter.take(a, t0), Ok(()));
        limiter.give_back(a, t0);
        assert!(limiter.is_empty(), "a full bucket again");
        assert_eq!(limiter.take(a, t0), Ok(()));
        assert_eq!(limiter.take(a, t0), Ok(()));
        assert!(limiter.check(a, t0).is_err());
        limiter.give_back(a, t0);
        assert_eq!(limiter.take(a, t0), Ok(()));
        assert!(limiter.take(a, t0).is_err());
        // Giving back to a bucket already full changes nothing.
        limiter.give_back(addr("10.0.0.9:1"), t0);
        assert_eq!(limiter.check(addr("10.0.0.9:1"), t0), Ok(()));
    }

    #[test]
    fn ipv6_hosts_count_by_their_64_block_and_mapped_ipv4_as_ipv4() {
        let limiter = AddressLimiter::new(1, 1);
        let t0 = Instant::now();
        assert_eq!(limiter.take(addr("[2001:db8:1:2::1]:1"), t0), Ok(()));
        assert!(limiter.check(addr("[2001:db8:1:2::ffff]:1"), t0).is_err());
        assert_eq!(limiter.check(addr("[2001:db8:1:3::1]:1"), t0), Ok(()));
        assert_eq!(limiter.take(addr("[::ffff:192.0.2.1]:1"), t0), Ok(()));
        assert!(limiter.check(addr("192.0.2.1:1"), t0).is_err());
        // No address at all: one shared bucket.
        assert_eq!(limiter.take(None, t0), Ok(()));
        assert!(limiter.check(None, t0).is_err());
    }

    #[test]
    fn addresses_with_full_buckets_are_swept_and_the_table_is_bounded() {
        let limiter = AddressLimiter::new(1000, 1);
        let t0 = Instant::now();
        for i in 0..(MAX_ADDRESSES as u32 + 10) {
            let a = Some(SocketAddr::from((IpAddr::V4(i.into()), 1)));
            let _ = limiter.take(a, t0);
        }
        assert!(limiter.len() <= MAX_ADDRESSES + 1, "{}", limiter.len());
        // Past the table's size, new addresses share the overflow bucket.
        let late = Some(SocketAddr::from(([203, 0, 113, 9], 1)));
        assert!(limiter.check(late, t0).is_err());
        // Once their buckets are full again, the next failure sweeps them.
        let later = t0 + Duration::from_secs(1);
        assert_eq!(limiter.take(late, later), Ok(()));
        assert!(limiter.len() <= 2, "{}", limiter.len());
    }

    #[test]
    fn digests_are_remembered_for_their_time_and_the_oldest_go_first() {
        let set = DigestSet::new(Duration::from_secs(10), 3);
        let t0 = Instant::now();
        for i in 0..3u8 {
            set.insert([i; 32], t0);
        }
        assert!(set.contains(&[0; 32], t0));
        set.insert([3; 32], t0);
        assert!(!set.contains(&[0; 32], t0), "the oldest went");
        assert!(set.contains(&[3; 32], t0));
        assert_eq!(set.len(), 3);
        assert!(!set.contains(&[3; 32], t0 + Duration::from_secs(10)));
        set.remove(&[3; 32]);
        assert!(!set.contains(&[3; 32], t0));
        // A flood of distinct digests stays within the bound.
        for i in 0..10_000u32 {
            let mut d = [0u8; 32];
            d[..4].copy_from_slice(&i.to_le_bytes());
            set.insert(d, t0);
        }
        assert!(set.len() <= 3);
    }

    #[test]
    fn a_digest_used_often_is_not_copied_into_the_order() {
        let set = DigestSet::new(Duration::from_secs(10), 2);
        let t0 = Instant::now();
        set.insert([1; 32], t0);
        set.insert([2; 32], t0);
        for _ in 0..100 {
            set.insert([2; 32], t0 + Duration::from_secs(1));
        }
        assert!(set.contains(&[1; 32], t0), "not pushed out by [2]'s uses");
        // Past half its time, a use extends it.
        set.insert([2; 32], t0 + Duration::from_secs(6));
        assert!(set.contains(&[2; 32], t0 + Duration::from_secs(12)));
    }

    #[test]
    fn a_zero_time_to_live_remembers_nothing() {
        let set = DigestSet::new(Duration::ZERO, 10);
        set.insert([1; 32], Instant::now());
        assert!(set.is_empty());
    }
}
