import { performance } from 'node:perf_hooks'
import type { Redis } from 'ioredis'
import type { FastifyBaseLogger } from 'fastify'
import { coalesceWrites, FAILED_COMMAND_PAUSE_MS, isCommandTimeout, type SharedState } from '../state/redis.js'
import type { Awaitable } from '../state/awaitable.js'
import { TroubleNotice } from '../state/notice.js'

/**
 * Runs a store operation on Redis when it can answer quickly, and on the store's in-memory twin
 * otherwise. A Redis outage therefore degrades limits to per-process ones instead of disabling
 * them (fail open) or failing requests (fail closed), and no request waits longer than the
 * shared client's command bound.
 */
export interface StoreFallback {
  /**
   * False when no Redis is configured: one process, whose memory is the store of record. Stores
   * then use their memory twin directly (createOrgBudget, createCooldown, createCounterStore).
   */
  readonly redisConfigured: boolean
  /**
   * The memory twin's answer at once when Redis is not in use, else a promise of Redis's (or of
   * the twin's, after a failure). `whilePaused`: what to ask Redis, on a connected client, while
   * the stores leave it alone after a failed command (a read the twin cannot answer; it falls back
   * to `inMemory` itself); without it the twin answers then.
   */
  run: <T>(viaRedis: (redis: Redis) => Promise<T>, inMemory: () => T, whilePaused?: (redis: Redis) => Promise<T>) => Awaitable<T>
  /** How long (ms) the stores have been able to use Redis without a break (SharedState.redisFor). */
  redisFor: () => number
}

export interface StoreFallbackOptions {
  sharedState: SharedState
  log: FastifyBaseLogger
  /**
   * After a failed or slow command, Redis is left alone for this long (ms): the shared state says
   * `degraded` meanwhile (SharedState.degradeFor), on its own clock.
   */
  pauseMs?: number
  /** How often a continuing fallback is logged again (ms). */
  logEveryMs?: number
  /** The clock of the log interval. */
  now?: () => number
}

export function createStoreFallback (options: StoreFallbackOptions): StoreFallback {
  const { sharedState, log } = options
  const now = options.now ?? Date.now
  const pauseMs = options.pauseMs ?? FAILED_COMMAND_PAUSE_MS
  const logEveryMs = options.logEveryMs ?? 60_000
  // When a paused read of Redis (or a command timing out) last failed: a pause after it asks
  // nothing (a monotonic clock: a wall clock stepped back must not stop those reads).
  let pausedReadFailedAt = Number.NEGATIVE_INFINITY

  // At most one warning per interval for the whole process, whatever the number of requests and
  // stores, and however often a struggling Redis flaps between answering and not; the matching
  // all-clear once per warning.
  const notice = new TroubleNotice(logEveryMs, now)

  function noteFallback (reason: string): void {
    if (!notice.tell()) return
    // `cause`, not `reason`: the redaction paths censor every `*.reason` (cancellation reasons).
    log.warn({ limits: { cause: reason } }, 'limits: Redis unavailable, counting in per-process memory')
  }

  function noteRecovered (): void {
    if (!notice.clear()) return
    log.info('limits: counting in Redis again')
  }

  // The shared client's command timeout bounds the wait (state/redis.ts).
  async function inRedis<T> (viaRedis: (redis: Redis) => Promise<T>, inMemory: () => T, redis: Redis): Promise<T> {
    try {
      coalesceWrites(redis)
      const result = await viaRedis(redis)
      noteRecovered()
      return result
    } catch (error) {
      // Redis is left alone for pauseMs, and /readyz and the state-store metric tell operators
      // that the limits count in memory meanwhile.
      sharedState.degradeFor(pauseMs)
      // A Redis that let a command time out is stalled: the pause that begins asks it nothing,
      // not even the paused read of the shared cooldown.
      const timedOut = isCommandTimeout(error)
      if (timedOut) pausedReadFailedAt = performance.now()
      noteFallback(timedOut ? 'timeout' : 'error')
      return inMemory()
    }
  }

  // Still paused: a failure extends the pause, a success ends nothing (the pause ends by itself).
  async function paused<T> (whilePaused: (redis: Redis) => Promise<T>, inMemory: () => T, redis: Redis): Promise<T> {
    try {
      coalesceWrites(redis)
      return await whilePaused(redis)
    } catch {
      pausedReadFailedAt = performance.now()
      sharedState.degradeFor(pauseMs)
      return inMemory()
    }
  }

  return {
    redisConfigured: sharedState.redis !== null,
    redisFor: () => sharedState.redisFor(),
    run (viaRedis, inMemory, whilePaused) {
      const redis = sharedState.redis
      // No Redis configured: one process, memory is the store of record, nothing to log.
      if (redis === null) return inMemory()
      if (sharedState.mode() !== 'redis') {
        const connected = redis.status === 'ready'
        noteFallback(connected ? 'paused after a failed command' : 'disconnected')
        // Once such a read failed, none again for a pause: a stalled Redis must not cost every
        // call a command timeout.
        const ask = connected && whilePaused !== undefined && performance.now() - pausedReadFailedAt >= pauseMs
        return ask ? paused(whilePaused, inMemory, redis) : inMemory()
      }
      return inRedis(viaRedis, inMemory, redis)
    }
  }
}
