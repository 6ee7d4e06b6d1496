import { hash } from 'node:crypto'
import type { SharedState } from '../state/redis.js'
import { redisScript } from '../state/redis-script.js'
import { sessionCommand } from '../auth/session-store.js'

/**
 * Remembers token ids (`jti`) for as long as their tokens could be accepted, so that a captured
 * logout token cannot be replayed later to end sessions created after it. In Redis when the
 * service has it, so a replay to another replica is caught too.
 *
 * An id is claimed before its logout is carried out and marked used once it took effect. A claim
 * that never completed (the session store failed, the route answered 503) does not make the IdP's
 * retry of the same token a replay: that retry is the only way the logout still happens.
 */
export interface ReplayGuard {
  /**
   * Claims `id` for `ttlMs`: true to go on (its first use, or again while no use of it has
   * completed), false for a replay of a use that completed.
   */
  claim: (id: string, ttlMs: number) => Promise<boolean>
  /** The use of a claimed `id` took effect: from now until its claim expires, it is a replay. */
  markUsed: (id: string) => Promise<void>
  /** Whether a use of `id` took effect and its claim has not expired: a look, which writes nothing. */
  used: (id: string) => Promise<boolean>
}

const MAX_REMEMBERED = 10_000

/** KEYS[1] the id's key; ARGV[1] its time to live (ms). 1 to go on, 0 for a replay. */
const claimScript = redisScript('bffReplayClaim', 1, `
local state = redis.call('GET', KEYS[1])
if state == 'used' then return 0 end
if not state then redis.call('SET', KEYS[1], 'claimed', 'PX', ARGV[1]) end
return 1
`)

/**
 * KEYS[1] the id's key. An expired claim stays expired; a live one is used for as long as it was
 * claimed. (Not `SET ... KEEPTTL XX`: KEEPTTL is Redis 6.0, and the README asks for Redis 5.)
 */
const markUsedScript = redisScript('bffReplayMarkUsed', 1, `
local ttl = redis.call('PTTL', KEYS[1])
-- -2: no claim; 0: one ending now. (-1, a key without expiry, is none of ours: claims expire.)
if ttl <= 0 then return 0 end
redis.call('SET', KEYS[1], 'used', 'PX', ttl)
return 1
`)

export function createReplayGuard (sharedState: Pick<SharedState, 'redis'> & Partial<Pick<SharedState, 'degradeFor'>>, now: () => number = Date.now, prefix = 'bff:jti:'): ReplayGuard {
  const redis = sharedState.redis
  if (redis !== null) {
    const keyOf = (id: string): string => `${prefix}${hash('sha256', id, 'base64url')}`
    return {
      // Like the session store: an honest 503, never a per-process answer other replicas lack.
      claim: async (id, ttlMs) => await sessionCommand(sharedState, async () => Number(await claimScript(redis, keyOf(id), ttlMs)) === 1),
      markUsed: async (id) => { await sessionCommand(sharedState, async () => await markUsedScript(redis, keyOf(id))) },
      used: async (id) => await sessionCommand(sharedState, async () => await redis.get(keyOf(id)) === 'used')
    }
  }
  const seen = new Map<string, { until: number, used: boolean }>()
  return {
    async claim (id, ttlMs) {
      const at = now()
      const entry = seen.get(id)
      if (entry !== undefined && entry.until > at) return !entry.used
      // Bounded memory: expired ids go first; a flood of fresh ones drops the oldest. Set anew,
      // not updated in place: the map's order stays the order of the claims (as logout-marks.ts).
      seen.delete(id)
      if (seen.size >= MAX_REMEMBERED) {
        for (const [key, { until }] of seen) if (until <= at) seen.delete(key)
        if (seen.size >= MAX_REMEMBERED) seen.delete(seen.keys().next().value as string)
      }
      seen.set(id, { until: at + ttlMs, used: false })
      return true
    },
    async markUsed (id) {
      const entry = seen.get(id)
      if (entry !== undefined && entry.until > now()) entry.used = true
    },
    async used (id) {
      const entry = seen.get(id)
      return entry !== undefined && entry.until > now() && entry.used
    }
  }
}
