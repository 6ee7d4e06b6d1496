import type { Rate } from '../config.js'
import type { StoreFallback } from './fallback.js'
import { integers, redisScript } from '../state/redis-script.js'
import type { Awaitable } from '../state/awaitable.js'

/**
 * Per-client counters (per IP, per session, cancels per session).
 *
 * Fixed windows, each starting at a key's first hit, as @fastify/rate-limit counts: O(1) memory
 * per key in Redis and in the process, which matters for a limit keyed by client IP under a
 * flood of addresses. The known cost: a client can spend its quota at the end of one window and
 * again at the start of the next, up to twice the quota within one window's length. That is
 * acceptable for abuse limits; the one limit that must never be exceeded in any interval, the
 * upstream's, is the org budget, which is an exact sliding window (org-budget.ts).
 */
export interface CounterHit {
  /** Hits in the current window, this one included (hits over the limit count too). */
  count: number
  /** Time until the window ends and the count starts again from zero (ms, > 0). */
  resetMs: number
}

export interface CounterStore {
  hit: (key: string, rate: Rate) => Awaitable<CounterHit>
}

export interface MemoryCounterOptions {
  now?: () => number
  /** Most keys held; beyond it expired keys are swept, then the oldest dropped. */
  maxKeys?: number
}

/** The memory store answers at once. */
export interface MemoryCounterStore extends CounterStore {
  hit: (key: string, rate: Rate) => CounterHit
}

export function createMemoryCounterStore (options: MemoryCounterOptions = {}): MemoryCounterStore {
  const now = options.now ?? Date.now
  const maxKeys = options.maxKeys ?? 50_000
  const windows = new Map<string, { count: number, endsAt: number }>()

  function makeRoom (at: number): void {
    for (const [key, window] of windows) if (window.endsAt <= at) windows.delete(key)
    // Still full (a flood of distinct keys): drop the oldest windows, which forgets their counts
    // rather than letting the process grow without bound.
    for (const key of windows.keys()) {
      if (windows.size < maxKeys) break
      windows.delete(key)
    }
  }

  function hit (key: string, rate: Rate): CounterHit {
    const at = now()
    let window = windows.get(key)
    if (window === undefined || window.endsAt <= at) {
      windows.delete(key)
      if (windows.size >= maxKeys) makeRoom(at)
      window = { count: 0, endsAt: at + rate.windowMs }
      windows.set(key, window)
    }
    window.count += 1
    return { count: window.count, resetMs: window.endsAt - at }
  }

  return { hit }
}

const hitScript = redisScript('bffCounterHit', 1, `
local count = redis.call('INCR', KEYS[1])
local ttl = redis.call('PTTL', KEYS[1])
-- A new window (or a key that lost its expiry): the window starts with this hit.
if ttl < 0 then
  ttl = tonumber(ARGV[1])
  redis.call('PEXPIRE', KEYS[1], ttl)
end
return { count, ttl }
`)

export interface RedisCounterOptions {
  fallback: StoreFallback
  /** Prefix of every key (one key per client and scope). */
  prefix?: string
  /** The twin that answers while Redis cannot. */
  memory?: MemoryCounterStore
}

/** Counts in Redis (one atomic script per hit), in the process's memory while Redis cannot answer. */
export function createRedisCounterStore (options: RedisCounterOptions): CounterStore {
  const prefix = options.prefix ?? 'bff:limit:'
  const memory = options.memory ?? createMemoryCounterStore()
  return {
    hit (key, rate) {
      return options.fallback.run(async function hitInRedis (redis) {
        const [count, ttl] = integers(await hitScript(redis, `${prefix}${key}`, rate.windowMs), 2) as [number, number]
        return { count, resetMs: Math.max(1, ttl) }
      }, () => memory.hit(key, rate))
    }
  }
}

/** The per-client counters of this process: in Redis when one is configured, else in memory. */
export function createCounterStore (options: { fallback: StoreFallback, now?: () => number }): CounterStore {
  const memory = createMemoryCounterStore({ now: options.now })
  return options.fallback.redisConfigured ? createRedisCounterStore({ fallback: options.fallback, memory }) : memory
}
