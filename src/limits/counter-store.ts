import type { Rate } from '../config.js'
import type { StoreFallback } from './fallback.js'
import { integers, redisScript, type ScriptArg } from '../state/redis-script.js'
import { whenReady, type Awaitable } from '../state/awaitable.js'
import { monotonicNow } from '../state/clock.js'

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

/** One key to count, at its rate. */
export interface CounterRequest {
  key: string
  rate: Rate
}

export interface CounterStore {
  hit: (key: string, rate: Rate) => Awaitable<CounterHit>
  /**
   * One hit on each key in turn, stopping after the first hit over its rate: the keys after it are
   * not counted, exactly as if their checks had never run. One atomic step, so in Redis one round
   * trip for several limits of one request. Answers the hits counted, in order; the last is the
   * refusing one when it is over its rate. In Redis the keys must share a hash slot (a `{tag}` in
   * each). A session's own limits (per session, per cancel) follow the same rule in its lookup.
   */
  hitInOrder: (requests: readonly CounterRequest[]) => Awaitable<CounterHit[]>
  /**
   * The hits of the key's running window, counting nothing; null when no window runs (none
   * started, or it ended). For a limit that counts only some requests, decided after they ran.
   */
  peek: (key: string) => Awaitable<CounterHit | null>
}

export interface MemoryCounterOptions {
  /** monotonicNow unless a test drives the clock: without Redis these windows are the store of record. */
  now?: () => number
  /** Most keys held; beyond it expired keys are swept, then the oldest dropped. */
  maxKeys?: number
}

/** The memory store answers at once. */
export interface MemoryCounterStore extends CounterStore {
  hit: (key: string, rate: Rate) => CounterHit
  hitInOrder: (requests: readonly CounterRequest[]) => CounterHit[]
  peek: (key: string) => CounterHit | null
}

export function createMemoryCounterStore (options: MemoryCounterOptions = {}): MemoryCounterStore {
  const now = options.now ?? monotonicNow
  const maxKeys = options.maxKeys ?? 50_000
  const windows = new Map<string, { count: number, endsAt: number }>()

  // Room made at once when full: a tenth of the keys, so that a flood of distinct keys (one per
  // request) pays for one pass over the map per tenth of it, not one per request.
  const roomyAt = Math.floor(maxKeys * 0.9)

  function makeRoom (at: number): void {
    for (const [key, window] of windows) if (window.endsAt <= at) windows.delete(key)
    // Still full (a flood of distinct keys): drop the oldest windows, which forgets their counts
    // rather than letting the process grow without bound.
    for (const key of windows.keys()) {
      if (windows.size <= roomyAt) break
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

  function hitInOrder (requests: readonly CounterRequest[]): CounterHit[] {
    const hits: CounterHit[] = []
    for (const { key, rate } of requests) {
      const counted = hit(key, rate)
      hits.push(counted)
      if (counted.count > rate.count) break
    }
    return hits
  }

  function peek (key: string): CounterHit | null {
    const at = now()
    const window = windows.get(key)
    if (window === undefined || window.endsAt <= at) return null
    return { count: window.count, resetMs: window.endsAt - at }
  }

  return { hit, hitInOrder, peek }
}

/** The prefix of every per-client counter's Redis key (also those the session lookup counts). */
export const COUNTER_PREFIX = 'bff:limit:'

/**
 * `hit_in_order(keys, limits)`, in Lua for the scripts that count: one hit on each key in turn,
 * `limits` holding each key's window (ms) and limit, in the same order. Answers count and time
 * left of each counter, up to and including the first over its limit, and 0, 0 for each counter
 * after it (not counted: a counted hit is at least 1). Used by this store's script and by the
 * session lookup's (auth/session-store.ts), which counts a session's limits as it reads it.
 */
export const LUA_HIT_IN_ORDER = `
local function hit_in_order (keys, limits)
  local hits = {}
  local over = false
  for i, key in ipairs(keys) do
    local count, ttl = 0, 0
    if not over then
      count = redis.call('INCR', key)
      ttl = redis.call('PTTL', key)
      -- A new window (or a key that lost its expiry): the window starts with this hit.
      if ttl < 0 then
        ttl = tonumber(limits[2 * i - 1])
        redis.call('PEXPIRE', key, ttl)
      end
      over = count > tonumber(limits[2 * i])
    end
    hits[2 * i - 1] = count
    hits[2 * i] = ttl
  end
  return hits
end
`

// KEYS: the counters, in order. ARGV: each counter's window (ms) and limit, in the same order.
const hitScript = redisScript('bffCounterHit', 'variable', `${LUA_HIT_IN_ORDER}
return hit_in_order(KEYS, ARGV)
`)

// KEYS: the counter. Its count and time left, or 0, 0 when no window runs (a key that lost its
// expiry, which hit_in_order mends at its next hit, reads as a window ending at once).
const peekScript = redisScript('bffCounterPeek', 1, `
local count = redis.call('GET', KEYS[1])
if not count then return {0, 0} end
return {tonumber(count), redis.call('PTTL', KEYS[1])}
`)

/** The Redis arguments of `hit_in_order`'s limits: each request's window and limit, in order. */
export function limitArgs (requests: ReadonlyArray<{ rate: Rate }>, args: ScriptArg[]): void {
  for (const { rate } of requests) args.push(rate.windowMs, rate.count)
}

function firstHit (hits: CounterHit[]): CounterHit {
  return hits[0] as CounterHit
}

/** `hit_in_order`'s answer (count, ttl per key) as the hits counted. */
export function hitsOf (reply: unknown, keys: number): CounterHit[] {
  const values = integers(reply, 2 * keys)
  const hits: CounterHit[] = []
  for (let i = 0; i < values.length && (values[i] as number) > 0; i += 2) {
    hits.push({ count: values[i] as number, resetMs: Math.max(1, values[i + 1] as number) })
  }
  return hits
}

export interface RedisCounterOptions {
  fallback: StoreFallback
  /** Prefix of every key (one key per client and scope). */
  prefix?: string
  /** The twin that answers while Redis cannot. */
  memory?: MemoryCounterStore
}

/**
 * Counts in Redis (one atomic script per request's limits), in the process's memory while Redis
 * cannot answer.
 */
export function createRedisCounterStore (options: RedisCounterOptions): CounterStore {
  const prefix = options.prefix ?? COUNTER_PREFIX
  const memory = options.memory ?? createMemoryCounterStore()
  function hitInOrder (requests: readonly CounterRequest[]): Awaitable<CounterHit[]> {
    return options.fallback.run(async function hitInRedis (redis) {
      const args: ScriptArg[] = [requests.length]
      for (const { key } of requests) args.push(prefix + key)
      limitArgs(requests, args)
      return hitsOf(await hitScript(redis, ...args), requests.length)
    }, () => memory.hitInOrder(requests))
  }
  function peek (key: string): Awaitable<CounterHit | null> {
    return options.fallback.run(async function peekInRedis (redis) {
      return hitsOf(await peekScript(redis, prefix + key), 1)[0] ?? null
    }, () => memory.peek(key))
  }
  return {
    hitInOrder,
    hit: (key, rate) => whenReady(hitInOrder([{ key, rate }]), firstHit),
    peek
  }
}

/** The per-client counters of this process: in Redis when one is configured, else in memory. */
export function createCounterStore (options: { fallback: StoreFallback, now?: () => number }): CounterStore {
  const memory = createMemoryCounterStore({ now: options.now })
  return options.fallback.redisConfigured ? createRedisCounterStore({ fallback: options.fallback, memory }) : memory
}
