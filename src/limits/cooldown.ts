import type { Redis } from 'ioredis'
import type { StoreFallback } from './fallback.js'
import { integers, LUA_NOW_MS, redisScript } from '../state/redis-script.js'
import type { Awaitable } from '../state/awaitable.js'
import { monotonicNow } from '../state/clock.js'

/**
 * The upstream cooldown: after Care360 answers 429, no replica calls it until the cooldown ends.
 *
 * One record for the organization: when it ends and how many 429 episodes came in a row. It is
 * only ever extended, never shortened, so a late or shorter Retry-After seen by one replica cannot
 * cut short a longer cooldown decided by another. A 429 while a cooldown is already running
 * (calls that were in flight when the first 429 came back) extends it if its Retry-After asks for
 * more, but does not count as a new episode: only a 429 after a cooldown ended doubles the
 * backoff, and a quiet period of `resetAfterMs` after the end starts the doubling over.
 *
 * Redis may lose the record (restarted empty, a failover to a replica it had not reached, a
 * FLUSHALL) or never get it (the 429 came while Redis could not answer, and the trip went to this
 * process's memory): the other replicas would then call the upstream again while it still limits
 * us. So each replica that still honours a cooldown writes it back (`extend`, only ever extending)
 * when its shared state is back after a break, when a trip answers less than it knows, and at most
 * once a second while it refuses calls for it (upstream-gate.ts).
 */
export interface CooldownTrip {
  /** How long calls stay stopped from now (ms). */
  remainingMs: number
  /** True when no cooldown was running: a new episode (the gate then lowers the budget). */
  fresh: boolean
}

/**
 * What the org budget needs to check the cooldown in the same step as its own admission (in Redis,
 * in the same script: one round trip for both before every upstream call).
 */
export interface CooldownCheck {
  /** The shared record's key in Redis; null when the cooldown is held only in this process. */
  key: string | null
  /** Time left in this process's own cooldown (ms): the memory store, or the Redis store's fallback. */
  memory: () => number
  /** Time left in the shared record (ms), read from Redis; absent when there is none. */
  shared?: (redis: Redis) => Promise<number>
}

export interface CooldownStore {
  /** Time left in the current cooldown (ms), 0 when none. */
  remaining: () => Awaitable<number>
  check: CooldownCheck
  /**
   * Records an upstream 429. `retryAfterMs`: the upstream's own wait, already clamped, or null
   * to back off exponentially; `jitter` in [0, 1) spreads the backoff.
   */
  trip: (retryAfterMs: number | null, jitter: number) => Awaitable<CooldownTrip>
  /**
   * Writes back a cooldown this process still honours, `remainingMs` from now, which the store may
   * have lost (a Redis restarted empty) or never received (the 429 came while Redis could not
   * answer). Only extends: a later end stays. Not a new episode: the streak stays what the store
   * holds, at least one (a cooldown runs). Answers the time left in the cooldown now (ms).
   */
  extend: (remainingMs: number) => Awaitable<number>
}

export interface BackoffOptions {
  /** First backoff without Retry-After (ms); doubles per consecutive episode. */
  baseMs?: number
  /** Longest backoff without Retry-After (ms): one window of a sliding quota is always enough. */
  maxMs?: number
  /** Quiet time after a cooldown ends that resets the doubling (ms). */
  resetAfterMs?: number
  /** Shortest backoff (ms); COOLDOWN_MIN_MS unless a test shortens it (the longest is COOLDOWN_MAX_MS). */
  minMs?: number
}

/** Bounds on any cooldown, including one from the upstream's Retry-After. */
export const COOLDOWN_MIN_MS = 1000
export const COOLDOWN_MAX_MS = 10 * 60_000

/** The upstream's Retry-After, clamped: at least a second, and never a day-long stop on a typo. */
export function clampRetryAfter (retryAfterMs: number | null): number | null {
  if (retryAfterMs === null || !Number.isFinite(retryAfterMs)) return null
  return Math.min(COOLDOWN_MAX_MS, Math.max(COOLDOWN_MIN_MS, Math.ceil(retryAfterMs)))
}

type Backoff = Required<BackoffOptions> & { capMs: number }

function backoffOf (options: BackoffOptions): Backoff {
  return {
    baseMs: options.baseMs ?? 1000,
    maxMs: options.maxMs ?? 60_000,
    resetAfterMs: options.resetAfterMs ?? 60_000,
    minMs: options.minMs ?? COOLDOWN_MIN_MS,
    capMs: COOLDOWN_MAX_MS
  }
}

/** base * 2^(streak-1), capped, times a jitter factor in [0.75, 1.25), clamped to the bounds. */
function backoffMs (streak: number, jitter: number, backoff: Backoff): number {
  const raw = Math.min(backoff.maxMs, backoff.baseMs * 2 ** Math.min(streak - 1, 30)) * (0.75 + 0.5 * jitter)
  return Math.min(backoff.capMs, Math.max(backoff.minMs, Math.round(raw)))
}

export interface MemoryCooldownOptions extends BackoffOptions {
  /** monotonicNow unless a test drives the clock (it answers durations only: see `remaining`). */
  now?: () => number
}

/** The memory cooldown answers at once. */
export interface MemoryCooldown extends CooldownStore {
  remaining: () => number
  trip: (retryAfterMs: number | null, jitter: number) => CooldownTrip
  extend: (remainingMs: number) => number
}

