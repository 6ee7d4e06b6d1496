import { hash } from 'node:crypto'
import type { SharedState } from '../state/redis.js'
import { sessionStoreUnavailable } from '../auth/session-store.js'

/**
 * Remembers token ids (`jti`) for as long as their tokens could be accepted, so that a captured
 * logout token cannot be replayed later to end sessions created after it. In Redis when the
 * service has it, so a replay to another replica is caught too.
 */
export interface ReplayGuard {
  /** True the first time `id` is seen within `ttlMs`; false for a replay. */
  firstUse: (id: string, ttlMs: number) => Promise<boolean>
}

const MAX_REMEMBERED = 10_000

export function createReplayGuard (sharedState: Pick<SharedState, 'redis'>, now: () => number = Date.now, prefix = 'bff:jti:'): ReplayGuard {
  const redis = sharedState.redis
  if (redis !== null) {
    return {
      async firstUse (id, ttlMs) {
        const key = `${prefix}${hash('sha256', id, 'base64url')}`
        try {
          return (await redis.set(key, '1', 'PX', ttlMs, 'NX')) === 'OK'
        } catch (error) {
          // Like the session store: an honest 503, never a per-process answer other replicas lack.
          throw sessionStoreUnavailable(error)
        }
      }
    }
  }
  const seen = new Map<string, number>()
  return {
    async firstUse (id, ttlMs) {
      const at = now()
      const until = seen.get(id)
      if (until !== undefined && until > at) return false
      // Bounded memory: expired ids go first; a flood of fresh ones drops the oldest.
      if (seen.size >= MAX_REMEMBERED) {
        for (const [key, expiry] of seen) if (expiry <= at) seen.delete(key)
        if (seen.size >= MAX_REMEMBERED) seen.delete(seen.keys().next().value as string)
      }
      seen.set(id, at + ttlMs)
      return true
    }
  }
}
