use std::time::Duration;

use redis::Script;

use crate::{SharedError, Store};

/// Token buckets on the Redis server's clock, so that every replica spends from the same
/// ones. One script decides for all the buckets of a call: it takes from all or from none.
const TAKE: &str = r"
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) * 1000 + tonumber(now_parts[2]) / 1000
local levels = {}
local wait, tightest = 0, 0
for i, key in ipairs(KEYS) do
  local per_ms, burst, amount = tonumber(ARGV[3*i-2]), tonumber(ARGV[3*i-1]), tonumber(ARGV[3*i])
  local state = redis.call('HMGET', key, 'level', 'at')
  local level, at = tonumber(state[1]), tonumber(state[2])
  if level == nil or at == nil then level, at = burst, now end
  level = math.min(burst, level + math.max(0, now - at) * per_ms)
  levels[i] = level
  local wanted = math.min(amount, burst)
  if level < wanted then
    local this_wait = (wanted - level) / per_ms
    if this_wait > wait then wait, tightest = this_wait, i end
  end
end
if wait > 0 then return {0, math.ceil(wait * 1000), tightest} end
for i, key in ipairs(KEYS) do
  local per_ms, burst, amount = tonumber(ARGV[3*i-2]), tonumber(ARGV[3*i-1]), tonumber(ARGV[3*i])
  local level = levels[i] - amount
  redis.call('HSET', key, 'level', tostring(level), 'at', tostring(now))
  redis.call('PEXPIRE', key, math.ceil((burst - level) / per_ms) + 1000)
end
return {1, 0, 0}
";

/// Gives back (or charges) amounts after the fact: what a call did not use, or the request a
/// refused call never sent. A bucket that expired is full, and stays so.
const ADJUST: &str = r"
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) * 1000 + tonumber(now_parts[2]) / 1000
for i, key in ipairs(KEYS) do
  local per_ms, burst, delta = tonumber(ARGV[3*i-2]), tonumber(ARGV[3*i-1]), tonumber(ARGV[3*i])
  local state = redis.call('HMGET', key, 'level', 'at')
  local level, at = tonumber(state[1]), tonumber(state[2])
  if level ~= nil and at ~= nil then
    level = math.min(burst, math.min(burst, level + math.max(0, now - at) * per_ms) + delta)
    redis.call('HSET', key, 'level', tostring(level), 'at', tostring(now))
    redis.call('PEXPIRE', key, math.ceil((burst - level) / per_ms) + 1000)
  end
end
return 1
";

/// One bucket a call takes from (or gives back to).
#[derive(Debug, Clone, PartialEq)]
pub struct BucketAsk {
    /// Which bucket: the limiter's own name for it (scope and workspace or model).
    pub bucket: String,
    pub per_minute: u32,
    pub burst: u32,
    /// To take (or, for [`SharedBuckets::adjust`], to give back: negative charges more).
    pub amount: f64,
}

/// What the buckets said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Take {
    Taken,
    /// Nothing was taken; the `tightest` ask (its index) has capacity in `after`.
    After {
        after: Duration,
        tightest: usize,
    },
}

/// Rate-limit buckets that every replica shares.
#[derive(Debug, Clone)]
pub struct SharedBuckets {
    store: Store,
    take: std::sync::Arc<Script>,
    adjust: std::sync::Arc<Script>,
}

impl SharedBuckets {
    pub fn new(store: Store) -> Self {
        Self { store, take: std::sync::Arc::new(Script::new(TAKE)), adjust: std::sync::Arc::new(Script::new(ADJUST)) }
    }

    /// Takes every ask's amount, or none of them.
    pub async fn take(&self, asks: &[BucketAsk]) -> Result<Take, SharedError> {
        if asks.is_empty() {
            return Ok(Take::Taken);
        }
        let mut invocation = self.take.prepare_invoke();
        self.fill(&mut invocation, asks);
        let (taken, wait_us, tightest): (i64, i64, i64) = self.store.invoke(&invocation).await?;
        if taken == 1 {
            return Ok(Take::Taken);
        }
        Ok(Take::After {
            after: Duration::from_micros(wait_us.max(1) as u64),
            tightest: usize::try_from(tightest - 1).unwrap_or(0).min(asks.len() - 1),
        })
    }

    /// Adds each ask's amount back (capped at the burst).
    pub async fn adjust(&self, asks: &[BucketAsk]) -> Result<(), SharedError> {
        if asks.is_empty() {
            return Ok(());
        }
        let mut invocation = self.adjust.prepare_invoke();
        self.fill(&mut invocation, asks);
        self.store.invoke::<i64>(&invocation).await.map(drop)
    }

    fn fill(&self, invocation: &mut redis::ScriptInvocation<'_>, asks: &[BucketAsk]) {
        for ask in asks {
            invocation
                .key(self.store.key("limit", &ask.bucket))
                .arg(f64::from(ask.per_minute.max(1)) / 60_000.0)
                .arg(ask.burst.max(1))
                .arg(ask.amount);
        }
    }

    pub fn is_up(&self) -> bool {
        self.store.is_up()
    }
}