export function createMemoryCooldown (options: MemoryCooldownOptions = {}): MemoryCooldown {
  const now = options.now ?? monotonicNow
  const backoff = backoffOf(options)
  let until = 0
  let streak = 0

  function remaining (): number {
    return Math.max(0, until - now())
  }

  function trip (retryAfterMs: number | null, jitter: number): CooldownTrip {
    const at = now()
    const fresh = until <= at
    if (fresh) {
      if (at - until >= backoff.resetAfterMs) streak = 0
      streak += 1
    }
    const delay = retryAfterMs ?? backoffMs(streak, jitter, backoff)
    until = Math.max(until, at + delay)
    return { remainingMs: until - at, fresh }
  }

  function extend (remainingMs: number): number {
    const at = now()
    if (remainingMs > 0 && at + remainingMs > until) {
      // As the Redis record: gone (its streak with it) once the reset period after its end passed.
      if (at - until >= backoff.resetAfterMs) streak = 0
      streak = Math.max(streak, 1)
      until = at + remainingMs
    }
    return Math.max(0, until - at)
  }

  return { remaining, trip, extend, check: { key: null, memory: remaining } }
}

/**
 * Lua: the time left (ms) in the cooldown whose record is at `key` (a Lua expression), after
 * LUA_NOW_MS. The org budget's script reads it too.
 */
export function luaCooldownLeft (key: string): string {
  return `math.max(0, tonumber(redis.call('HGET', ${key}, 'until') or '0') - now)`
}

/** The key of the organization's cooldown record under a hash tag (the org budget's by default). */
export function cooldownKey (tag = 'bff:budget'): string {
  return `{${tag}}:cooldown`
}

const remainingScript = redisScript('bffCooldownRemaining', 1, `${LUA_NOW_MS}
return ${luaCooldownLeft('KEYS[1]')}
`)

// ARGV: retryAfterMs (-1: back off), jitter, baseMs, maxMs, resetAfterMs, minMs, capMs.
const tripScript = redisScript('bffCooldownTrip', 1, `${LUA_NOW_MS}
local retry = tonumber(ARGV[1])
local jitter = tonumber(ARGV[2])
local base, max, reset = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local low, high = tonumber(ARGV[6]), tonumber(ARGV[7])
local state = redis.call('HMGET', KEYS[1], 'until', 'streak')
local untilMs = tonumber(state[1] or '0')
local streak = tonumber(state[2] or '0')
local fresh = untilMs <= now
if fresh then
  if now - untilMs >= reset then streak = 0 end
  streak = streak + 1
end
local delay = retry
if retry < 0 then
  delay = math.min(max, base * 2 ^ math.min(streak - 1, 30)) * (0.75 + 0.5 * jitter)
  delay = math.min(high, math.max(low, math.floor(delay + 0.5)))
end
-- Only ever extended: the record keeps the later end, and its expiry (end plus the reset
-- period, so the streak outlives the cooldown) grows with it.
untilMs = math.max(untilMs, now + delay)
redis.call('HSET', KEYS[1], 'until', int(untilMs), 'streak', streak)
redis.call('PEXPIRE', KEYS[1], int(untilMs - now + reset))
return { untilMs - now, fresh and 1 or 0 }
`)

// ARGV: remainingMs, resetAfterMs. Extends the record to end `remainingMs` from now at least: a
// cooldown a replica still honours, written back (see CooldownStore.extend). The streak stays,
// at least 1; the expiry follows the end as in tripScript.
const extendScript = redisScript('bffCooldownExtend', 1, `${LUA_NOW_MS}
local length = tonumber(ARGV[1])
local reset = tonumber(ARGV[2])
local state = redis.call('HMGET', KEYS[1], 'until', 'streak')
local untilMs = tonumber(state[1] or '0')
if length > 0 and now + length > untilMs then
  untilMs = now + length
  redis.call('HSET', KEYS[1], 'until', int(untilMs), 'streak', math.max(1, tonumber(state[2] or '0')))
  redis.call('PEXPIRE', KEYS[1], int(untilMs - now + reset))
end
return math.max(0, untilMs - now)
`)

export interface RedisCooldownOptions extends MemoryCooldownOptions {
  fallback: StoreFallback
  /** Hash tag of the key, the org budget's by default (one slot for the organization's state). */
  tag?: string
  memory?: MemoryCooldown
}

export function createRedisCooldown (options: RedisCooldownOptions): CooldownStore {
  const { fallback } = options
  const backoff = backoffOf(options)
  const memory = options.memory ?? createMemoryCooldown(options)
  const key = cooldownKey(options.tag)
  async function remainingInRedis (redis: Redis): Promise<number> {
    return Number(await remainingScript(redis, key))
  }
  return {
    remaining: () => fallback.run(remainingInRedis, memory.remaining),
    check: { key, memory: memory.remaining, shared: remainingInRedis },
    trip (retryAfterMs, jitter) {
      return fallback.run(async function tripInRedis (redis): Promise<CooldownTrip> {
        const reply = await tripScript(redis, key, retryAfterMs ?? -1, jitter, backoff.baseMs, backoff.maxMs, backoff.resetAfterMs, backoff.minMs, backoff.capMs)
        const [remainingMs, fresh] = integers(reply, 2) as [number, number]
        return { remainingMs, fresh: fresh === 1 }
      }, () => memory.trip(retryAfterMs, jitter))
    },
    extend (remainingMs) {
      return fallback.run(async function extendInRedis (redis): Promise<number> {
        return Number(await extendScript(redis, key, Math.ceil(remainingMs), backoff.resetAfterMs))
      }, () => memory.extend(remainingMs))
    }
  }
}

/** The upstream cooldown of this process: in Redis when one is configured, else in memory. */
export function createCooldown (options: RedisCooldownOptions): CooldownStore {
  return options.fallback.redisConfigured ? createRedisCooldown(options) : options.memory ?? createMemoryCooldown(options)
}
